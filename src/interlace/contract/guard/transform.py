"""The AST transform every piece of shipped code is compiled after (layer 2 of the sandbox).

Design note
-----------
A subclass of RestrictedPython's `RestrictingNodeTransformer`: attribute loads become
`_getattr_(obj, "name")`, attribute and item stores and deletes go through `_write_(obj)`,
item loads through `_getitem_`, iteration and unpacking through `_getiter_` and RestrictedPython's
unpack guards (what those do is `access.py`). What differs from the stock transformer, and why:

- augmented assignment on subscripts and attributes is kept (`out[:, -1] += v`,
  `h.output[0][:] += 1` are activation patching, the core of research code): the target's
  object goes through `_write_`, the operation stays Python's own, so in-place tensor semantics
  are exactly a local run's. `n += 1` on a plain name stays native too (nothing to guard).
- names: `_` alone and private names (`_cache`) are the user's; names that start *and* end with
  `_` (`_getattr_`, dunders) are refused, because rebinding a guard would switch it off. The
  engine's own helpers (`__interlace_save__`, inserted by capture's rewrites before this runs)
  are allowed; the validator refuses them in the user's source (`codecheck.py`).
- `print` stays the builtin (the job's bounded log, `decode.restricted_builtins`), not
  RestrictedPython's `printed` collector.
- attribute names: `_` names are refused except the dunder methods a shipped class needs
  (`super().__init__()`), which `_getattr_` checks again at run time; the inspect attributes
  and `DENIED_ATTRIBUTES` are refused here already.
- class statements keep their own metaclass (RestrictedPython injects `__metaclass__`), refuse
  `metaclass=` and dunder methods beyond `SAFE_DUNDER_METHODS`.
- `nonlocal` and annotated assignments (dataclass fields) are allowed.
- `_tick_()` is inserted at the top of every loop body and function body, and as a condition
  of every comprehension: the job's wall-time and memory limits hold inside Python loops.
"""

from __future__ import annotations

import ast
from typing import Any

from RestrictedPython.transformer import RestrictingNodeTransformer, copy_locations

from ..policy import DENIED_ATTRIBUTES, INSPECT_ATTRIBUTES, RESERVED_PREFIX, SAFE_DUNDER_METHODS, SAFE_DUNDER_READS

__all__ = ["GuardTransformer", "guard_module", "GUARD_NAMES", "MSG_GUARD_SYNTAX"]

#: The names compiled shipped code calls (bound by `access.JobGuards.names`).
GUARD_NAMES = frozenset(
    {"_getattr_", "_getitem_", "_getiter_", "_write_", "_tick_", "_apply_", "_unpack_sequence_", "_iter_unpack_sequence_"}
)

MSG_GUARD_SYNTAX = "code that runs on the server may not do this: {errors}"

_ALLOWED_DUNDER_NAMES = SAFE_DUNDER_READS  # plain strings: `__name__`, `__file__`


def _tick(node: ast.AST) -> ast.Expr:
    call = ast.Expr(ast.Call(func=ast.Name("_tick_", ast.Load()), args=[], keywords=[]))
    copy_locations(call, node)
    return call


