"""Exceptions users see. Each message names the problem and shows the fix."""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator

__all__ = [
    "InterlaceError",
    "MissedProviderError",
    "OutOfOrderError",
    "ModuleNotCalledError",
    "SourceNotFoundError",
    "NotSavedError",
    "TracingError",
    "GenerationEndedWarning",
]


class InterlaceError(Exception):
    """Base class of Interlace's own errors."""


class TracingError(InterlaceError, ValueError):
    """A trace was used in a way that cannot work (the message says how to fix it). A
    `ValueError` too, which is what nnsight raises for these (an invoke inside an invoke, a
    negative step, a module read outside a running trace), so `except ValueError:` works."""


class MissedProviderError(InterlaceError):
    """A requested module value was not (or can no longer be) delivered."""


class OutOfOrderError(MissedProviderError):
    """A module value was requested after the module had already run in this forward."""


class ModuleNotCalledError(MissedProviderError):
    """The forward ended without ever calling the requested module."""


class SourceNotFoundError(TracingError):
    """The source of a `with` block could not be read, so it cannot be traced."""


class NotSavedError(TracingError, UnboundLocalError):
    """A name the trace body assigned, used after the block, but never saved (so it has no
    value outside the trace). An `UnboundLocalError` too, which is what Python would raise."""


class GenerationEndedWarning(UserWarning):
    """Generation stopped (e.g. at EOS) before a step the body was waiting for."""


# -- warnings that travel with a job's result -------------------------------------------------
# The engine's warnings (generation ended early, a cache made late, ...) must reach the user in
# every mode. Raised on a server they would land in the server's log, so while a job runs the
# executor collects them here and the result carries them back, where they are raised again
# (`remote.result.decode_result`). A thread-local list, not `warnings.catch_warnings`, which
# swaps process-wide state and would mix up jobs of different models running side by side.

class _Collector(threading.local):
    caught: list[tuple[type[Warning], str]] | None = None


_collector = _Collector()


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """`warnings.warn`, or collected for the client while a job runs remotely."""
    caught = _collector.caught
    if caught is not None:
        caught.append((category, message))
        return
    warnings.warn(message, category, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def collecting_warnings() -> Iterator[list[tuple[type[Warning], str]]]:
    """Collect `warn(...)` calls of this thread instead of raising them."""
    previous = _collector.caught
    _collector.caught = caught = []
    try:
        yield caught
    finally:
        _collector.caught = previous
