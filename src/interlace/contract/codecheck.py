"""Static checks of shipped source: imports, forbidden calls and attributes.

The same function checks the trace body and every shipped function and class, on the client
(before sending), in the simulator and on the server (on receipt). It reports every problem
with the user's file and line instead of stopping at the first.
"""

from __future__ import annotations

import ast
from typing import Iterable

from .policy import (
    DENIED_ATTRIBUTES, ENGINE_MODULE, FORBIDDEN_ATTRIBUTES, FORBIDDEN_CALLS, RESERVED_PREFIX, SAFE_DUNDER_METHODS,
    SAFE_DUNDER_READS, Policy, module_category,
)
from .problems import Problem
from ..tracing.syntax import parse

__all__ = ["check_source", "MSG_PRIVATE_ATTRIBUTE", "MSG_DUNDER_METHOD", "MSG_RESERVED_NAME", "MSG_METACLASS"]

_CATEGORY_FIX = {
    "file-io": "# read files before the trace and pass the data in:\ndata = torch.load(path)   # on your machine\nwith model.trace(x, remote=True):\n    model.layer.output[:] = data",
    "network": "# fetch data before the trace and pass it in as a value or tensor",
    "subprocess": "# the server runs only model code; do this before or after the trace, locally",
    "forbidden-builtin": "# use ordinary Python instead; compute dynamic values before the trace",
    "module-not-allowed": "# compute it before the trace and pass the value (a tensor, list or dict) in,\n# or use a module the server provides (see `interlace env`)",
}

MSG_PRIVATE_ATTRIBUTE = "`.{name}` is not allowed in remote code: names starting with `_` reach Python's and the model's internals"
FIX_PRIVATE_ATTRIBUTE = (
    "# use public attributes instead, e.g.\n"
    "name = type(x).__name__            # a class's name\n"
    "ok = isinstance(x, torch.Tensor)   # a type check\n"
    "h = model.layer.output             # a module's values"
)
MSG_DUNDER_METHOD = (
    "defining `{name}` is not allowed in remote code: Python calls it outside your code's control "
    "(allowed special methods: __init__, __call__, __len__, __getitem__, __iter__, __repr__, __eq__, arithmetic, ...)"
)
FIX_DUNDER_METHOD = "# give it an ordinary name and call it yourself:\ndef {plain}(self, ...):\n    ..."
MSG_RESERVED_NAME = "`{name}` is a reserved name in remote code (names that start and end with `_` belong to Python and Interlace)"
FIX_RESERVED_NAME = "# rename it, e.g.\n{plain} = ..."
MSG_METACLASS = "`metaclass=` is not allowed in remote code: a metaclass runs outside your code's control"
FIX_METACLASS = "# derive from an ordinary base instead:\nclass {name}(Base):\n    ..."
MSG_FORMAT = "`.{name}(...)` is not allowed in remote code: a format string reads attributes (`\"{{0.__class__}}\".format(x)`)"
FIX_FORMAT = "# use an f-string:\ntext = f\"{x} and {y}\""
MSG_DENIED = "`.{name}` is not allowed in remote code: it reaches files, processes, memory or the shared model outside the trace"
FIX_DENIED = "# do it before or after the trace, on your machine; inside the trace, read and edit values:\nh = model.layer.output.save()"


def check_source(
    source: str,
    filename: str,
    first_lineno: int,
    policy: Policy,
    shipped: Iterable[str] = (),
    what: str = "the traced block",
) -> list[Problem]:
    """Problems in `source` (text starting at `first_lineno` of `filename`)."""
    # A pure function of its arguments, and the same block is checked on every run of a call
    # site (by client and server), so results are cached.
    key = (source, filename, first_lineno, id(policy), frozenset(shipped), what)
    hit = _cache.get(key)
    if hit is not None and hit[0] is policy:
        return list(hit[1])
    try:
        problems = _check(source, filename, first_lineno, policy, frozenset(shipped), what)
    except (RecursionError, MemoryError):
        # CPython's parser and recursive checks give up on code nested thousands deep
        # (`-----...1`, `x.a.a.a...`); found by fuzzing (tests/fuzz): a problem, never a crash.
        problems = [_too_deep(what, f"more than {MAX_NESTING}", filename, first_lineno)]
    if len(_cache) > 4096:
        _cache.clear()
    _cache[key] = (policy, tuple(problems))
    return problems


_cache: dict[tuple, tuple[Policy, tuple[Problem, ...]]] = {}


