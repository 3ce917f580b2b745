"""`envoy.source`: the calls inside a module's forward, as things a trace can read and edit.
This module rewrites forwards into counted call sites (`Accessor`, `Site`); the envoys that
name those calls (`SourceEnvoy`, `OperationEnvoy`) are in `envoy.py`, which imports this one.

```python
print(model.transformer.h[0].attn.source)           # the forward, with each call's name
with model.trace(prompt):
    qkv = model.transformer.h[0].attn.source.self_c_attn_0.output.save()
    model.transformer.h[0].attn.source.split_0.output = ...
```

Design note
-----------
On the first `.source` access of a module, the source of its class's `forward` is parsed and
every call in it, `f(a, b)`, becomes `__interlace_sites__[i](f)(a, b)`. The result is compiled
with the original function's globals, filename and line numbers (tracebacks point at the real
source), inside a small factory that supplies `__interlace_sites__` and the `__class__` cell
that zero-argument `super()` needs; decorators are kept and re-applied. The module instance
then gets its own subclass (same name) whose `forward` is the rewritten one: other instances
of the class and the class itself are untouched, and nothing is stored in the module's
`forward` attribute, which the interleaver owns during runs.

Ops are named `<callee>_<n>`: the dotted callee joined by `_` when it starts at a name
(`self.c_attn(...)` -> `self_c_attn_0`, `torch.matmul` -> `torch_matmul_0`), else its last
attribute (`x.view(...).transpose(...)` -> `view_0`, `transpose_0`); `n` counts that name in
source order. Calls to `super`, `locals`, `vars`, `globals`, `eval`, `exec` and `dir` are left
alone (they look at the calling frame).

A site costs one call and a dict lookup when no trace of the model runs. During a run each
call of an op is counted like a module call (step k is its k-th call) and served to waiting
invokes through the interleaver, so `.output`, `.input`, `.inputs`, `.skip()`, order checks
and `tracer.iter[...]` work as for modules. An op whose `.source` is first built in the
middle of a run is counted from then on (build it before the trace, e.g. by printing it, to
address steps that already ran).

`op.source` looks inside the function an operation calls (`attn.source.attention_interface_0
.source.torch_nn_functional_scaled_dot_product_attention_0.output`). Which function that is
is known only when the call happens (`attention_interface` is a local variable), so, as in
nnsight, it is used inside a trace: the body waits for the op's call at its current step,
the callee is rewritten like a forward (once per op and function, kept across runs), and the
op calls the rewritten copy from then on, during runs only. Its ops count like the
module's; built in the middle of a run, at the op's call n, they count as if they had run
once in each earlier call, so step k of a nested op is still its op's k-th call.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from greenlet import getcurrent

from ..errors import TracingError, warn
from .interleaver import Interleaver
from .mediator import NOTHING, current_mediator
from .syntax import compile_tree, parse

if TYPE_CHECKING:
    from .host import EnvoyLike, Host

__all__ = ["Accessor", "Site", "accessor_for", "accessors", "function_of", "op_index", "source_paths"]

SITES = "__interlace_sites__"
_FRAME_BUILTINS = frozenset({"super", "locals", "vars", "globals", "eval", "exec", "dir"})
#: module -> the rewritten copy of its forward (built by `accessor_for`).
accessors: "weakref.WeakKeyDictionary[torch.nn.Module, Accessor]" = weakref.WeakKeyDictionary()


# -- rewriting ------------------------------------------------------------------------------------


def _callee_name(func: ast.expr) -> str:
    parts: list[str] = []
    node = func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return "_".join(reversed(parts))
    return parts[0] if parts else "call"


class _CallRewriter(ast.NodeTransformer):
    def __init__(self, names: dict[int, tuple[int, str]]) -> None:
        self.names = names

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        entry = self.names.get(id(node))
        if entry is None:
            return node
        site = ast.Subscript(value=ast.Name(id=SITES, ctx=ast.Load()), slice=ast.Constant(value=entry[0]), ctx=ast.Load())
        node.func = ast.copy_location(ast.Call(func=site, args=[node.func], keywords=[]), node.func)
        return node


def _rewrite(cls_forward: Callable[..., Any], label: str) -> tuple[Callable[..., Any], list[tuple[str, int]], list[str], int]:
    """(factory, [(op name, line)], source lines, first line) for a forward function."""
    fn = inspect.unwrap(cls_forward)
    try:
        lines, first = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or fn.__code__.co_filename
    except (OSError, TypeError):
        raise TracingError(
            f"The source of {label} is not available, so `.source` cannot be used on it (a "
            "built-in or C function, or one defined in an interactive session without saved "
            "source). Read the operation's own `.output` / `.inputs` instead."
        ) from None
    if fn.__code__.co_freevars and set(fn.__code__.co_freevars) != {"__class__"}:
        raise TracingError(
            f"{label} is a closure (it uses {', '.join(fn.__code__.co_freevars)} from an enclosing "
            "function), so `.source` cannot rebuild it."
        )
    tree = parse(textwrap.dedent("".join(lines)))
    func_def = tree.body[0]
    if not isinstance(func_def, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TracingError(f"Could not find the definition of {label} in its source.")
    calls: list[ast.Call] = []

    def post_order(node: ast.AST) -> None:  # inner calls first: the order they run in
        for child in ast.iter_child_nodes(node):
            post_order(child)
        if isinstance(node, ast.Call):
            calls.append(node)

    for stmt in func_def.body:
        post_order(stmt)
    counts: dict[str, int] = {}
    names: dict[int, tuple[int, str]] = {}
    ops: list[tuple[str, int]] = []
    for call in calls:
        base = _callee_name(call.func)
        if isinstance(call.func, ast.Name) and call.func.id in _FRAME_BUILTINS:
            continue
        n = counts.get(base, 0)
        counts[base] = n + 1
        names[id(call)] = (len(ops), f"{base}_{n}")
        ops.append((f"{base}_{n}", call.lineno + first - 1))
    func_def.body = [_CallRewriter(names).visit(s) for s in func_def.body]
    factory = ast.FunctionDef(
        name="__interlace_make_forward__",
        args=ast.arguments(
            posonlyargs=[], args=[ast.arg(arg=SITES), ast.arg(arg="__class__")], kwonlyargs=[], kw_defaults=[], defaults=[]
        ),
        body=[func_def, ast.Return(value=ast.Name(id=func_def.name, ctx=ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:
        factory.type_params = []
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, first - 1)
    namespace: dict[str, Any] = {}
    exec(compile_tree(module, filename), fn.__globals__, namespace)
    return namespace["__interlace_make_forward__"], ops, lines, first


class Site:
    """One call site: passes the callee through, or routes it via the running interleaver."""

    __slots__ = ("accessor", "name", "path", "inner", "__weakref__")

    def __init__(self, accessor: "Accessor", name: str, path: str) -> None:
        self.accessor = accessor
        self.name = name
        self.path = path
        # `op.source` copies of the functions this site calls: function -> its Accessor.
        self.inner: dict[Any, Accessor] | None = None

    def __call__(self, fn: Any) -> Any:
        il = self.accessor.running()
        if il is None:
            return fn
        site = self

        def call(*args: Any, **kwargs: Any) -> Any:
            return _call_op(il, site, fn, args, kwargs)

        return call


def op_index(il: Interleaver, site: Site) -> int:
    """This run's index for `site` (op counters live after the modules' in the run's lists)."""
    table = il.ops
    if table is None:
        table = il.ops = {}
        il.paths = list(il.paths)
    idx = table.get(site)
    if idx is None:
        idx = table[site] = len(il.started)
        il.started.append(0)
        il.finished.append(0)
        il.paths.append(site.path)
    return idx


