"""`with interlace.local():` blocks of a traced body, and the other spellings of hybrid runs.

Design note
-----------
A remote body runs on a server, but a local block inside it runs here, on the user's machine
(`contract/local_block.py` describes the conversation). Capture (`capture.py`) finds the
blocks in the body's syntax tree (`find_local_blocks`: `with <expr>.local():`, one item, no
arguments, anywhere in the body except inside a `def`, `lambda` or `class` of it, and never
one inside another), and for each keeps a `LocalBlockCode`: its statements compiled on their
own under the user's file name and lines (so a traceback shows the user's line), and what it
exchanges with the server:

- `reads`: names the block loads that the shipped body binds or uses (a value the server may
  hold: the server sends the ones bound to data when it reaches the block);
- `writes`: names the block assigns that the shipped body loads outside local blocks (the
  client sends them back and the server binds them).

Names only blocks use (`my_local_fn`, the tokenizer, a dataset) never leave this machine:
the shipped source (`shipped_source`) is the `with` statement's text with each block's body
replaced by `pass` and its other lines blank, so the server's line numbers stay the user's and
the outer-name analysis (`backends/outbound.py`) reads only what the server runs.

On the server, capture compiles each block's `with` statement as `__interlace_local__(line)`
(`rewrite_local_blocks`, in shipped code only: bodies compiled after a registered source
transform); the job binds that name to its side of the conversation. Run here (`remote=False`)
the `with` stays and `interlace.local()` is a context manager that does nothing: the block
just runs as part of the body.

The same module holds `rewrite_bare_all`: a bare `model.all()` (or `tracer.all()`) statement
at the top of a body means "the rest of the body runs at every step" (nnsight's spelling); it
becomes a step loop over the statements after it, except the empty accumulators right after
it (`tokens = interlace.list().save()`), which are made once, before the loop.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Callable, Final, Iterable, TypeVar

from ..errors import TracingError
from .syntax import compile_tree

__all__ = [
    "LOCAL_HELPER", "ALL_HELPER", "STEP_NAME", "LOCAL_ONLY_ATTR", "LocalBlockCode", "List", "local", "trace",
    "is_local_only", "find_local_blocks", "local_block_codes", "shipped_lines", "shipped_text", "rewrite_local_blocks",
    "rewrite_bare_all", "MSG_LOCAL_IN_DEF", "MSG_LOCAL_NESTED", "MSG_LOCAL_AS", "MSG_LOCAL_WITH_OTHERS",
    "MSG_LOCAL_JUMP", "MSG_LOCAL_SYNTAX",
]

#: The name a shipped body's local block compiles to a call of: `__interlace_local__(line)`.
#: Reserved (`contract.policy.RESERVED_PREFIX`): user code cannot name it, the guard keeps it.
LOCAL_HELPER: Final = "__interlace_local__"
#: The helper a bare `model.all()` statement's step loop iterates (`namespace.every_step`).
ALL_HELPER: Final = "__interlace_all__"
#: That loop's variable (reserved, so it never meets a user's name).
STEP_NAME: Final = "__interlace_step__"
#: Set on functions (and classes) marked `@interlace.trace`: they run only inside local blocks.
LOCAL_ONLY_ATTR: Final = "__interlace_local_only__"

MSG_LOCAL_IN_DEF: Final = (
    "{where}: `with {head}:` inside a function or class of a traced body is not supported: a local "
    "block runs on your machine when the body reaches it, and a function of the body may run "
    "anywhere. Put the block in the body itself and call the function inside it:\n\n"
    "    with model.trace(x, remote=True):\n"
    "        h = model.layer.output\n"
    "        with interlace.local():\n"
    "            h = my_function(h)"
)
MSG_LOCAL_NESTED: Final = (
    "{where}: a local block inside another local block: the outer one already runs on your "
    "machine. Remove the inner `with {head}:` and keep its statements."
)
MSG_LOCAL_AS: Final = (
    "{where}: `with {head} as ...:` binds nothing: a local block has no value. Write it without "
    "`as`:\n\n    with interlace.local():\n        ..."
)
MSG_LOCAL_WITH_OTHERS: Final = (
    "{where}: `{head}` must be the only item of its `with` statement (a local block runs on your "
    "machine, the other context managers on the server). Nest them:\n\n"
    "    with interlace.local():\n        with other():\n            ..."
)
MSG_LOCAL_JUMP: Final = (
    "{where}: `{what}` inside a local block cannot leave it: the block runs on its own, on your "
    "machine, apart from the body around it. Set a variable in the block and act on it after "
    "the block:\n\n"
    "    with interlace.local():\n        done = check(h)\n    if done:\n        {what}"
)
MSG_LOCAL_SYNTAX: Final = "{where}: this statement cannot run inside a local block: {error}"


# -- the face: `interlace.local()`, `@interlace.trace`, `interlace.list()` -------------------

_NOTHING_TO_DO = contextlib.nullcontext()


def local() -> contextlib.AbstractContextManager[None]:
    """`with interlace.local():` inside a trace: the block runs on your machine.

    In a remote trace the block's code never goes to the server: the server sends the values
    the block reads, the block runs here, and the names it assigns go back. Run here
    (`remote=False`), or outside a trace, it does nothing and the block simply runs."""
    return _NOTHING_TO_DO


F = TypeVar("F", bound=Callable[..., Any])


def trace(function: F) -> F:
    """`@interlace.trace`: a function that runs only here, inside `with interlace.local():`.

    The function itself is returned (it is called as usual); it is only marked so that a
    remote body that uses it outside a local block is refused before anything is sent,
    instead of shipping the function's code."""
    try:
        setattr(function, LOCAL_ONLY_ATTR, True)
    except (AttributeError, TypeError):
        raise TypeError(
            f"@interlace.trace marks functions and classes, not {type(function).__name__} objects. "
            "Decorate a `def`:\n\n    @interlace.trace\n    def my_fn(x):\n        ..."
        ) from None
    return function


