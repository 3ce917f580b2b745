"""Errors raised by the remote wire format and value codec.

Two directions, two errors:

- ``WireFormatError`` is raised while *decoding* bytes or JSON nodes that came from somewhere
  else (a client, a server, a store). Decoders treat their input as untrusted, so every
  problem, whatever its cause, surfaces as this one type: callers can catch it in one place
  and answer "bad request" without a stray ``KeyError`` leaking internals.
- ``UnsupportedValueError`` is raised while *encoding* a local Python value that the wire
  cannot carry. It subclasses ``TypeError`` because the cause is the type of a user value,
  and its message names the type, the path inside the value and the fix.

Both are `interlace.InterlaceError`s (the tree is in `interlace/errors.py`).
"""

from __future__ import annotations

from ..errors import InterlaceError

__all__ = ["RemoteProtocolError", "WireFormatError", "UnsupportedValueError"]


class RemoteProtocolError(InterlaceError):
    """Base class for errors in what the client and the server exchange."""


class WireFormatError(RemoteProtocolError):
    """Bytes or JSON nodes that do not follow the Interlace wire format."""


class UnsupportedValueError(InterlaceError, TypeError):
    """A Python value that cannot be sent over the wire (names type, path and fix)."""