def _call_op(il: Interleaver, site: Site, fn: Any, args: tuple, kwargs: dict) -> Any:
    idx = op_index(il, site)
    n = il.started[idx]
    il.started[idx] = n + 1
    skipped: Any = NOTHING
    if idx in il.input_waiters:
        il.callee = (idx, n, fn)  # what an `op.source` served now looks inside
        try:
            args, kwargs, skipped = il._serve_input(idx, n, args, kwargs)
        finally:
            il.callee = None
    if skipped is NOTHING:
        inner = site.inner
        if inner is not None:
            fn = _inner_callable(inner, fn)
        out = fn(*args, **kwargs)
    else:
        out = skipped
    il.finished[idx] += 1
    if idx in il.output_waiters or idx in il.observers:
        out = il._after(idx, n, args, kwargs, out)
    return out


def function_of(fn: Any) -> Any:
    """The plain function a callee runs (a bound method's `__func__`), or None."""
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    return fn if isinstance(fn, types.FunctionType) else None


def _inner_callable(inner: "dict[Any, Accessor]", fn: Any) -> Any:
    """`fn`, or its rewritten copy if `op.source` was used on it (bound like `fn` was)."""
    accessor = inner.get(function_of(fn))
    if accessor is None:
        return fn
    if isinstance(fn, types.MethodType):
        return types.MethodType(accessor.function, fn.__self__)
    return accessor.function


