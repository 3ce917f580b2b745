"""What the caller's scope gets for a name the trace body assigned but did not save.

Only saved values leave the outermost trace (in every mode; remote runs send back nothing
else). Leaving the other names unbound gave a bare `UnboundLocalError`/`NameError` at some
later line, or silently kept an older value of the same name. Instead each such name is bound
to a `NotSaved` placeholder, which raises `NotSavedError` (an `UnboundLocalError` too) as
soon as it is used, naming the line that assigned it and showing the `.save()` to add. Its
`repr` says the same without raising, so a notebook or debugger can still show it.

A name the body saves but whose saving line did not run is left alone (its earlier value, or
unbound), as nnsight and plain Python leave it (see `unsaved_placeholders`).

The placeholders are made from the block's source and the names that came back, never from
what the body did at run time, so all three modes bind the same names the same way.
"""

from __future__ import annotations

import ast
import linecache
from typing import TYPE_CHECKING, Any

from ..errors import NotSavedError
from .placeholder import Placeholder
from .syntax import parse

if TYPE_CHECKING:
    from .capture import Block

__all__ = ["NotSaved", "unsaved_placeholders"]


class NotSaved(Placeholder):
    error = NotSavedError
    __slots__ = ("_name", "_block")

    def __init__(self, name: str, block: "Block") -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_block", block)

    def _message(self) -> str:
        name, block = self._name, self._block
        node = _last_assignment(block, name)
        where = f"{block.filename}:{node.lineno}" if node is not None else block.filename
        return (
            f"`{name}` was assigned in the trace at {where} but not saved, so it has no value "
            "after the block: only saved values leave a trace (in every mode). Save it where it "
            f"is assigned:\n\n    {_fix(block, name, node)}"
        )

    def __repr__(self) -> str:
        return f"<{self._name}: assigned in the trace but not saved; use `{self._name} = ....save()`>"


def unsaved_placeholders(block: "Block", values: dict[str, Any]) -> dict[str, NotSaved]:
    """A placeholder for each name the body assigns that is not among `values` (what the
    trace binds: its saved values).

    A name the source saves (`x = ....save()`) whose saving line did not run (a branch not
    taken, a `tracer.stop()` before it, a generation that ended first) gets none: it keeps
    what it had before the block, or stays unbound, as in nnsight and plain Python, so
    `x = None` before the trace is the default and using an unbound one raises Python's own
    `UnboundLocalError`/`NameError` (nnsight's tests check exactly that)."""
    hit = _candidates.get(id(block))
    if hit is None or hit[0] is not block:
        if len(_candidates) > 4096:
            _candidates.clear()
        hit = _candidates[id(block)] = (block, _placeholder_names(block))
    saved = block.saved_names
    return {name: NotSaved(name, block) for name in hit[1] if name not in values and name not in saved}


_candidates: dict[int, tuple["Block", tuple[str, ...]]] = {}


def _placeholder_names(block: "Block") -> tuple[str, ...]:
    """The names a placeholder may stand for: those the body assigns, but not its `as` name,
    reserved names, or names only an import binds (`import torch` in a notebook cell's trace
    must not hide the module the cell already had)."""
    imported: set[str] = set()
    assigned: set[str] = set()
    for stmt in block.statements:
        for node in ast.walk(stmt):
            if isinstance(node, ast.alias):
                imported.add(node.asname or node.name.partition(".")[0])
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                assigned.add(node.id)
    return tuple(sorted(
        name for name in block.stored_names
        if name != block.as_name and not name.startswith("__") and (name in assigned or name not in imported)
    ))


def _last_assignment(block: "Block", name: str) -> ast.AST | None:
    """The last statement or node in the body's source that binds `name` (for its line)."""
    best: ast.AST | None = None
    for stmt in block.statements:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
                hit: ast.AST = node
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                hit = node
            elif isinstance(node, ast.alias) and (node.asname or node.name.partition(".")[0]) == name:
                hit = node
            else:
                continue
            if best is None or hit.lineno >= best.lineno:  # type: ignore[attr-defined]
                best = hit
    if best is None:
        return None
    # The whole assignment, when the name is its only target (for the suggested fix).
    for stmt in block.statements:
        for node in ast.walk(stmt):
            if (
                isinstance(node, ast.Assign) and len(node.targets) == 1 and node.targets[0] is best
            ) or (isinstance(node, ast.AnnAssign) and node.target is best and node.value is not None):
                return node
    return best


def _fix(block: "Block", name: str, node: ast.AST | None) -> str:
    """`name = <its expression>.save()` when the assignment is one line, else a general form."""
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and node.lineno == node.end_lineno:
        line = linecache.getline(block.filename, node.lineno)
        value = node.value
        # (AST offsets count UTF-8 bytes)
        raw = line.encode()
        expr = raw[value.col_offset : value.end_col_offset].decode(errors="replace") if value.end_col_offset is not None else ""
        if expr.strip():
            try:
                parse(expr, mode="eval")
            except SyntaxError:
                pass
            else:
                bare = (ast.Name, ast.Attribute, ast.Subscript, ast.Call, ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
                if not (isinstance(value, bare) or (isinstance(value, ast.Constant) and isinstance(value.value, str))):
                    expr = f"({expr})"
                return f"{name} = {expr}.save()"
    return f"{name} = ....save()        # or, after it is assigned: {name} = interlace.save({name})"