def _check(source: str, filename: str, first_lineno: int, policy: Policy, shipped: frozenset[str], what: str) -> list[Problem]:
    try:
        tree = parse(source)
    except SyntaxError as e:
        return [Problem(category="invalid-request", message=f"{what} does not parse: {e.msg}", filename=filename, lineno=first_lineno + (e.lineno or 1) - 1)]
    offset = first_lineno - 1
    depth, deepest = _nesting(tree)
    if depth > MAX_NESTING:
        # Every later step (the runtime transform, compiling, the engine's copy of the tree)
        # recurses over the tree: refused here, with the line, not as a RecursionError there.
        return [_too_deep(what, str(depth), filename, offset + getattr(deepest, "lineno", 1))]
    shipped_names = set(shipped)
    defined = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    defined |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs + n.posonlyargs}
    problems: list[Problem] = []

    def add(category: str, node: ast.AST, message: str, fix: str | None = None) -> None:
        problems.append(
            Problem(
                category=category,
                message=message,
                filename=filename,
                lineno=offset + getattr(node, "lineno", 1),
                fix=fix if fix is not None else _CATEGORY_FIX.get(category, ""),
            )
        )

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_import(alias.name, node, policy, add)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                add("module-not-allowed", node, "relative imports cannot be resolved on the server")
            elif node.module:
                _check_import(node.module, node, policy, add)
        elif isinstance(node, ast.Name):
            _check_name(node.id, node, add)
            category = FORBIDDEN_CALLS.get(node.id)
            if isinstance(node.ctx, ast.Load) and category and node.id not in shipped_names and node.id not in defined:
                add(category, node, f"`{node.id}` is not available to code that runs on the server")
        elif isinstance(node, ast.Attribute):
            _check_attribute(node.attr, node, add)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
            if name.startswith("__") and name.endswith("__") and name not in SAFE_DUNDER_METHODS:
                add("forbidden-dunder", node, MSG_DUNDER_METHOD.format(name=name), FIX_DUNDER_METHOD.format(plain=name.strip("_")))
            elif name not in SAFE_DUNDER_METHODS:
                _check_name(name, node, add)
            for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                _check_name(arg.arg, node, add)
        elif isinstance(node, ast.ClassDef):
            _check_name(node.name, node, add)
            if any(k.arg == "metaclass" for k in node.keywords):
                add("forbidden-metaclass", node, MSG_METACLASS, FIX_METACLASS.format(name=node.name))
        elif isinstance(node, ast.alias) and node.asname:
            _check_name(node.asname, node, add)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in node.names:
                _check_name(name, node, add)
    return problems


#: How deeply shipped code may nest (expressions within expressions, blocks within blocks).
#: Real bodies stay under 30; Python's own recursion limit is about 1000 frames.
MAX_NESTING = 100
MSG_TOO_DEEP = "{what} nests {depth} levels deep; the server accepts at most {limit}"
FIX_TOO_DEEP = "# split deep expressions into steps:\nh = model.layer.output\nh = -h\nh = -h"


def _too_deep(what: str, depth: str, filename: str, lineno: int) -> Problem:
    return Problem(category="invalid-request", message=MSG_TOO_DEEP.format(what=what, depth=depth, limit=MAX_NESTING),
                   filename=filename, lineno=lineno, fix=FIX_TOO_DEEP)


def _nesting(tree: ast.AST) -> tuple[int, ast.AST]:
    """The tree's depth and its deepest node, without recursion (the tree may be deep)."""
    deepest, best = tree, 0
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > best:
            best, deepest = depth, node
        if depth <= MAX_NESTING:
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return best, deepest


def _check_name(name: str, node: ast.AST, add) -> None:  # type: ignore[no-untyped-def]
    """Names that start and end with `_` (`__builtins__`, `_getattr_`) and the engine's own
    (`__interlace...`) are Python's and Interlace's: user code may not read or bind them."""
    if name in SAFE_DUNDER_READS or name == "_" or not (name.startswith(RESERVED_PREFIX) or (name.startswith("_") and name.endswith("_"))):
        return
    add("reserved-name", node, MSG_RESERVED_NAME.format(name=name), FIX_RESERVED_NAME.format(plain=name.strip("_") or "value"))


def _check_attribute(attr: str, node: ast.AST, add) -> None:  # type: ignore[no-untyped-def]
    if attr in FORBIDDEN_ATTRIBUTES:
        add("forbidden-attribute", node, f"`.{attr}` reaches interpreter or model internals, which remote code may not touch",
            FIX_PRIVATE_ATTRIBUTE)
    elif attr.startswith("_") and attr not in SAFE_DUNDER_METHODS and attr not in SAFE_DUNDER_READS:
        add("forbidden-attribute", node, MSG_PRIVATE_ATTRIBUTE.format(name=attr), FIX_PRIVATE_ATTRIBUTE)
    elif attr.startswith("register_") and "hook" in attr:
        add(
            "forbidden-attribute",
            node,
            f"`.{attr}` would leave a hook on the shared model; remote code may not register hooks",
            "# read or edit values inside the trace instead:\nh = model.layer.output      # instead of a forward hook\nmodel.layer.output[:] = h * 2",
        )
    elif attr in ("format", "format_map"):
        add("forbidden-attribute", node, MSG_FORMAT.format(name=attr), FIX_FORMAT)
    elif attr in DENIED_ATTRIBUTES:
        add("forbidden-attribute", node, MSG_DENIED.format(name=attr), FIX_DENIED)


def _check_import(name: str, node: ast.AST, policy: Policy, add) -> None:  # type: ignore[no-untyped-def]
    if not policy.allows_module(name):
        category = module_category(name)
        extra = " (only `interlace.save` and the names a body calls are, never the package)" if name.split(".")[0] == ENGINE_MODULE else ""
        add(category, node, f"module `{name}` is not available on the server{extra}")
