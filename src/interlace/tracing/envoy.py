"""Envoys: a mirror of the module tree through which a traced body reads and edits values
(`Envoy`), and of the calls inside a module's forward (`SourceEnvoy`, `OperationEnvoy`)."""

from __future__ import annotations

import difflib
import warnings
from inspect import getattr_static
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from greenlet import getcurrent

from ..errors import OutOfOrderError, TracingError
from .mediator import INPUT, OUTPUT, Mediator, current_mediator
from .source import Accessor, Site, accessor_for, accessors, function_of, op_index

if TYPE_CHECKING:
    from .host import Host
    from .interleaver import Interleaver

__all__ = [
    "LOCAL_READER", "MSG_OPERATION_IN_LOCAL_BLOCK", "Envoy", "OperationEnvoy", "SourceEnvoy", "make_envoy",
    "mount_clashes", "source_envoy",
]

#: The greenlet attribute of a local block's reader. A `with interlace.local():` block runs on
#: the client (`backends/local_runner.py`) on a greenlet of its own that has no mediator (it
#: must never see the server's, which may be the greenlet that started it under
#: `remote='local'`) and has this attribute instead: a module access there finds no mediator,
#: so it reaches `Envoy._scanned(what)`, which asks `reader.stand_in(envoy, what)` for the
#: mediator-like object of that one access (`request`, `swap`, `skip`, as `_ScannedValues`).
#: Knowing the envoy, the reader asks the server for `envoy.path` and the kind (`what`:
#: "output", "input", "inputs", "next()", ...). Costs nothing on the paths inside a trace.
LOCAL_READER = "local_reader"


def _outside_trace(path: str, what: str) -> TracingError:
    return TracingError(
        f"`{path}.{what}` can only be used inside a traced block that runs the model. Give the "
        "trace an input, or use an invoke:\n\n"
        f"    with model.trace(inputs):\n        value = {path}.{what}.save()\n\n"
        "    with model.trace() as tracer:\n        with tracer.invoke(inputs):\n"
        f"            value = {path}.{what}.save()"
    )


