"""The framed channel between a job runner and its worker process (a socketpair).

One message is a fixed prefix (the header's length and the body's length, big-endian), a JSON
header (a dict: what the message is) and raw bytes (a payload or a result, opaque here). Never
pickle: the worker runs strangers' code, so anything it sends back is data the parent parses
with `json` and hands on as bytes, never an object it would have to trust.

A message costs two `sendall` calls (prefix with header, then the body from the caller's own
buffer, so a large payload is not copied to be framed) and one read of the body into a buffer
of exactly its size.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = ["Channel", "ChannelClosed", "MAX_HEADER_BYTES"]

_PREFIX = struct.Struct(">IQ")  # header length, body length
#: A header is a few fields; a larger one means a broken or hostile peer.
MAX_HEADER_BYTES = 16 * 1024 * 1024


class ChannelClosed(EOFError):
    """The other end closed the channel (or died) before a whole message arrived."""


class Channel:
    """Messages over one connected stream socket; `send` and `recv` are each for one thread."""

    def __init__(self, sock: socket.socket, max_body_bytes: int | None = None) -> None:
        self.sock = sock
        self.max_body_bytes = max_body_bytes

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, header: dict[str, Any], body: bytes | bytearray | memoryview = b"") -> None:
        head = json.dumps(header, separators=(",", ":")).encode()
        try:
            if len(body) < 65536:  # small: one write (the common case of a small trace)
                self.sock.sendall(_PREFIX.pack(len(head), len(body)) + head + bytes(body))
            else:
                self.sock.sendall(_PREFIX.pack(len(head), len(body)) + head)
                self.sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ChannelClosed(f"the channel closed while sending: {exc}") from None

    def recv(self) -> tuple[dict[str, Any], bytes]:
        head_len, body_len = _PREFIX.unpack(self._read(_PREFIX.size))
        if head_len > MAX_HEADER_BYTES:
            raise ChannelClosed(f"a message header of {head_len} bytes is over the limit; the peer is broken")
        if self.max_body_bytes is not None and body_len > self.max_body_bytes:
            raise ChannelClosed(f"a message body of {body_len} bytes is over the limit of {self.max_body_bytes}")
        header = json.loads(self._read(head_len)) if head_len else {}
        if not isinstance(header, dict):
            raise ChannelClosed("a message header is not a JSON object; the peer is broken")
        body = self._read(body_len) if body_len else b""
        return header, body

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            try:
                n = self.sock.recv_into(view[got:], size - got)
            except ConnectionResetError:
                n = 0
            if n == 0:
                raise ChannelClosed("the other end of the channel closed")
            got += n
        return bytes(buffer) if size < 65536 else buffer  # type: ignore[return-value]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
