"""Turn the body of a `with model.trace(...)` block into a code object.

Design note
-----------
Python runs the body of a `with` statement right after `__enter__`, but a trace must run it
*beside* the model's forward, later. So `__enter__` reads the source of the block (linecache
covers files, IPython and Jupyter cells, and sources we register ourselves for remote jobs),
finds the `With` node by line number, compiles its body once per call site, and then stops
Python from running the body itself (see `BodySkipper`).

The body is compiled as module-level code and executed with `exec(code, namespace)`. Every
assignment in the body lands in that namespace dict, so values survive early stops and errors,
several invokes can share variables through it, and after the run we pick out exactly the
saved names. Line numbers and the filename are the user's own, so tracebacks and linecache
point at the user's lines with no remapping.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import dis
import linecache
import sys
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import SourceNotFoundError, TracingError
from .backward import BACKWARD_HELPER, rewrite_backward  # `with loss.backward():` blocks
from .frames import bind_from_trace_callback
from .local_block import (  # `with interlace.local():` blocks, a bare `model.all()`
    ALL_HELPER, STEP_NAME, LocalBlockCode, find_local_blocks, local_block_codes, rewrite_bare_all,
    rewrite_local_blocks, shipped_text,
)
from .reads import Read, Segment, body_segments, first_output_read
from .syntax import compile_tree, parse

__all__ = ["Block", "BodySkipper", "capture_block", "block_from_source", "SkipBody", "SAVE_HELPER",
           "register_source_transform"]

#: Name under which the `.save()` rewrite calls the save function inside compiled bodies.
SAVE_HELPER = "__interlace_save__"


@dataclass(frozen=True)
class Block:
    """One `with` block, compiled.

    `source` is the dedented text of the whole `with` statement and `first_lineno` the line
    it starts on in `filename`; `shipped_source` (the same text without the code of its local
    blocks) and `first_lineno` are what travels to a server, which rebuilds the Block with
    `block_from_source`.
    """

    filename: str
    first_lineno: int
    source: str
    code: types.CodeType
    loaded_names: tuple[str, ...]
    stored_names: frozenset[str]
    as_name: str | None
    is_empty: bool
    saved_names: frozenset[str] = frozenset()
    #: The body's first act, when it is reading a module's output through a plain path
    #: (`reads.first_output_read`): the interleaver can then start the body when that value
    #: arrives instead of before the forward (one greenlet round trip less).
    first_read: Read | None = None
    #: The body as statements that run inline, without a greenlet, if it is made only of
    #: such statements (`reads.body_segments`).
    segments: tuple[Segment, ...] | None = None
    #: Compiled after a registered source transform (shipped code: `register_source_transform`).
    guarded: bool = False
    #: The compiled (rewritten) statements, for `rest_code`.
    statements: tuple[ast.stmt, ...] = field(default=(), compare=False, repr=False)
    _rest: dict[int, types.CodeType] = field(default_factory=dict, compare=False, repr=False)
    #: The body's `with interlace.local():` blocks (`local_block.py`), outermost first: their
    #: code runs on the client of a remote trace.
    local_blocks: tuple[LocalBlockCode, ...] = ()
    #: `source` as it travels: each local block's body replaced by `pass`, its other lines
    #: blank (the same line numbers). Empty for "the same as `source`" (see `shipped_source`).
    _shipped: str = field(default="", compare=False, repr=False)

    @property
    def shipped_source(self) -> str:
        """The text a server gets: `source` without the local blocks' code."""
        return self._shipped or self.source

    def rest_code(self, position: int) -> types.CodeType:
        """The body from statement `position` on: where a greenlet takes over from inline
        statements (`Interleaver.run_inline`)."""
        if position == 0:
            return self.code
        code = self._rest.get(position)
        if code is None:
            module = ast.Module(body=list(self.statements[position:]), type_ignores=[])
            code = self._rest[position] = compile_tree(module, self.filename, dont_inherit=True)
        return code


class SkipBody(Exception):
    """Raised by the trace function to stop Python from running a captured body."""


#: (file name prefix, transform): a body compiled under a file name with that prefix is
#: compiled after `transform(module, filename)` (the execution layer registers the sandbox's
#: guard for shipped code, whose file names start with `<interlace-remote:`; that covers nested
#: `with` blocks captured while shipped code runs, too). Consulted only when a block is
#: compiled, never on a cached capture: a local trace pays nothing.
SourceTransform = Callable[[ast.Module, str], ast.Module]
_SOURCE_TRANSFORMS: list[tuple[str, SourceTransform]] = []