class Envoy:
    """Stands for one `torch.nn.Module` inside and outside traces.

    Child modules are attributes (`model.transformer`) or indexes (`model.transformer.h[0]`);
    other attributes are the module's own (`model.lm_head.weight`).
    """

    _module: torch.nn.Module
    _path: str
    _root: "Host"

    def __init__(self, module: torch.nn.Module, path: str, root: "Host | None" = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_children", {})

    # -- tree ---------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """Dotted path from the root, e.g. `model.transformer.h.0`."""
        return self._path

    def _child(self, name: str) -> "Envoy":
        children = self.__dict__["_children"]
        envoy = children.get(name)
        module = self._module._modules.get(name)
        if envoy is None or envoy._module is not module:
            if module is None:
                raise AttributeError(name)
            envoy = make_envoy(self._root, module, f"{self._path}.{name}")
            children[name] = envoy
        return envoy

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        module = d["_module"]
        child = module._modules.get(name)
        if child is not None:  # a child envoy made before, unless `name` may be an alias
            envoy = d["_children"].get(name)
            if envoy is not None and envoy._module is child and name not in d["_root"].__dict__["_shadow"]:
                return envoy
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        root = d["_root"]
        real = root._alias_target(self, name)
        if real is not None:
            return real
        if name in module._modules:
            return self._child(name)
        try:
            return getattr(module, name)
        except AttributeError:
            children = ", ".join(module._modules) or "none"
            raise AttributeError(
                f"{self._path} ({type(module).__name__}) has no attribute or submodule {name!r}. "
                f"Its submodules are: {children}."
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            name in ("output", "input", "inputs")
            or name in type(self).__dict__
            or isinstance(getattr_static(type(self), name, None), property)  # a subclass's property
        ):
            object.__setattr__(self, name, value)
        else:
            setattr(self._module, name, value)
            if isinstance(value, torch.nn.Module):  # a module attached after construction
                root = self.__dict__["_root"].__dict__
                if "_index_map" in root:
                    root["_index_map"] = None  # the next run indexes (and can hook) it too

    def __getitem__(self, key: int | slice | str) -> Any:
        module = self._module
        names = list(module._modules)
        if isinstance(key, str):
            return self._child(key)
        if isinstance(key, slice):
            return [self._child(n) for n in names[key]]
        try:
            return self._child(names[key])
        except IndexError:
            raise IndexError(f"{self._path} has {len(names)} submodules; index {key} is out of range.") from None

    def __len__(self) -> int:
        return len(self._module._modules)

    def __iter__(self) -> Iterator["Envoy"]:
        # All children up front: a loop over blocks in a body resumes between served values,
        # with cold caches, so a lazy generator would cost a resume and a `_child` call each.
        return iter([self._child(n) for n in list(self._module._modules)])

    def modules(self, include_fn: Callable[["Envoy"], bool] | None = None, names: bool = False) -> list[Any]:
        """Every descendant envoy, then this one (each one's children before itself, as in
        nnsight); only those `include_fn(envoy)` accepts; `(path, envoy)` pairs if `names`."""
        result: list[Any] = []
        for child in self:
            result.extend(child.modules(include_fn=include_fn, names=names))
        if include_fn is None or include_fn(self):
            result.append((self._path, self) if names else self)
        return result

    def named_modules(self, include_fn: Callable[["Envoy"], bool] | None = None) -> list[tuple[str, "Envoy"]]:
        """`modules(include_fn, names=True)`: `(path, envoy)` pairs, e.g. `("model.layer1", envoy)`."""
        return self.modules(include_fn=include_fn, names=True)

    @property
    def device(self) -> torch.device | None:
        """The device of the module's first parameter (or buffer); None if it has neither."""
        for tensors in (self._module.parameters(), self._module.buffers()):
            for tensor in tensors:
                return tensor.device
        return None

    @property
    def devices(self) -> set[torch.device]:
        """The devices of all the module's parameters and buffers."""
        return {t.device for t in self._module.parameters()} | {t.device for t in self._module.buffers()}

    def get(self, path: str) -> "Envoy":
        """Envoy at a dotted path relative to this one (`model.get("transformer.h.0")`)."""
        envoy: Envoy = self
        for part in [p for p in path.split(".") if p]:
            envoy = envoy[int(part)] if part.lstrip("-").isdigit() else getattr(envoy, part)
        return envoy

    def __repr__(self) -> str:
        return self._root._tree_repr(self)

    # -- values inside a trace ----------------------------------------------------------------

    def _mediator(self, what: str) -> Mediator:
        mediator = current_mediator()
        if mediator is None:
            return self._scanned(what)  # type: ignore[return-value]
        return mediator

    def _scanned(self, what: str) -> Any:
        """Outside a trace: inside a local block running on the client, the block's reader
        (see `LOCAL_READER`); after `model.scan(...)`, what the scan saw this module take and
        give (fake tensors, for their shapes), as in nnsight; otherwise an error."""
        reader = getattr(getcurrent(), LOCAL_READER, None)
        if reader is not None:
            return reader.stand_in(self, what)
        scanned = self._root.__dict__.get("_scanned")
        seen = scanned.get(id(self._module)) if scanned else None
        if seen is None or seen[0] is not self._module:
            raise _outside_trace(self._path, what)
        return _ScannedValues(seen, self._path, what)

    def _idx(self) -> int:
        return self._root._module_index(self._module)

    def _locate(self, what: str) -> tuple[Mediator, int, int | None]:
        """The running invoke, this module's index and the call to address (None: the
        invoke's current step). The hot path of every `.output`, so written out flat."""
        mediator = getattr(getcurrent(), "mediator", None)
        if mediator is None:
            return self._scanned(what), 0, None  # type: ignore[return-value]
        d = self._root.__dict__
        index = d.get("_index_map")
        idx = index.get(id(self._module)) if index is not None else None
        if idx is None:
            idx = self._root._module_index(self._module)
        return mediator, idx, (0 if idx in d.get("_unstepped", ()) else None)

    @property
    def output(self) -> Any:
        """What the module returned (this invoke's rows). Assign to replace it."""
        mediator = getattr(getcurrent(), "mediator", None)  # `_locate` written out: the hot path
        d = self._root.__dict__
        index = d.get("_index_map")
        idx = index.get(id(self._module)) if index is not None else None
        if mediator is None or idx is None:
            mediator, idx, it = self._locate("output")
            return mediator.request(OUTPUT, idx, it)
        return mediator.request(OUTPUT, idx, 0 if idx in d["_unstepped"] else None)

    @output.setter
    def output(self, value: Any) -> None:
        mediator, idx, it = self._locate("output")
        mediator.swap(OUTPUT, idx, value, it)

    @property
    def inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`(args, kwargs)` the module was called with. Assign an `(args, kwargs)` pair to replace."""
        args, kwargs = self._mediator("inputs").request(INPUT, self._idx())
        return args, kwargs

    @inputs.setter
    def inputs(self, value: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
            raise TracingError(
                f"{self._path}.inputs must be set to an (args, kwargs) pair, e.g. "
                f"`{self._path}.inputs = ((hidden,), {{}})`; to replace the first argument only, "
                f"use `{self._path}.input = hidden`."
            )
        self._mediator("inputs").swap(INPUT, self._idx(), (tuple(value[0]), dict(value[1])))

    @property
    def input(self) -> Any:
        """The first argument the module was called with (or its first keyword argument)."""
        args, kwargs = self._mediator("input").request(INPUT, self._idx())
        if args:
            return args[0]
        if kwargs:
            return next(iter(kwargs.values()))
        raise TracingError(f"{self._path} was called with no arguments, so it has no `.input`.")

    @input.setter
    def input(self, value: Any) -> None:
        mediator = self._mediator("input")
        idx = self._idx()
        args, kwargs = mediator.request(INPUT, idx)
        if args:
            mediator.swap(INPUT, idx, ((value, *args[1:]), kwargs))
        elif kwargs:
            first = next(iter(kwargs))
            mediator.swap(INPUT, idx, (args, {**kwargs, first: value}))
        else:
            raise TracingError(f"{self._path} was called with no arguments, so `.input` cannot be set.")

    @property
    def source(self) -> Any:
        """The calls inside this module's forward, each readable and editable like a module
        (`attn.source.self_c_attn_0.output`); print it to list them (see `tracing/source.py`)."""
        if "source" in self._module._modules:  # a child module named `source` wins
            return self._child("source")
        return source_envoy(self)

    def skip(self, value: Any) -> None:
        """Do not run this module; use `value` as its output. Call before the module runs."""
        self._mediator("skip(...)").skip(self._idx(), value)

    def next(self, step: int = 1) -> "Envoy":
        """Move this invoke to the module's next call (generation step); returns self."""
        self._mediator("next()").step += step
        return self

    def __call__(self, *args: Any, hook: bool = False, **kwargs: Any) -> Any:
        """Call the module directly, e.g. the logit lens `model.lm_head(model.transformer.ln_f(h))`.

        Inside a trace this runs the module on the given values without touching the traced
        forward (no values are served and no call is counted). With `hook=True` (as in
        nnsight) the call is made on the model's side, as if the model made it: bodies waiting
        for this module or its submodules (e.g. in a later trace of an edited model) are served.
        """
        if hook:
            mediator = current_mediator()
            if mediator is not None and mediator.interleaver is not None and not mediator.inline:
                module = self._module
                return mediator.call_on_model_side(lambda: module(*args, **kwargs))
        return self._module(*args, **kwargs)


class _ScannedValues:
    """Stands in for a mediator outside a trace after `model.scan(...)`: reads give what the
    scan saw (`(module, (args, kwargs), output)`); writes are refused."""

    def __init__(self, seen: tuple[Any, Any, Any], path: str, what: str) -> None:
        self.seen, self.path, self.what = seen, path, what

    def request(self, kind: int, idx: int, it: int | None = None) -> Any:
        return self.seen[2] if kind == OUTPUT else self.seen[1]

    def swap(self, *args: Any, **kwargs: Any) -> None:
        raise _outside_trace(self.path, self.what)

    def skip(self, *args: Any, **kwargs: Any) -> None:
        raise _outside_trace(self.path, self.what)

    def __getattr__(self, name: str) -> Any:  # (`step` for next(), ...): outside a trace
        raise _outside_trace(self.path, self.what)


# -- `.source`: the calls inside a forward, as envoys (the rewriting is in source.py) -----------


class SourceEnvoy:
    """`module.source` (or `op.source`): one attribute per call in the function; print it for
    the list."""

    def __init__(self, owner: Envoy, accessor: Accessor) -> None:
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


MSG_OPERATION_IN_LOCAL_BLOCK = (
    "`{path}` is an operation inside a forward; a local block (`with interlace.local():`) can "
    "read modules (`.output`, `.input`, `.inputs`) but not operations. Read it in the body, "
    "before the block, and use the name inside:\n\n"
    "    value = {path}.{what}\n    with interlace.local():\n        ...  # use `value`"
)


class OperationEnvoy(Envoy):
    """One call in a forward: `.output`, `.input`, `.inputs` (get and set), `.skip(value)`, and
    `.source` (inside a trace) for the calls inside the function it calls."""

    def __init__(self, site: Site, owner: Envoy) -> None:
        object.__setattr__(self, "_module", owner._module)
        object.__setattr__(self, "_path", site.path)
        object.__setattr__(self, "_root", owner._root)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_site", site)

    def _running(self, what: str = "output.save()") -> Mediator:
        mediator = current_mediator()
        if mediator is None and getattr(getcurrent(), LOCAL_READER, None) is not None:
            raise TracingError(MSG_OPERATION_IN_LOCAL_BLOCK.format(path=self._path, what=what))
        if mediator is None or mediator.interleaver is None:
            raise TracingError(
                f"`{self._path}` can only be used inside a traced block that runs the model:\n\n"
                f"    with model.trace(inputs):\n        value = {self._path}.{what}"
            )
        return mediator

    def _idx(self) -> int:
        return op_index(self._running().interleaver, self._site)  # type: ignore[arg-type]

    def _locate(self, what: str) -> tuple[Mediator, int, int | None]:
        mediator = self._running()
        return mediator, op_index(mediator.interleaver, self._site), None  # type: ignore[arg-type]

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
        idx = op_index(il, self._site)
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
                j = op_index(il, site)
                il.started[j] = il.finished[j] = callee[1]
        cache = self.__dict__.setdefault("_sources", {})
        envoy = cache.get(id(accessor))
        if envoy is None or envoy._accessor is not accessor:
            envoy = cache[id(accessor)] = SourceEnvoy(self, accessor)
        return envoy

    def _inner_accessor(self, callee: Any) -> tuple[Accessor, bool]:
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
        function = function_of(callee)
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
        accessor = inner[function] = Accessor(function, label, self._path, site.accessor.roots)
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
    """`envoy.source` for the module's forward (kept on the envoy while its rewrite stands)."""
    cached = envoy.__dict__.get("_source_envoy")
    if cached is None or cached._accessor is not accessors.get(envoy._module):
        cached = SourceEnvoy(envoy, accessor_for(envoy))
        envoy.__dict__["_source_envoy"] = cached
    return cached


def make_envoy(root: Any, module: torch.nn.Module, path: str) -> Envoy:
    """The envoy for `module` at `path`: of the class the root's `envoys=` picks for it (see
    `NNsight`), with any submodule whose name an envoy attribute takes mounted (see
    `mount_clashes`)."""
    pick = getattr(type(root), "_envoy_class", None)
    cls = pick(root, module, path) if pick is not None else Envoy
    envoy = cls(module, path, root)
    mount_clashes(envoy)
    return envoy


#: Submodule names an envoy already gives their child for (`Envoy.source`).
_MOUNTED_ALREADY = frozenset({"source"})
_PRESERVED: dict[tuple[type, tuple[str, ...]], type] = {}


def mount_clashes(envoy: Envoy) -> None:
    """A module with a submodule named like an envoy attribute (BERT layers have an `output`
    submodule): as in nnsight, the attribute gives that submodule's envoy, and the envoy's own
    attribute moves to `nns_<name>` (`layer.output.dense` is the submodule,
    `layer.nns_output` the layer's output), for this envoy only. Assigning `.output` still
    replaces the module's output, as in nnsight."""
    cls = type(envoy)
    clashes = tuple(
        name for name in envoy._module._modules
        if name not in _MOUNTED_ALREADY and not name.startswith("_") and hasattr(cls, name)
    )
    if not clashes:
        return
    for name in clashes:
        warnings.warn(
            f"Module `{envoy._path}` of type `{type(envoy._module).__name__}` has a submodule named "
            f"`{name}`: `{envoy._path}.{name}` is that submodule, and the envoy's own `.{name}` is "
            f"`{envoy._path}.nns_{name}` for this module (as in nnsight).",
            stacklevel=3,
        )
    key = (cls, clashes)
    preserved = _PRESERVED.get(key)
    if preserved is None:
        namespace: dict[str, Any] = {"__module__": cls.__module__}
        for name in clashes:
            own = getattr_static(cls, name)
            namespace[f"nns_{name}"] = own
            setter = own.fset if isinstance(own, property) else None
            namespace[name] = property(lambda self, _name=name: self._child(_name), setter)
        preserved = _PRESERVED[key] = type(f"{cls.__name__}.Preserved", (cls,), namespace)
    object.__setattr__(envoy, "__class__", preserved)
