"""`envoy.source`: the calls inside a module's forward, as things a trace can read and edit.

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
"""

from __future__ import annotations

import ast
import difflib
import inspect
import textwrap
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from greenlet import getcurrent

from ..errors import TracingError
from .envoy import Envoy
from .interleaver import _NOTHING, OUTPUT, Interleaver, Mediator, current_mediator

if TYPE_CHECKING:
    from ..models.nnsight import NNsight

__all__ = ["SourceEnvoy", "OperationEnvoy", "source_envoy"]

SITES = "__interlace_sites__"
_FRAME_BUILTINS = frozenset({"super", "locals", "vars", "globals", "eval", "exec", "dir"})
_accessors: "weakref.WeakKeyDictionary[torch.nn.Module, _Accessor]" = weakref.WeakKeyDictionary()


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
            f"The source of {label} is not available, so `.source` cannot be used on it (it may "
            "be compiled or defined in an interactive session without saved source)."
        ) from None
    if fn.__code__.co_freevars and set(fn.__code__.co_freevars) != {"__class__"}:
        raise TracingError(
            f"{label} is a closure (it uses {', '.join(fn.__code__.co_freevars)} from an enclosing "
            "function), so `.source` cannot rebuild it."
        )
    tree = ast.parse(textwrap.dedent("".join(lines)))
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
    exec(compile(module, filename, "exec"), fn.__globals__, namespace)
    return namespace["__interlace_make_forward__"], ops, lines, first


class _Site:
    """One call site: passes the callee through, or routes it via the running interleaver."""

    __slots__ = ("accessor", "name", "path", "__weakref__")

    def __init__(self, accessor: "_Accessor", name: str, path: str) -> None:
        self.accessor = accessor
        self.name = name
        self.path = path

    def __call__(self, fn: Any) -> Any:
        il = self.accessor.running()
        if il is None:
            return fn
        site = self

        def call(*args: Any, **kwargs: Any) -> Any:
            return _call_op(il, site, fn, args, kwargs)

        return call


def _op_index(il: Interleaver, site: _Site) -> int:
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


def _call_op(il: Interleaver, site: _Site, fn: Any, args: tuple, kwargs: dict) -> Any:
    idx = _op_index(il, site)
    n = il.started[idx]
    il.started[idx] = n + 1
    skipped: Any = _NOTHING
    if idx in il.input_waiters:
        args, kwargs, skipped = il._serve_input(idx, n, args, kwargs)
    out = fn(*args, **kwargs) if skipped is _NOTHING else skipped
    il.finished[idx] += 1
    if idx in il.output_waiters or idx in il.observers:
        out = il._after(idx, n, args, kwargs, out)
    return out


class _Accessor:
    """The rewritten forward of one module instance and its call sites."""

    def __init__(self, module: torch.nn.Module, path: str) -> None:
        cls = type(module)
        label = f"{cls.__name__}.forward"
        factory, ops, lines, first = _rewrite(cls.forward, label)
        self.label = label
        self.lines = lines
        self.first = first
        self.ops = ops
        self.roots: weakref.WeakSet = weakref.WeakSet()
        self.sites = [_Site(self, name, f"{path}.source.{name}") for name, _ in ops]
        self.by_name = {site.name: site for site in self.sites}
        defining = next((c for c in cls.__mro__ if "forward" in c.__dict__), cls)
        forward = factory(self.sites, defining)
        module.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__})

    def running(self) -> Interleaver | None:
        for root in self.roots:
            il = root.__dict__.get("_active")
            # (a one-read trace marks its model active with its tracer: no interleaver, no `.source`)
            if isinstance(il, Interleaver) and getcurrent() is il.main:
                return il
        return None


def _accessor(envoy: Envoy) -> _Accessor:
    module = envoy._module
    accessor = _accessors.get(module)
    if accessor is None:
        accessor = _accessors[module] = _Accessor(module, envoy.path)
        accessor.roots.add(envoy._root)
        _check_built_mid_run(envoy)
    accessor.roots.add(envoy._root)
    # Op sites are not in the call-order table: such a model always wraps every module.
    envoy._root.__dict__["_no_lazy"] = True
    return accessor


