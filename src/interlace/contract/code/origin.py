"""Where shipped code comes from and goes: its file names on the server, the module it
lives in there, and the checks of what can travel as source. Shared by `encode.py`,
`decode.py`, the decorator and the fix hints."""

from __future__ import annotations

import __future__
import importlib
import inspect
import sys
import types
from typing import Any

__all__ = [
    "FILE_PREFIX", "FUTURE_ANNOTATIONS", "REMOTE_ATTR", "REMOTE_MODULE", "is_envoy", "is_remote_decorated",
    "original_filename", "remote_filename", "resolve_qualname", "user_source_available",
]

REMOTE_ATTR = "__interlace_remote__"
def is_remote_decorated(obj: Any) -> bool:
    return REMOTE_ATTR in getattr(obj, "__dict__", {})


def remote_filename(filename: str, part: str | None = None) -> str:
    """Filename under which shipped source is compiled on the server (maps back by stripping).

    The block is compiled as `<interlace-remote:FILE>`; each shipped function or class from the
    same file gets its own name, `<interlace-remote:FILE>#PART`, so that registering its text
    in linecache does not replace the block's text (which nested `with` blocks are captured
    from) or another function's, and every traceback frame finds its own line.
    """
    base = filename if filename.startswith(FILE_PREFIX) else f"{FILE_PREFIX}{filename}>"
    if part is None:
        return base
    return base + "#" + "".join(c for c in part if c.isalnum() or c in "_:")


def original_filename(filename: str) -> str:
    """The user's filename for a name made by `remote_filename` (others are returned as is)."""
    if filename.startswith(FILE_PREFIX):
        inner, sep, _part = filename[len(FILE_PREFIX):].rpartition(">")
        if sep:
            return inner
    return filename


FILE_PREFIX = "<interlace-remote:"


def is_envoy(value: Any) -> bool:
    from ...tracing.envoy import Envoy

    return isinstance(value, Envoy)


def user_source_available(cls: type) -> bool:
    """True for the user's own classes: readable source outside the stdlib and installed packages
    (those must come by reference from a module the server allows, or not at all)."""
    root = (cls.__module__ or "").split(".")[0]
    if root in ("builtins",) or root in sys.stdlib_module_names:
        return False
    try:
        path = inspect.getsourcefile(cls) or ""
    except (OSError, TypeError):
        return False
    return "site-packages" not in path and "dist-packages" not in path


def resolve_qualname(module: str, qualname: str) -> Any:
    value: Any = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


FUTURE_ANNOTATIONS = __future__.annotations.compiler_flag


# Shipped classes report this module; it exists (empty) so that machinery which looks up a
# class's module, such as dataclasses resolving string annotations, finds one.
REMOTE_MODULE = "__interlace_remote__"
sys.modules.setdefault(REMOTE_MODULE, types.ModuleType(REMOTE_MODULE, "Namespace of code shipped to Interlace."))
