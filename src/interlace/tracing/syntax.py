"""Parsing and compiling syntax trees, one thread at a time.

CPython 3.11 keeps the depth counter of its AST converter (C tree <-> `ast` objects, used by
`ast.parse` and by `compile` of an `ast` tree) in state that threads share, so two threads
converting at once can fail with `SystemError: AST constructor recursion depth mismatch`
(traces started in several threads at once, a server running jobs for two models). Every
such call in Interlace goes through here, under one lock. They happen once per call site
(captured blocks and their plans are cached) or once per request, never per forward, so
the lock costs nothing a trace repeats. (`compile` of source text does not convert `ast`
objects and needs no lock.)
"""

from __future__ import annotations

import ast
import threading
import types
from typing import Any

__all__ = ["compile_tree", "parse"]

_LOCK = threading.Lock()


def parse(source: str, filename: str = "<unknown>", mode: str = "exec") -> Any:
    """`ast.parse`, safe to call from several threads."""
    with _LOCK:
        return ast.parse(source, filename, mode)


def compile_tree(tree: ast.AST, filename: str, mode: str = "exec", *, dont_inherit: bool = False) -> types.CodeType:
    """`compile` of an `ast` tree, safe to call from several threads."""
    with _LOCK:
        return compile(tree, filename, mode, dont_inherit=dont_inherit)