def is_local_only(value: Any) -> bool:
    """Whether `value` was marked `@interlace.trace`."""
    return getattr(value, "__dict__", {}).get(LOCAL_ONLY_ATTR) is True


class List(list):  # type: ignore[type-arg]
    """`interlace.list()`: a list whose `append` and `extend` return the list itself, so that
    `tokens.append(t).save()` reads as in nnsight. Everything else is the built-in list's, and
    it travels (and is saved) as a plain list."""

    __slots__ = ()

    def append(self, item: Any) -> "List":  # type: ignore[override]
        list.append(self, item)
        return self

    def extend(self, items: Iterable[Any]) -> "List":  # type: ignore[override]
        list.extend(self, items)
        return self


# -- finding blocks --------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalBlockCode:
    """One local block of a captured body (client side: its code runs here)."""

    #: The `with` line in the user's file: the key the server and the client share.
    line: int
    filename: str
    #: The block's statements as module-level code (the user's file name and lines), run as
    #: plain Python: no `.save()` rewrite, no guard.
    code: types.CodeType
    #: Names the block loads that the shipped body binds or uses (see the module's note).
    reads: tuple[str, ...]
    #: Names the block assigns that the shipped body loads outside local blocks.
    writes: tuple[str, ...]
    #: Every name the block assigns.
    assigned: tuple[str, ...]


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _is_local_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "local"
            and not node.args and not node.keywords)


def _head(node: ast.expr) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # noqa: BLE001 - only for a message
        return "interlace.local()"


def find_local_blocks(body: list[ast.stmt], filename: str) -> list[ast.With]:
    """The body's local blocks, outermost first, in source order. Raises TracingError (with
    the fix) for one inside a `def`/`lambda`/`class` of the body, one inside another, one with
    `as`, or one sharing its `with` with other context managers."""
    found: list[ast.With] = []
    stack: list[tuple[ast.AST, bool, bool]] = [(stmt, False, False) for stmt in reversed(body)]
    while stack:
        node, in_def, in_local = stack.pop()
        if isinstance(node, ast.With):
            locals_ = [item for item in node.items if _is_local_call(item.context_expr)]
            if locals_:
                where = f"{filename}:{node.lineno}"
                head = _head(locals_[0].context_expr)
                if len(node.items) > 1:
                    raise TracingError(MSG_LOCAL_WITH_OTHERS.format(where=where, head=head))
                if node.items[0].optional_vars is not None:
                    raise TracingError(MSG_LOCAL_AS.format(where=where, head=head))
                if in_def:
                    raise TracingError(MSG_LOCAL_IN_DEF.format(where=where, head=head))
                if in_local:
                    raise TracingError(MSG_LOCAL_NESTED.format(where=where, head=head))
                found.append(node)
                _reject_jumps(node, filename)
                in_local = True
        inner_def = in_def or isinstance(node, _SCOPES)
        stack.extend((child, inner_def, in_local) for child in reversed(list(ast.iter_child_nodes(node))))
    return found


