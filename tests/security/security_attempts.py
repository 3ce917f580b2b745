"""The table of attempts the suite runs (see README.md for how to add one)."""

from __future__ import annotations

from attempts_modules import MODULE_ATTEMPTS
from attempts_python import PYTHON_ATTEMPTS
from attempts_state import STATE_ATTEMPTS

__all__ = ["ATTEMPTS"]

ATTEMPTS = [*PYTHON_ATTEMPTS, *MODULE_ATTEMPTS, *STATE_ATTEMPTS]

_names = [a.name for a in ATTEMPTS]
assert len(_names) == len(set(_names)), "attempt names must be unique"
