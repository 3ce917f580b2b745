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
import difflib
import inspect
import textwrap
import types
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from greenlet import getcurrent

from ..errors import OutOfOrderError, TracingError, warn
from .envoy import Envoy
from .interleaver import _NOTHING, INPUT, OUTPUT, Interleaver, Mediator, current_mediator

if TYPE_CHECKING:
    from ..models.nnsight import NNsight

__all__ = ["SourceEnvoy", "OperationEnvoy", "source_envoy", "source_paths"]

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
            f"The source of {label} is not available, so `.source` cannot be used on it (a "
            "built-in or C function, or one defined in an interactive session without saved "
            "source). Read the operation's own `.output` / `.inputs` instead."
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

    __slots__ = ("accessor", "name", "path", "inner", "__weakref__")

    def __init__(self, accessor: "_Accessor", name: str, path: str) -> None:
        self.accessor = accessor
        self.name = name
        self.path = path
        # `op.source` copies of the functions this site calls: function -> its _Accessor.
        self.inner: dict[Any, _Accessor] | None = None

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
        il.callee = (idx, n, fn)  # what an `op.source` served now looks inside
        try:
            args, kwargs, skipped = il._serve_input(idx, n, args, kwargs)
        finally:
            il.callee = None
    if skipped is _NOTHING:
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


def _function_of(fn: Any) -> Any:
    """The plain function a callee runs (a bound method's `__func__`), or None."""
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    return fn if isinstance(fn, types.FunctionType) else None


def _inner_callable(inner: "dict[Any, _Accessor]", fn: Any) -> Any:
    """`fn`, or its rewritten copy if `op.source` was used on it (bound like `fn` was)."""
    accessor = inner.get(_function_of(fn))
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


class _Accessor:
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
        self.sites = [_Site(self, name, f"{path}.source.{name}") for name, _ in ops]
        self.by_name = {site.name: site for site in self.sites}
        self.function = factory(self.sites, owner_class if owner_class is not None else _class_cell(fn))

    def running(self) -> Interleaver | None:
        for root in self.roots:
            il = root.__dict__.get("_active")
            # (a one-read trace marks its model active with its tracer: no interleaver, no `.source`)
            if isinstance(il, Interleaver) and getcurrent() is il.main:
                return il
        return None