def _reject_jumps(block: ast.With, filename: str) -> None:
    """`break`/`continue`/`return` that would leave the block (its code runs on its own)."""
    stack: list[tuple[ast.AST, bool]] = [(stmt, False) for stmt in block.body]
    while stack:
        node, in_loop = stack.pop()
        if isinstance(node, _SCOPES):
            continue
        if isinstance(node, ast.Return) or (isinstance(node, (ast.Break, ast.Continue)) and not in_loop):
            what = {ast.Return: "return", ast.Break: "break", ast.Continue: "continue"}[type(node)]
            raise TracingError(MSG_LOCAL_JUMP.format(where=f"{filename}:{node.lineno}", what=what))
        loop = isinstance(node, (ast.For, ast.AsyncFor, ast.While))
        for child in ast.iter_child_nodes(node):
            # A loop's own `else` is outside it for `break`; close enough: both are refused
            # only when no loop of the block encloses them.
            stack.append((child, in_loop or loop))


# -- names -----------------------------------------------------------------------------------


def _params(args: ast.arguments) -> set[str]:
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    return names | {a.arg for a in (args.vararg, args.kwarg) if a is not None}


def _binds(node: ast.AST) -> set[str]:
    """Names a node binds in its own scope (a def's name, not what its body binds)."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
        return {node.id}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    if isinstance(node, ast.ExceptHandler) and node.name:
        return {node.name}
    if isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
        return {node.name}
    if isinstance(node, ast.MatchMapping) and node.rest:
        return {node.rest}
    return set()


def _scope_names(nodes: Iterable[ast.AST], skip: frozenset[int] = frozenset()) -> tuple[set[str], set[str]]:
    """(names loaded, names bound) at the scope of `nodes`: a nested function's, lambda's or
    comprehension's own names are left out, its free names counted as loads. Nodes whose id is
    in `skip` (local blocks' `with` statements) count only for their header."""
    loads: set[str] = set()
    stores: set[str] = set()
    stack: list[ast.AST] = list(nodes)
    while stack:
        node = stack.pop()
        if id(node) in skip:
            stack.extend(item.context_expr for item in node.items)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else stores).add(node.id)
            continue
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            loads.add(node.target.id)  # `x += 1` reads x
        stores |= _binds(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            stack.extend(args.defaults + [d for d in args.kw_defaults if d is not None])
            stack.extend(getattr(node, "decorator_list", []))
            body = node.body if isinstance(node.body, list) else [node.body]
            inner_loads, inner_stores = _scope_names(body, skip)
            loads |= inner_loads - inner_stores - _params(args)
            continue
        if isinstance(node, ast.ClassDef):
            stack.extend(node.bases + [k.value for k in node.keywords] + node.decorator_list)
            inner_loads, inner_stores = _scope_names(node.body, skip)
            loads |= inner_loads  # (a class body's names are its attributes, not the scope's)
            continue
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            gens = node.generators
            stack.append(gens[0].iter)  # evaluated in the enclosing scope
            inner: list[ast.AST] = [g.iter for g in gens[1:]] + [c for g in gens for c in g.ifs]
            inner += [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            targets = set().union(*(_scope_names([g.target])[1] for g in gens))
            inner_loads, inner_stores = _scope_names(inner, skip)
            loads |= inner_loads - targets
            # (a walrus in a comprehension binds in the enclosing scope)
            stores |= inner_stores - targets
            continue
        stack.extend(ast.iter_child_nodes(node))
    return loads, stores


_BUILTINS = frozenset(dir(builtins))


def local_block_codes(body: list[ast.stmt], blocks: list[ast.With], filename: str,
                      as_name: str | None) -> tuple[LocalBlockCode, ...]:
    """A `LocalBlockCode` for each of `blocks` (from `find_local_blocks(body, ...)`), compiled
    from the statements as they are (call before any rewrite changes them)."""
    skip = frozenset(id(b) for b in blocks)
    outside_loads, outside_binds = _scope_names(body, skip)
    # A builtin the body uses (`len`) is no value of the body's, unless the body rebinds it.
    server_names = outside_binds | (outside_loads - _BUILTINS)
    if as_name:
        server_names.discard(as_name)  # the tracer: the client has its own
    codes = []
    for block in blocks:
        loads, assigned = _scope_names(block.body)
        module = ast.Module(body=list(block.body), type_ignores=[])
        try:
            code = compile_tree(module, filename, dont_inherit=True)
        except SyntaxError as e:  # `yield`, `nonlocal`, `await` at block level
            raise TracingError(MSG_LOCAL_SYNTAX.format(where=f"{filename}:{e.lineno}", error=e.msg)) from None
        codes.append(LocalBlockCode(
            line=block.lineno,
            filename=filename,
            code=code,
            reads=tuple(sorted(loads & server_names)),
            writes=tuple(sorted(assigned & outside_loads)),
            assigned=tuple(sorted(assigned)),
        ))
    return tuple(codes)


# -- the shipped text and the server's rewrite ------------------------------------------------


def shipped_lines(lines: list[str], blocks: list[ast.With]) -> list[str]:
    """A copy of the file's `lines` (index 0 is line 1) with each block's body replaced by
    `pass` (where its first statement starts) and its other lines blank: the same line numbers,
    none of the block's code."""
    out = list(lines)
    for block in blocks:
        first = block.body[0]
        start, end = first.lineno, block.end_lineno or first.lineno
        text = out[start - 1]
        # (`col_offset` counts UTF-8 bytes; the body may share the `with` line)
        prefix = text.encode("utf-8")[: first.col_offset].decode("utf-8", "replace")
        out[start - 1] = prefix + "pass\n"
        for i in range(start, end):
            out[i] = "\n"
    return out


def shipped_text(chunk: list[str], first_lineno: int, blocks: list[ast.With]) -> str:
    """The dedented `with` statement text whose file lines start at `first_lineno`, blocks emptied."""
    padded = [""] * (first_lineno - 1) + chunk
    return textwrap.dedent("".join(shipped_lines(padded, blocks)[first_lineno - 1:]))


class _LocalRewriter(ast.NodeTransformer):
    def __init__(self, blocks: frozenset[tuple[int, int]]) -> None:
        self.blocks = blocks

    def visit_With(self, node: ast.With) -> ast.AST:
        if (node.lineno, node.col_offset) in self.blocks:
            call = ast.Call(func=ast.Name(id=LOCAL_HELPER, ctx=ast.Load()), args=[ast.Constant(node.lineno)], keywords=[])
            return ast.copy_location(ast.Expr(value=ast.copy_location(call, node)), node)
        self.generic_visit(node)
        return node


def rewrite_local_blocks(body: list[ast.stmt], blocks: list[ast.With]) -> list[ast.stmt]:
    """A copy of `body` in which each block is the statement `__interlace_local__(<line>)`
    (shipped code: the server's side of the conversation runs there)."""
    where = frozenset((b.lineno, b.col_offset) for b in blocks)
    rewriter = _LocalRewriter(where)
    return [rewriter.visit(stmt) for stmt in copy.deepcopy(body)]


# -- a bare `model.all()` ---------------------------------------------------------------------


def _bare_all(stmt: ast.stmt) -> ast.Name | None:
    """The `X` of a statement `X.all()` (X a plain name, no arguments)."""
    if not isinstance(stmt, ast.Expr):
        return None
    call = stmt.value
    if (isinstance(call, ast.Call) and not call.args and not call.keywords and isinstance(call.func, ast.Attribute)
            and call.func.attr == "all" and isinstance(call.func.value, ast.Name)):
        return call.func.value
    return None


def _empty_list(node: ast.expr) -> bool:
    """`[]`, `list()`, `interlace.list()` (any `X.list()`), each maybe `.save()`d or in `save(...)`."""
    if isinstance(node, ast.Call) and not node.keywords:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "save" and not node.args:
            return _empty_list(func.value)
        if len(node.args) == 1 and (isinstance(func, ast.Attribute) and func.attr == "save"
                                    or isinstance(func, ast.Name) and func.id == "save"):
            return _empty_list(node.args[0])
        if not node.args and (isinstance(func, ast.Name) and func.id == "list"
                              or isinstance(func, ast.Attribute) and func.attr == "list" and isinstance(func.value, ast.Name)):
            return True
    return isinstance(node, ast.List) and not node.elts


def _made_once(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and _empty_list(stmt.value))


def rewrite_bare_all(body: list[ast.stmt]) -> list[ast.stmt] | None:
    """`body` with the statements after its first top-level `X.all()` in a step loop
    (`for __interlace_step__ in __interlace_all__(X, "X"):`), the empty lists made right after it
    before the loop; None when the body has no such statement. `body` is not changed."""
    for i, stmt in enumerate(body):
        owner = _bare_all(stmt)
        if owner is None:
            continue
        j = i + 1
        while j < len(body) and _made_once(body[j]):
            j += 1
        rest = body[j:] or [ast.copy_location(ast.Pass(), stmt)]
        args: list[ast.expr] = [ast.Name(id=owner.id, ctx=ast.Load()), ast.Constant(owner.id)]
        call = ast.Call(func=ast.Name(id=ALL_HELPER, ctx=ast.Load()), args=args, keywords=[])
        loop = ast.For(target=ast.Name(id=STEP_NAME, ctx=ast.Store()), iter=call, body=list(rest), orelse=[])
        for node in (loop, call, call.func, *args, loop.target):
            ast.copy_location(node, stmt)
        return list(body[:i]) + list(body[i + 1 : j]) + [loop]
    return None
