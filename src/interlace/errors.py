"""Exceptions users see. Each message names the problem and shows the fix."""

from __future__ import annotations

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


class TracingError(InterlaceError):
    """A trace was used in a way that cannot work (the message says how to fix it)."""


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