def register_source_transform(prefix: str, transform: SourceTransform) -> None:
    """Compile every body whose file name starts with `prefix` after `transform` (once per
    prefix; registering again replaces it)."""
    _SOURCE_TRANSFORMS[:] = [(p, t) for p, t in _SOURCE_TRANSFORMS if p != prefix] + [(prefix, transform)]
    _block_cache.clear()
    _source_cache.clear()


def _transform_for(filename: str) -> SourceTransform | None:
    for prefix, transform in _SOURCE_TRANSFORMS:
        if filename.startswith(prefix):
            return transform
    return None


_block_cache: dict[tuple[int, int], tuple[types.CodeType, list[str], Block]] = {}
_BLOCK_CACHE_LIMIT = 4096  # call sites; a full cache starts over
_tree_cache: dict[str, tuple[list[str], ast.Module | None]] = {}


def capture_block(frame: types.FrameType, what: str = "model.trace(...)") -> Block:
    """Find and compile the `with` block that `frame` is entering."""
    code = frame.f_code
    filename = code.co_filename
    entry = linecache.cache.get(filename)  # linecache.getlines's cached case, without the call
    lines = entry[2] if entry is not None and len(entry) != 1 else linecache.getlines(filename, frame.f_globals)
    # A call site is its code object and f_lasti (which tells apart the items of one
    # `with a() as x, b() as y:`), so a hit needs no line number (`f_lineno` scans the line
    # table); the same `lines` list means linecache has not re-read the file since.
    key = (id(code), frame.f_lasti)
    hit = _block_cache.get(key)
    if hit is not None and hit[0] is code and hit[1] is lines:
        return hit[2]
    lineno = frame.f_lineno
    if not lines:
        raise SourceNotFoundError(_no_source_message(filename, lineno, what))
    tree = _parse_file(filename, lines)
    if tree is None:
        raise SourceNotFoundError(
            f"Interlace could not parse the source of {filename} to find the block at line "
            f"{lineno}. Check that the file on disk matches the code that is running "
            "(save the file and restart, or re-run the notebook cell)."
        )
    node = _find_with(tree, lineno)
    if node is None:
        raise SourceNotFoundError(
            f"Interlace could not find the `with {what}:` block at {filename}:{lineno}. "
            "The file may have changed since it was imported; re-run it. A trace must be "
            "entered directly by a `with` statement:\n\n    with " + what + " as tracer:\n        ..."
        )
    block = _compile_with_node(node, lines, filename)
    as_name = _as_target(frame)
    if as_name is not _UNKNOWN and as_name != block.as_name:
        block = dataclasses.replace(block, as_name=as_name)
    if len(_block_cache) >= _BLOCK_CACHE_LIMIT:
        _block_cache.clear()
    _block_cache[key] = (code, lines, block)
    return block


_UNKNOWN: Any = object()
_STORE_TARGET_OPS = {"STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF"}


def _as_target(frame: types.FrameType) -> Any:
    """The `as` name of the `with` item whose `__enter__` `frame` is calling (None if it has
    none, `_UNKNOWN` if the bytecode does not say).

    The AST alone cannot tell which item of `with torch.no_grad() as g, model.trace(x) as t:`
    is the tracer; the instruction right after the `__enter__` call stores that item's target.
    """
    lasti = frame.f_lasti
    for ins in dis.get_instructions(frame.f_code):
        if ins.offset > lasti:
            if ins.opname in _STORE_TARGET_OPS:
                return ins.argval
            return None if ins.opname == "POP_TOP" else _UNKNOWN
    return _UNKNOWN


def block_from_source(source: str, filename: str, first_lineno: int) -> Block:
    """Rebuild a Block from the dedented `with` statement text (the server side).

    The text is registered in linecache under `filename` (padded so line numbers match the
    user's), which lets invokes and nested traces inside the body be captured the same way.
    """
    text = "\n" * (first_lineno - 1) + source
    if not text.endswith("\n"):
        text += "\n"
    hit = _source_cache.get((filename, text))
    if hit is not None:
        linecache.cache[filename] = (len(text), None, hit[0], filename)
        return hit[1]
    lines = text.splitlines(keepends=True)
    linecache.cache[filename] = (len(text), None, lines, filename)
    tree = _parse_file(filename, lines)
    if tree is None or not tree.body or not isinstance(tree.body[0], (ast.With, ast.AsyncWith)):
        raise TracingError(f"The traced source for {filename}:{first_lineno} is not a `with` statement.")
    block = _compile_with_node(tree.body[0], lines, filename)
    if len(_source_cache) > 1024:
        _source_cache.clear()
    # Keep the very `lines` list: capture_block's cache for nested withs is keyed on it.
    _source_cache[(filename, text)] = (lines, block)
    return block


_source_cache: dict[tuple[str, str], tuple[list[str], Block]] = {}


