"""Static checks of shipped source: imports, forbidden calls and attributes.

The same function checks the trace body and every shipped function and class, on the client
(before sending), in the simulator and on the server (on receipt). It reports every problem
with the user's file and line instead of stopping at the first.
"""

from __future__ import annotations

import ast
from typing import Iterable

from .policy import FORBIDDEN_ATTRIBUTES, FORBIDDEN_CALLS, Policy, module_category
from .problems import Problem
from ..tracing.syntax import parse

__all__ = ["check_source"]

_CATEGORY_FIX = {
    "file-io": "# read files before the trace and pass the data in:\ndata = torch.load(path)   # on your machine\nwith model.trace(x, remote=True):\n    model.layer.output[:] = data",
    "network": "# fetch data before the trace and pass it in as a value or tensor",
    "subprocess": "# the server runs only model code; do this before or after the trace, locally",
    "forbidden-builtin": "# use ordinary Python instead; compute dynamic values before the trace",
    "module-not-allowed": "# compute it before the trace and pass the value (a tensor, list or dict) in,\n# or use a module the server provides (see `interlace env`)",
}


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
    problems = _check(source, filename, first_lineno, policy, frozenset(shipped), what)
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
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            category = FORBIDDEN_CALLS.get(node.id)
            if category and node.id not in shipped_names and node.id not in defined:
                add(category, node, f"`{node.id}` is not available to code that runs on the server")
        elif isinstance(node, ast.Attribute):
            if node.attr in FORBIDDEN_ATTRIBUTES:
                add(
                    "forbidden-attribute",
                    node,
                    f"`.{node.attr}` reaches interpreter or model internals, which remote code may not touch",
                    "# use the module's public values inside the trace, e.g. model.layer.output",
                )
            elif node.attr.startswith("register_") and "hook" in node.attr:
                add(
                    "forbidden-attribute",
                    node,
                    f"`.{node.attr}` would leave a hook on the shared model; remote code may not register hooks",
                    "# read or edit values inside the trace instead:\nh = model.layer.output      # instead of a forward hook\nmodel.layer.output[:] = h * 2",
                )
            elif node.attr.startswith("__") and node.attr.endswith("__") and node.attr not in _SAFE_DUNDERS:
                add("forbidden-attribute", node, f"`.{node.attr}` is not allowed in remote code", "")
        elif isinstance(node, (ast.Global, ast.Nonlocal)) and what == "the traced block":
            pass
    return problems


_SAFE_DUNDERS = frozenset(
    {"__init__", "__call__", "__len__", "__getitem__", "__setitem__", "__iter__", "__next__", "__repr__",
     "__str__", "__eq__", "__hash__", "__name__", "__qualname__", "__class__", "__post_init__", "__enter__",
     "__exit__", "__contains__", "__add__", "__mul__", "__sub__", "__truediv__", "__doc__", "__version__"}
)


def _check_import(name: str, node: ast.AST, policy: Policy, add) -> None:  # type: ignore[no-untyped-def]
    if not policy.allows_module(name):
        category = module_category(name)
        add(category, node, f"module `{name}` is not available on the server")
