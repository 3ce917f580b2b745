"""Frame plumbing: where the user is, writing saved values back, and clean tracebacks."""

from __future__ import annotations

import ctypes
import os
import sys
import types
from typing import Any, Mapping

__all__ = ["NAMESPACE_MARKER", "is_namespace", "push_to_frame", "bind_from_trace_callback", "user_location", "clean_traceback"]

#: Key present in every namespace dict that runs a traced body.
NAMESPACE_MARKER = "__interlace_namespace__"

_CO_OPTIMIZED = 0x0001  # inspect.CO_OPTIMIZED: a function frame with fast locals

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HIDDEN_DIRS = (
    _PACKAGE_DIR + os.sep,
    os.path.dirname(os.path.abspath(__import__("torch").__file__)) + os.sep,
    os.path.dirname(os.path.abspath(__import__("greenlet").__file__)) + os.sep,
)


def is_namespace(mapping: Mapping[str, Any]) -> bool:
    return NAMESPACE_MARKER in mapping


def push_to_frame(frame: types.FrameType, values: Mapping[str, Any]) -> None:
    """Bind `values` as variables in `frame`, from anywhere.

    Design note: CPython 3.11 keeps function locals in "fast" slots; writing `f_locals` alone
    changes a snapshot, so `PyFrame_LocalsToFast` copies it back (through ctypes: ~0.5 us hot
    but ~12 us with cold caches, which is why a trace binds its results with
    `bind_from_trace_callback` instead). Module, class and exec'd frames use a real dict and
    need nothing more. On 3.13+ (PEP 667) `f_locals` writes through.
    """
    values = _bind_globals(frame, values)
    if not values:
        return
    f_locals = frame.f_locals
    if f_locals is frame.f_globals or sys.version_info >= (3, 13):
        for name, value in values.items():
            f_locals[name] = value
        return
    f_locals.update(values)
    _locals_to_fast(frame, 0)


def bind_from_trace_callback(frame: types.FrameType, values: Mapping[str, Any]) -> None:
    """`push_to_frame` for a trace function called on `frame` itself.

    CPython's trace trampoline snapshots a frame's fast locals into `f_locals` before calling
    the trace function and copies them back (cells included) after it returns or raises, so
    writing the snapshot is enough: no ctypes call.
    """
    values = _bind_globals(frame, values)
    if values:
        frame.f_locals.update(values)


def _bind_globals(frame: types.FrameType, values: Mapping[str, Any]) -> Mapping[str, Any]:
    """Bind the names that are globals in `frame`; return the rest (its own variables)."""
    if values and frame.f_code.co_flags & _CO_OPTIMIZED:
        # In a function, a name the body assigns but that is not one of the function's own
        # variables was declared `global` there (`global G` in the body makes it global for
        # the whole function), so it belongs in the module's globals.
        own = _own_names(frame.f_code)
        if not own.issuperset(values):
            for name in [n for n in values if n not in own]:
                frame.f_globals[name] = values[name]
            return {n: v for n, v in values.items() if n in own}
    return values


def _bind_locals_to_fast() -> Any:
    """`PyFrame_LocalsToFast` with its signature declared once (cheaper calls; a private
    function object, so other users of `ctypes.pythonapi` are unaffected)."""
    if sys.version_info >= (3, 13):
        return None  # PEP 667: writes to f_locals go through
    prototype = ctypes.PYFUNCTYPE(None, ctypes.py_object, ctypes.c_int)
    return prototype(("PyFrame_LocalsToFast", ctypes.pythonapi))


_locals_to_fast = _bind_locals_to_fast()

_own_cache: dict[int, tuple[types.CodeType, frozenset[str]]] = {}


def _own_names(code: types.CodeType) -> frozenset[str]:
    """A function's own variable names (3.11 rebuilds `co_varnames` on every access)."""
    hit = _own_cache.get(id(code))
    if hit is not None and hit[0] is code:
        return hit[1]
    own = frozenset(code.co_varnames) | frozenset(code.co_cellvars) | frozenset(code.co_freevars)
    if len(_own_cache) > 4096:
        _own_cache.clear()
    _own_cache[id(code)] = (code, own)
    return own


def _is_internal(filename: str) -> bool:
    return filename.startswith(_HIDDEN_DIRS)


def user_location(skip_internal: bool = True) -> tuple[str, int]:
    """(filename, line) of the innermost frame that is the user's code."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (skip_internal and _is_internal(filename)):
            if filename.startswith("<interlace-remote:") and ">" in filename:
                # shipped code: the user's file (`remote.source.remote_filename` adds `#part`
                # after the `>` for shipped functions and classes)
                filename = filename[len("<interlace-remote:") :].rpartition(">")[0]
            return filename, frame.f_lineno
        frame = frame.f_back
    return "<unknown>", 0


def clean_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Drop Interlace, torch and greenlet frames so the traceback shows the user's lines.

    Set `interlace.CONFIG.APP.DEBUG = True` to keep every frame.
    """
    if _debug():
        return tb
    frames: list[types.TracebackType] = []
    while tb is not None:
        if not _is_internal(tb.tb_frame.f_code.co_filename):
            frames.append(tb)
        tb = tb.tb_next
    new: types.TracebackType | None = None
    for entry in reversed(frames):
        new = types.TracebackType(new, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return new


def _debug() -> bool:
    try:
        from ..config import CONFIG

        return bool(CONFIG.APP.DEBUG)
    except Exception:  # config not importable during early start-up
        return False