def _no_source_message(filename: str, lineno: int, what: str) -> str:
    return (
        f"Interlace needs the source code of the `with {what}:` block, but none is available "
        f"for {filename} (line {lineno}). This happens in the plain `python` REPL, with "
        "`python -c`, and for code built with exec(). Put the code in a .py file, a Jupyter "
        "notebook cell or an IPython session, or register its text with "
        "`linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)`."
    )


def _parse_file(filename: str, lines: list[str]) -> ast.Module | None:
    hit = _tree_cache.get(filename)
    if hit is not None and hit[0] is lines:
        return hit[1]
    try:
        tree: ast.Module | None = parse("".join(lines), filename)
    except SyntaxError:
        tree = None
    _tree_cache[filename] = (lines, tree)
    return tree


def _find_with(tree: ast.Module, lineno: int) -> ast.With | ast.AsyncWith | None:
    """The innermost `with` whose header (not body) spans `lineno`."""
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            header_end = node.body[0].lineno if node.body[0].lineno > node.lineno else node.lineno
            first_item = node.items[0].context_expr
            if node.lineno <= lineno <= max(header_end, first_item.end_lineno or node.lineno):
                if best is None or node.lineno >= best.lineno:
                    best = node
    return best


class _SaveRewriter(ast.NodeTransformer):
    """`x.save()` becomes `__interlace_save__(x)`, so any object can be saved without
    patching `object` (the peer mounts a method on every Python object with a C extension)."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "save" and not node.args and not node.keywords:
            call = ast.Call(func=ast.Name(id=SAVE_HELPER, ctx=ast.Load()), args=[func.value], keywords=[])
            return ast.copy_location(call, node)
        return node


def _reject_returns(body: list[ast.stmt], filename: str) -> None:
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            if isinstance(node, ast.Return) and _top_level(stmt, node):
                raise TracingError(
                    f"{filename}:{node.lineno}: `return` inside a traced block is not supported, "
                    "because the block runs beside the model, not in your function. Save the "
                    "value and return it after the block:\n\n"
                    "    with model.trace(x):\n        h = model.layer.output.save()\n    return h"
                )


def _top_level(stmt: ast.stmt, target: ast.AST) -> bool:
    """True when `target` is not inside a nested function or class of `stmt`."""
    stack: list[ast.AST] = [stmt]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        # A `return` inside a def/lambda/class (the body statement itself may be a `def`) is that
        # function's own and is fine.
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def _compile_with_node(node: ast.With | ast.AsyncWith, lines: list[str], filename: str) -> Block:
    first = node.lineno
    last = node.end_lineno or first
    chunk = list(lines[first - 1 : last])
    # A `with` may sit after other code on its first line (`x = 1; with ...`): blank that out.
    chunk[0] = " " * node.col_offset + chunk[0][node.col_offset :]
    source = textwrap.dedent("".join(chunk))
    as_name = None
    for item in node.items:
        if isinstance(item.optional_vars, ast.Name):
            as_name = item.optional_vars.id
            break
    body = node.body
    is_empty = all(isinstance(s, ast.Pass) for s in body)
    _reject_returns(body, filename)
    saved_names = _statically_saved(body)
    transform = _transform_for(filename) if _SOURCE_TRANSFORMS else None
    local_blocks: tuple[LocalBlockCode, ...] = ()
    shipped = ""
    if ".local" in source:  # (the text check keeps bodies without local blocks as fast as before)
        found = find_local_blocks(body, filename)
        if found:
            # Before any rewrite: the blocks' code is the user's, as written.
            local_blocks = local_block_codes(body, found, filename, as_name)
            shipped = shipped_text(chunk, first, found)
            # Shipped code: each block is the server's side of it. Here the block stays, on a copy:
            # the rewrites below change statements in place, and the cached tree must keep the
            # blocks' code as written for a later compile of them.
            body = rewrite_local_blocks(body, found) if transform is not None else copy.deepcopy(body)
    if ".all()" in source:
        body = rewrite_bare_all(body) or body
    module = ast.Module(body=[_SaveRewriter().visit(rewrite_backward(s)) for s in body], type_ignores=[])
    ast.fix_missing_locations(module)
    first_read = first_output_read(module.body[0]) if module.body else None
    plain = module
    try:
        if transform is not None:  # after the engine's rewrites, whose helpers it keeps
            module = transform(copy.deepcopy(module), filename)
        code = compile_tree(module, filename, dont_inherit=True)
    except SyntaxError as e:  # e.g. `yield` or `nonlocal` at block level
        raise TracingError(f"{filename}:{e.lineno}: this statement cannot run inside a traced block: {e.msg}") from None
    loaded, stored = _names(code)
    # (The analysis reads the engine's own statements; what it compiles is transformed too.)
    segments = body_segments(plain.body, filename, stored, SAVE_HELPER, transform)
    return Block(
        filename=filename,
        first_lineno=first,
        source=source,
        code=code,
        loaded_names=tuple(sorted(loaded)),
        stored_names=frozenset(stored),
        as_name=as_name,
        is_empty=is_empty,
        saved_names=saved_names,
        first_read=first_read,
        segments=segments,
        guarded=transform is not None,
        statements=tuple(module.body),
        local_blocks=local_blocks,
        _shipped=shipped,
    )


def _is_save_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "save":
        return True  # x.save() or interlace.save(x)
    return isinstance(func, ast.Name) and func.id == "save"


def _statically_saved(body: list[ast.stmt]) -> frozenset[str]:
    """Names the source visibly saves: `n = <...>.save()`, `n = save(...)`, `save(n)`, `n.save()`.

    Saving is by object identity, and Python shares small ints, None, True and short strings
    between unrelated names; for such values only these names are returned to the caller, so
    an unsaved `k = 3` never leaks because some `n = interlace.save(3)` holds the same object.
    """
    names: set[str] = set()
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and _is_save_call(node.value):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif _is_save_call(node):
                call = node  # type: ignore[assignment]
                args = list(call.args)  # type: ignore[attr-defined]
                if isinstance(call.func, ast.Attribute) and not args:  # type: ignore[attr-defined]
                    args = [call.func.value]  # type: ignore[attr-defined]
                names |= {a.id for a in args if isinstance(a, ast.Name)}
    return frozenset(names)


_LOAD_OPS = {"LOAD_NAME", "LOAD_GLOBAL", "DELETE_NAME", "DELETE_GLOBAL"}
_STORE_OPS = {"STORE_NAME", "STORE_GLOBAL"}


def _names(code: types.CodeType) -> tuple[set[str], set[str]]:
    """Global names the body (and anything nested in it) reads, and names it assigns."""
    loaded: set[str] = set()
    stored: set[str] = set()
    stack = [code]
    while stack:
        co = stack.pop()
        for ins in dis.get_instructions(co):
            if ins.opname in _LOAD_OPS:
                loaded.add(ins.argval)
            elif ins.opname in _STORE_OPS:
                stored.add(ins.argval)
        stack.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
    loaded.discard(SAVE_HELPER)
    loaded.discard(BACKWARD_HELPER)
    loaded.discard(ALL_HELPER)
    # (LOCAL_HELPER stays: a nested body's namespace copies the job's binding of it.)
    stored.discard(STEP_NAME)
    return loaded, stored


# -- stopping Python from running the body ---------------------------------------------------

_NOOP = lambda *args: None  # noqa: E731 - a trace function must be installed for f_trace to fire


class BodySkipper:
    """Makes the frame raise `SkipBody` at its next opcode (the first of the `with` body),
    binding `values` in the frame first.

    Opcode events are turned on so one-line bodies (`with m.trace(x): ...`) are skipped too;
    whichever of the line or opcode event comes first after `__enter__` raises. The previous
    global trace function (debugger, coverage) is put back in `restore`, unlike the peer,
    which clears it.
    """

    __slots__ = ("frame", "previous", "previous_local", "armed", "values")

    def __init__(self, frame: types.FrameType, values: dict[str, Any] | None = None) -> None:
        self.frame = frame
        self.values = values
        self.previous = sys.gettrace()
        self.previous_local = frame.f_trace
        self.armed = True
        sys.settrace(self.previous or _NOOP)
        frame.f_trace_opcodes = True
        frame.f_trace = self._trace

    def _trace(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if self.armed and (event == "line" or event == "opcode"):
            # CPython unsets the thread's trace function when one raises, so the `with`
            # machinery and `__exit__` run untraced; `restore` (from `__exit__`) puts it back.
            self.armed = False
            values, self.values = self.values, None
            if values:
                bind_from_trace_callback(frame, values)
            raise SkipBody()
        return self._trace

    def unbound(self) -> dict[str, Any] | None:
        """The values not bound yet (the body was never reached: the frame got an exception
        between `__enter__` and the body)."""
        values, self.values = self.values, None
        return values

    def restore(self) -> None:
        """Put the frame's and the thread's trace functions back (once; later calls do nothing)."""
        self.armed = False
        frame = self.frame
        if frame is None:
            return
        frame.f_trace_opcodes = False
        frame.f_trace = self.previous_local
        sys.settrace(self.previous)
        # The caller's frame may end up holding the tracer (`as tracer`), which holds this:
        # let go of the frame so no reference cycle keeps saved values alive until a GC.
        self.frame = self.previous_local = None  # type: ignore[assignment]