def _module_accessor(module: torch.nn.Module, path: str) -> _Accessor:
    """Rewrite `module`'s forward and give the instance its own subclass that uses it."""
    cls = type(module)
    defining = next((c for c in cls.__mro__ if "forward" in c.__dict__), cls)
    accessor = _Accessor(cls.forward, f"{cls.__name__}.forward", path, weakref.WeakSet(), defining)
    module.__class__ = type(cls.__name__, (cls,), {"forward": accessor.function, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return accessor


def _accessor(envoy: Envoy) -> _Accessor:
    module = envoy._module
    accessor = _accessors.get(module)
    if accessor is None:
        accessor = _accessors[module] = _module_accessor(module, envoy.path)
        accessor.roots.add(envoy._root)
        _check_built_mid_run(envoy)
    accessor.roots.add(envoy._root)
    # Op sites are not in the call-order table: such a model always wraps every module.
    envoy._root.__dict__["_no_lazy"] = True
    return accessor


def source_paths(root: "NNsight") -> list[str]:
    """Paths of the modules of `root` whose `.source` is built, for a remote request: the
    server builds them before the run too (`request.source_modules`), so ops count from the
    start there as well, and a body may use them after other values of their module."""
    paths = []
    d = root.__dict__
    origin = d.get("_edit_origin")
    for module, accessor in list(_accessors.items()):
        if root in accessor.roots or (origin is not None and origin in accessor.roots):
            try:
                idx = root._module_index(module)
            except TracingError:
                continue
            if idx < d.get("_n_core", 0):  # (extra modules such as `generator` are not sent by path)
                paths.append(d["_paths_list"][idx])
    return sorted(paths)


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
    warn(
        f"`{envoy.path}.source` was first used after {envoy.path} had run {il.finished[idx]} "
        f"time(s) in this run; step numbers of its operations start from its next call. {fix}",
        stacklevel=4,
    )


# -- envoys ------------------------------------------------------------------------------------


class SourceEnvoy:
    """`module.source` (or `op.source`): one attribute per call in the function; print it for
    the list."""

    def __init__(self, owner: Envoy, accessor: _Accessor) -> None:
        object.__setattr__(self, "_envoy", owner)
        object.__setattr__(self, "_accessor", accessor)
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
            path = self._accessor.path
            if site is None:
                close = difflib.get_close_matches(name, self.operations, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise AttributeError(
                    f"{path}.source has no operation {name!r}.{hint} Print `{path}.source` to list them."
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
        out = [f"{accessor.path}.source ({accessor.label})"]
        for i, text in enumerate(accessor.lines):
            line = accessor.first + i
            label = ", ".join(by_line.get(line, []))
            out.append(f"{label:>{width}} {line:4d} {'->' if label else '  '} {text.rstrip()}")
        return "\n".join(out)


class OperationEnvoy(Envoy):
    """One call in a forward: `.output`, `.input`, `.inputs` (get and set), `.skip(value)`, and
    `.source` (inside a trace) for the calls inside the function it calls."""

    def __init__(self, site: _Site, owner: Envoy) -> None:
        object.__setattr__(self, "_module", owner._module)
        object.__setattr__(self, "_path", site.path)
        object.__setattr__(self, "_root", owner._root)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_site", site)

    def _running(self, what: str = "output.save()") -> Mediator:
        mediator = current_mediator()
        if mediator is None or mediator.interleaver is None:
            raise TracingError(
                f"`{self._path}` can only be used inside a traced block that runs the model:\n\n"
                f"    with model.trace(inputs):\n        value = {self._path}.{what}"
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

    @property
    def source(self) -> SourceEnvoy:
        """The calls inside the function this operation calls at the current step (waits for
        that call, so use it before anything that runs later in the forward)."""
        mediator = self._running("source.<operation>.output.save()")
        il: Interleaver = mediator.interleaver  # type: ignore[assignment]
        idx = _op_index(il, self._site)
        try:
            mediator.request(INPUT, idx)
        except OutOfOrderError:
            raise OutOfOrderError(
                f"`{self._path}.source` was used after {self._path} had started running in this "
                "step, so the calls inside it can no longer be reached. `.source` of an operation "
                "waits for the operation's call: use it before reading anything that runs inside "
                f"or after that call, e.g.\n\n    inner = {self._path}.source\n"
                f"    value = inner.<operation>.output.save()"
            ) from None
        callee = getattr(il, "callee", None)
        assert callee is not None and callee[0] == idx, "op.source served outside its op's call"
        accessor, built = self._inner_accessor(callee[2])
        if built and callee[1]:
            # Built at the op's call n of this run: its ops count as if they had run once in
            # each earlier call, so step k of a nested op stays the op's k-th call.
            for site in accessor.sites:
                j = _op_index(il, site)
                il.started[j] = il.finished[j] = callee[1]
        cache = self.__dict__.setdefault("_sources", {})
        envoy = cache.get(id(accessor))
        if envoy is None or envoy._accessor is not accessor:
            envoy = cache[id(accessor)] = SourceEnvoy(self, accessor)
        return envoy

    def _inner_accessor(self, callee: Any) -> tuple[_Accessor, bool]:
        """The rewritten copy of `callee` for this op (built now if new: then True)."""
        site = self._site
        if isinstance(callee, torch.nn.Module):
            try:
                where = self._root.__dict__["_paths_list"][self._root._module_index(callee)]
            except (TracingError, IndexError):
                where = None
            fix = f"\n\n    {where}.source.<operation>.output" if where else ""
            raise TracingError(
                f"{self._path} calls a module ({where or type(callee).__name__}), not a function: use "
                f"that module's own `.source` instead of `{self._path}.source`.{fix}"
            )
        function = _function_of(callee)
        if function is None:
            name = getattr(callee, "__qualname__", None) or getattr(callee, "__name__", None) or type(callee).__name__
            raise TracingError(
                f"`{self._path}.source` cannot look inside {name}: it is not a Python function "
                f"(a built-in or C function has no source). Read `{self._path}.output` or "
                f"`{self._path}.inputs` instead."
            )
        inner = site.inner
        if inner is None:
            inner = site.inner = {}
        accessor = inner.get(function)
        if accessor is not None:
            return accessor, False
        label = f"{function.__module__}.{function.__qualname__}"
        accessor = inner[function] = _Accessor(function, label, self._path, site.accessor.roots)
        return accessor, True

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{self._path} is an operation; it has .output, .input, .inputs, .skip(value) and "
            f".source, not {name!r}."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TracingError(f"{self._path} is an operation inside a forward and cannot be called directly.")

    def __repr__(self) -> str:
        return f"<operation {self._path}>"


def source_envoy(envoy: Envoy) -> SourceEnvoy:
    cached = envoy.__dict__.get("_source_envoy")
    if cached is None or cached._accessor is not _accessors.get(envoy._module):
        cached = SourceEnvoy(envoy, _accessor(envoy))
        envoy.__dict__["_source_envoy"] = cached
    return cached