class GuardTransformer(RestrictingNodeTransformer):
    """RestrictedPython's transformer with Interlace's differences (see the module's note)."""

    def check_name(self, node: Any, name: str | None, allow_magic_methods: bool = False) -> None:
        if name is None or name == "_" or name.startswith(RESERVED_PREFIX) or name in _ALLOWED_DUNDER_NAMES:
            return
        if name.startswith("_") and name.endswith("_"):
            if allow_magic_methods and name in SAFE_DUNDER_METHODS:
                return
            self.error(node, f'"{name}" is a reserved name (names that start and end with "_" belong to Python and Interlace)')

    def visit_Name(self, node: ast.Name) -> Any:
        self.check_name(node, node.id)
        return node

    def visit_Module(self, node: ast.Module) -> Any:
        return self.node_contents_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        attr = node.attr
        if attr.startswith("_") and attr not in SAFE_DUNDER_METHODS and attr not in SAFE_DUNDER_READS:
            self.error(node, f'"{attr}" is an invalid attribute name because it starts with "_"')
        elif attr in INSPECT_ATTRIBUTES or attr in DENIED_ATTRIBUTES:
            self.error(node, f'"{attr}" is an attribute code on the server may not use')
        node = self.node_contents_visit(node)
        if isinstance(node.ctx, ast.Load):
            new = ast.Call(func=ast.Name("_getattr_", ast.Load()), args=[node.value, ast.Constant(attr)], keywords=[])
            copy_locations(new, node)
            return new
        wrapped = ast.Call(func=ast.Name("_write_", ast.Load()), args=[node.value], keywords=[])
        copy_locations(wrapped, node.value)
        node.value = wrapped
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        # (See the module's note: the stock transformer refuses subscript and attribute targets.)
        node.value = self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self.check_name(node.target, node.target.id)
        else:
            node.target = self.visit(node.target)  # Store context: `_write_(obj)[key]`, `_write_(obj).name`
        return node

    # Annotations are checked but not rewritten: under `from __future__ import annotations`
    # (how shipped classes are compiled) they are strings that dataclasses and typing read
    # (`ClassVar[int]` must stay `ClassVar[int]`, not `_getitem_(ClassVar, int)`); evaluated,
    # they can only do what the static checks allow (a call is to a guarded builtin).
    def _check_annotation(self, annotation: ast.AST | None) -> None:
        if annotation is None:
            return
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.Attribute):
                attr = sub.attr
                if attr.startswith("_") and attr not in SAFE_DUNDER_READS or attr in INSPECT_ATTRIBUTES or attr in DENIED_ATTRIBUTES:
                    self.error(sub, f'"{attr}" is an attribute code on the server may not use')
            elif isinstance(sub, ast.Name):
                self.check_name(sub, sub.id)
            elif isinstance(sub, (ast.Lambda, ast.NamedExpr, ast.comprehension)):
                self.error(sub, "annotations may only name types")

    def visit_AnnAssign(self, node: ast.AnnAssign) -> Any:
        self._check_annotation(node.annotation)
        node.target = self.visit(node.target)
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_arg(self, node: ast.arg) -> Any:
        self._check_annotation(node.annotation)
        return node

    def visit_Nonlocal(self, node: ast.Nonlocal) -> Any:
        for name in node.names:
            self.check_name(node, name)
        return node

    def visit_Global(self, node: ast.Global) -> Any:
        for name in node.names:
            self.check_name(node, name)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        self.check_name(node, node.name, allow_magic_methods=True)
        self.check_function_argument_names(node)
        returns, node.returns = node.returns, None
        self._check_annotation(returns)
        node = self.node_contents_visit(node)
        node.returns = returns
        at = 1 if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant) else 0
        node.body.insert(at, _tick(node))
        return node

    def visit_For(self, node: ast.For) -> Any:
        node = self.guard_iter(node)
        node.body.insert(0, _tick(node))
        return node

    def visit_While(self, node: ast.While) -> Any:
        node = self.node_contents_visit(node)
        node.body.insert(0, _tick(node))
        return node

    def visit_comprehension(self, node: ast.comprehension) -> Any:
        node = self.guard_iter(node)
        call = ast.Call(func=ast.Name("_tick_", ast.Load()), args=[], keywords=[])
        copy_locations(call, node.iter)
        node.ifs.insert(0, call)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> Any:
        self.check_name(node, node.name)
        if any(k.arg == "metaclass" for k in node.keywords):
            self.error(node, 'the keyword argument "metaclass" is not allowed')
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name.startswith("__") \
                    and stmt.name.endswith("__") and stmt.name not in SAFE_DUNDER_METHODS:
                self.error(stmt, f'defining "{stmt.name}" is not allowed (it runs outside your code\'s control)')
        return self.node_contents_visit(node)


def guard_module(module: ast.Module, filename: str = "<shipped>") -> ast.Module:
    """`module` transformed in place (and returned); a SyntaxError at the first refused line
    lists every problem."""
    errors: list[str] = []
    transformer = GuardTransformer(errors, [], {})
    transformer.visit(module)
    if errors:
        first = errors[0]
        lineno = _line_of(first)
        error = SyntaxError(MSG_GUARD_SYNTAX.format(errors="; ".join(errors)))
        error.filename, error.lineno = filename, lineno
        raise error
    ast.fix_missing_locations(module)
    return module


def _line_of(message: str) -> int | None:
    # RestrictedPython writes errors as 'Line N: ...'.
    head = message.split(":", 1)[0]
    try:
        return int(head.rsplit(" ", 1)[-1])
    except ValueError:
        return None