def _class_cell(fn: Any) -> Any:
    """What zero-argument `super()` in `fn` refers to (its `__class__` cell), else None."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None or "__class__" not in code.co_freevars:
        return None
    return fn.__closure__[code.co_freevars.index("__class__")].cell_contents


class Accessor:
    """A rewritten copy of one function (a module's forward, or a function an op calls) and
    its call sites, whose paths start with `path`."""

    def __init__(self, fn: Any, label: str, path: str, roots: weakref.WeakSet, owner_class: Any = None) -> None:
        factory, ops, lines, first = _rewrite(fn, label)
        self.label = label
        self.path = path
        self.lines = lines
        self.first = first
        self.ops = ops
        self.roots = roots  # the models whose runs it serves (shared with nested accessors)
        self.sites = [Site(self, name, f"{path}.source.{name}") for name, _ in ops]
        self.by_name = {site.name: site for site in self.sites}
        self.function = factory(self.sites, owner_class if owner_class is not None else _class_cell(fn))

    def running(self) -> Interleaver | None:
        for root in self.roots:
            il = root.__dict__.get("_active")
            # (a one-read trace marks its model active with its tracer: no interleaver, no `.source`)
            if isinstance(il, Interleaver) and getcurrent() is il.main:
                return il
        return None


def _module_accessor(module: torch.nn.Module, path: str) -> Accessor:
    """Rewrite `module`'s forward and give the instance its own subclass that uses it."""
    cls = type(module)
    defining = next((c for c in cls.__mro__ if "forward" in c.__dict__), cls)
    accessor = Accessor(cls.forward, f"{cls.__name__}.forward", path, weakref.WeakSet(), defining)
    module.__class__ = type(cls.__name__, (cls,), {"forward": accessor.function, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return accessor


def accessor_for(envoy: EnvoyLike) -> Accessor:
    """The rewritten forward of `envoy`'s module, built on first use (from then on every
    run of the envoy's model wraps every module)."""
    module = envoy._module
    accessor = accessors.get(module)
    if accessor is None:
        accessor = accessors[module] = _module_accessor(module, envoy.path)
        accessor.roots.add(envoy._root)
        _check_built_mid_run(envoy)
    accessor.roots.add(envoy._root)
    # Op sites are not in the call-order table: such a model always wraps every module.
    envoy._root.__dict__["_no_lazy"] = True
    return accessor


def source_paths(root: "Host") -> list[str]:
    """Paths of the modules of `root` whose `.source` is built, for a remote request: the
    server builds them before the run too (`request.source_modules`), so ops count from the
    start there as well, and a body may use them after other values of their module."""
    paths = []
    d = root.__dict__
    origin = d.get("_edit_origin")
    for module, accessor in list(accessors.items()):
        if root in accessor.roots or (origin is not None and origin in accessor.roots):
            try:
                idx = root._module_index(module)
            except TracingError:
                continue
            if idx < d.get("_n_core", 0):  # (extra modules such as `generator` are not sent by path)
                paths.append(d["_paths_list"][idx])
    return sorted(paths)


def _check_built_mid_run(envoy: EnvoyLike) -> None:
    """A forward rewritten during a run only takes effect from the module's next call."""
    mediator = current_mediator()
    il = mediator.interleaver if mediator is not None else None
    if il is None:
        return
    idx = envoy._root._module_index(envoy._module)
    if getattr(il, "lazy", None) is not None:
        il.wrap_all(mediator.current)  # counters of every module, for the checks below
    hooks = getattr(il, "hooks", None)
    if hooks is not None and hasattr(hooks, "refresh"):
        hooks.refresh(idx)  # the running wrapper calls the rewritten forward from now on
    if idx >= len(il.started) or il.started[idx] == 0:
        return
    fix = (
        f"Touch `.source` once before the trace so its calls are counted from the start:\n\n"
        f"    {envoy.path}.source  # or print(...) it\n    with model.trace(...):\n        ..."
    )
    if il.started[idx] > il.finished[idx]:
        raise TracingError(
            f"`{envoy.path}.source` was first used while {envoy.path} was already running, so "
            f"the calls inside this run of its forward cannot be reached. Access `.source` ops "
            f"before other values inside that module, or: {fix}"
        )
    warn(
        f"`{envoy.path}.source` was first used after {envoy.path} had run {il.finished[idx]} "
        f"time(s) in this run; step numbers of its operations start from its next call. {fix}",
        stacklevel=4,
    )