def _check_built_mid_run(envoy: Envoy) -> None:
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
    warnings.warn(
        f"`{envoy.path}.source` was first used after {envoy.path} had run {il.finished[idx]} "
        f"time(s) in this run; step numbers of its operations start from its next call. {fix}",
        stacklevel=4,
    )


# -- envoys ------------------------------------------------------------------------------------


class SourceEnvoy:
    """`module.source`: one attribute per call in the module's forward; print it for the list."""

    def __init__(self, envoy: Envoy) -> None:
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_accessor", _accessor(envoy))
        object.__setattr__(self, "_ops", {})

    @property
    def operations(self) -> list[str]:
        return [name for name, _ in self._accessor.ops]

    def __getattr__(self, name: str) -> "OperationEnvoy":
        if name.startswith("__"):
            raise AttributeError(name)
        ops = self.__dict__["_ops"]
        op = ops.get(name)
        if op is None:
            site = self._accessor.by_name.get(name)
            if site is None:
                close = difflib.get_close_matches(name, self.operations, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise AttributeError(
                    f"{self._envoy.path}.source has no operation {name!r}.{hint} Print "
                    f"`{self._envoy.path}.source` to list them."
                )
            op = ops[name] = OperationEnvoy(site, self._envoy)
        return op

    def __dir__(self) -> list[str]:
        return self.operations

    def __repr__(self) -> str:
        accessor = self._accessor
        by_line: dict[int, list[str]] = {}
        for name, line in accessor.ops:
            by_line.setdefault(line, []).append(name)
        width = max((len(", ".join(v)) for v in by_line.values()), default=0)
        out = [f"{self._envoy.path}.source ({accessor.label})"]
        for i, text in enumerate(accessor.lines):
            line = accessor.first + i
            label = ", ".join(by_line.get(line, []))
            out.append(f"{label:>{width}} {line:4d} {'->' if label else '  '} {text.rstrip()}")
        return "\n".join(out)


class OperationEnvoy(Envoy):
    """One call in a forward: `.output`, `.input`, `.inputs` (get and set) and `.skip(value)`."""

    def __init__(self, site: _Site, owner: Envoy) -> None:
        object.__setattr__(self, "_module", owner._module)
        object.__setattr__(self, "_path", site.path)
        object.__setattr__(self, "_root", owner._root)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_site", site)

    def _running(self) -> Mediator:
        mediator = current_mediator()
        if mediator is None or mediator.interleaver is None:
            raise TracingError(
                f"`{self._path}` can only be used inside a traced block that runs the model:\n\n"
                f"    with model.trace(inputs):\n        value = {self._path}.output.save()"
            )
        return mediator

    def _idx(self) -> int:
        return _op_index(self._running().interleaver, self._site)  # type: ignore[arg-type]

    def _locate(self, what: str) -> tuple[Mediator, int, int | None]:
        mediator = self._running()
        return mediator, _op_index(mediator.interleaver, self._site), None  # type: ignore[arg-type]

    @property
    def output(self) -> Any:
        """What the operation returned (this invoke's rows). Assign to replace it."""
        mediator, idx, it = self._locate("output")
        return mediator.request(OUTPUT, idx, it)

    @output.setter
    def output(self, value: Any) -> None:
        mediator, idx, it = self._locate("output")
        mediator.swap(OUTPUT, idx, value, it)

    def __getattr__(self, name: str) -> Any:
        if name == "source":
            raise TracingError(f"`.source` of an operation ({self._path}) is not supported; use it on modules.")
        raise AttributeError(
            f"{self._path} is an operation; it has .output, .input, .inputs and .skip(value), not {name!r}."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TracingError(f"{self._path} is an operation inside a forward and cannot be called directly.")

    def __repr__(self) -> str:
        return f"<operation {self._path}>"


def source_envoy(envoy: Envoy) -> SourceEnvoy:
    cached = envoy.__dict__.get("_source_envoy")
    if cached is None or cached._accessor is not _accessors.get(envoy._module):
        cached = SourceEnvoy(envoy)
        envoy.__dict__["_source_envoy"] = cached
    return cached
