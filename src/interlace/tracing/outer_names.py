"""Which names a body needs from outside: what a remote request must carry.

Static analysis of a `with` body's source: the names it reads before (or without) assigning
them itself, and the line where each is first used (for problems reported at that line).
"""

from __future__ import annotations

import ast
import functools

from .syntax import parse

__all__ = ["first_uses", "free_names"]


_UNCONDITIONAL = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Import, ast.ImportFrom, ast.FunctionDef,
                  ast.AsyncFunctionDef, ast.ClassDef, ast.Expr, ast.Delete)


@functools.lru_cache(maxsize=1024)
def free_names(source: str) -> frozenset[str]:
    """Names the `with` body reads before (or without) assigning them itself.

    A name first assigned unconditionally at the top of the body is not needed from outside;
    one assigned only inside an `if`/`for`/`try` may still be read from outside.
    """
    tree = parse(source)
    node = tree.body[0]
    body = node.body if isinstance(node, (ast.With, ast.AsyncWith)) else tree.body
    needed: set[str] = set()
    assigned: set[str] = set()
    _walk_block(body, needed, assigned)
    return frozenset(needed)


def _walk_block(body: list[ast.stmt], needed: set[str], assigned: set[str]) -> None:
    for stmt in body:
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                needed |= _loads(item.context_expr) - assigned
                if item.optional_vars is not None:
                    assigned |= _stores(item.optional_vars)
            _walk_block(stmt.body, needed, assigned)
            continue
        needed |= _loads(stmt) - assigned
        if isinstance(stmt, _UNCONDITIONAL):
            assigned |= _stores(stmt)


def _loads(node: ast.AST) -> set[str]:
    """Names read by `node`, not counting names local to nested functions and comprehensions."""
    names: set[str] = set()
    stack: list[ast.AST] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = n.args
            params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
            params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
            body = n.body if isinstance(n.body, list) else [n.body]
            local = set().union(*(_stores_deep(b) for b in body)) if body else set()
            inner = set().union(*(_loads(b) for b in body)) if body else set()
            names |= inner - params - local
            stack.extend(args.defaults + [d for d in args.kw_defaults if d is not None])
            stack.extend(getattr(n, "decorator_list", []))
            continue
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            targets = set().union(*(_stores_deep(g.target) for g in n.generators))
            parts: list[ast.AST] = [g.iter for g in n.generators[:1]]
            inner_nodes: list[ast.AST] = [g.iter for g in n.generators[1:]] + [c for g in n.generators for c in g.ifs]
            inner_nodes += [n.key, n.value] if isinstance(n, ast.DictComp) else [n.elt]
            names |= set().union(*(_loads(x) for x in inner_nodes)) - targets
            stack.extend(parts)
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Load, ast.Del)):
            names.add(n.id)
        stack.extend(ast.iter_child_nodes(n))
    return names


def _stores_deep(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | {
        n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def _stores(node: ast.AST) -> set[str]:
    names = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


@functools.lru_cache(maxsize=1024)
def first_uses(source: str, first_lineno: int) -> dict[str, int]:
    uses: dict[str, int] = {}
    for n in ast.walk(parse(source)):
        if isinstance(n, ast.Name):
            line = first_lineno + n.lineno - 1
            if n.id not in uses or line < uses[n.id]:
                uses[n.id] = line
    return uses
