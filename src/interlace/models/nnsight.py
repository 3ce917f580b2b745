"""`NNsight`: wrap any `torch.nn.Module` so its inside can be read and edited in traces."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..backends import select_backend
from ..errors import TracingError
from ..tracing.envoy import Envoy, mount_clashes
from ..tracing.interleaver import Interleaver, Mediator, ModuleHooks, OrderTable
from ..tracing.iteration import StepLoop, run_steps
from ..tracing.local_block import local
from ..tracing.tracer import InterleavingTracer, Session

__all__ = ["NNsight"]

#: `envoys=` not given: the class's `envoys` attribute applies.
CLASS_DEFAULT: Any = type("ClassDefault", (), {"__repr__": lambda self: "<the class's envoys>"})()


class NNsight(Envoy):
    """The root envoy of a wrapped model.

    ```python
    model = NNsight(torch.nn.Sequential(...))
    with model.trace(x):
        hidden = model[0].output.save()
    ```
    `rename={"transformer.h": "layers", "mlp": "ffn"}` adds aliases: a dotted key is a path
    mounted on the root (`model.layers`), a plain name renames that child everywhere.

    `NNsight(model_key="org/name")` builds a model hosted on the server (CONFIG.API.HOST, or
    `host=`) from its description, without weights (see `hosted.py`): it traces with
    `remote=True` only. With a module, `model_key=` names the server's copy of it for
    `remote=True`. Module methods that return the module (`.to()`, `.eval()`, `.half()`, ...)
    return the wrapper, so `NNsight(net).to("cpu")` is still an NNsight.
    `envoys=` picks the Envoy class of every descendant (as in nnsight): one `Envoy`
    subclass for all, or a dict from module types (matched through the class's bases) or
    dotted path suffixes (`"attn"`, `"h.0.mlp"`) to subclasses; a subclass's `envoys` class
    attribute is the default.
    """

    #: The default `envoys=` of this class (a subclass may set its own).
    envoys: Any = None

    def __init__(
        self,
        module: torch.nn.Module | None = None,
        *,
        rename: dict[str, str | list[str]] | None = None,
        model_key: str | None = None,
        host: str | None = None,
        api_key: str | None = None,
        envoys: Any = CLASS_DEFAULT,
    ) -> None:
        hosted = None
        if module is None:
            if model_key is None:
                raise TypeError(
                    "NNsight needs a torch.nn.Module to wrap, or the key of a model hosted on a "
                    "server: `NNsight(net)` or `NNsight(model_key=\"org/name\")`."
                )
            from .hosted import load_hosted

            hosted = load_hosted(model_key, host=host, api_key=api_key)
            module = hosted.module
        if not isinstance(module, torch.nn.Module):
            hint = (f" For a model hosted on a server use `NNsight(model_key={module!r})`."
                    if isinstance(module, str) else "")
            raise TypeError(
                f"NNsight wraps a torch.nn.Module, got {type(module).__name__}. For a Hugging Face "
                f"model id or path use `interlace.LanguageModel(...)`.{hint}"
            )
        super().__init__(module, "model", None)
        d = self.__dict__
        d["model_key"] = model_key
        # Set for a model built from the server's description: no weights here (see hosted.py).
        d["_hosted"] = hosted
        # Where this model's remote traces go unless a trace names its own host/api_key.
        d["_remote_host"] = hosted.host if hosted is not None else host
        d["_remote_api_key"] = api_key
        d["_rename"], d["_root_aliases"], d["_name_aliases"] = _aliases_from(rename)
        d["_index_map"] = None
        d["_modules_list"] = []
        d["_paths_list"] = []
        d["_active"] = None
        d["_default_edits"] = []
        # Modules that are not part of the torch model but can be traced like them
        # (LanguageModel's `generator`); step loops do not apply to them.
        d["_extra_modules"] = {}
        # Names that may mean something other than the child module of that name (aliases,
        # extra modules): `Envoy.__getattr__` takes its shortcut only for other names.
        d["_shadow"] = set(d["_root_aliases"]) | set(d["_name_aliases"])
        d["_envoys"] = _check_envoys(type(self).envoys if envoys is CLASS_DEFAULT else envoys)
        mount_clashes(self)

    @contextlib.contextmanager
    def renamed(self, rename: dict[str, str | list[str]] | None) -> Iterator[None]:
        """Use `rename`'s aliases instead of this model's own while the block runs.

        The server runs each job with the aliases its client's model has (a job holds its
        model alone), so `model.layers[0]` means on the server what it means here.
        """
        d = self.__dict__
        saved = d["_rename"], d["_root_aliases"], d["_name_aliases"], d["_shadow"]
        d["_rename"], d["_root_aliases"], d["_name_aliases"] = _aliases_from(rename)
        d["_shadow"] = set(d["_root_aliases"]) | set(d["_name_aliases"]) | set(d["_extra_modules"])
        try:
            yield
        finally:
            d["_rename"], d["_root_aliases"], d["_name_aliases"], d["_shadow"] = saved

    def _envoy_class(self, module: torch.nn.Module, path: str) -> type[Envoy]:
        """The Envoy class for a descendant (`envoys=`): a type key matching the module's
        class or a base of it (nearest first) wins; then the first string key that is a
        dotted suffix of the path, component by component, where a component may also be
        spelled by its `rename` alias; else `Envoy`."""
        spec = self.__dict__.get("_envoys")
        if spec is None:
            return Envoy
        if isinstance(spec, type):
            return spec
        for base in type(module).__mro__:
            hit = spec.get(base)
            if hit is not None:
                return hit
        parts = path.split(".")[1:]
        aliases = self.__dict__["_name_aliases"]  # alias -> real name
        for key, cls in spec.items():
            if not isinstance(key, str):
                continue
            wanted = [k for k in key.lstrip(".").split(".") if k]
            if wanted and len(wanted) <= len(parts) and all(
                k == p or aliases.get(k) == p for k, p in zip(wanted, parts[len(parts) - len(wanted):])
            ):
                return cls
        return Envoy

    def _add_extra_module(self, name: str, module: torch.nn.Module) -> None:
        self.__dict__["_extra_modules"][name] = module
        self.__dict__["_shadow"].add(name)

    # -- module index (for the interleaver's per-module counters) -----------------------------

    def _rebuild_index(self) -> None:
        modules: list[torch.nn.Module] = []
        paths: list[str] = []
        index: dict[int, int] = {}
        for name, module in self._module.named_modules():
            index[id(module)] = len(modules)
            modules.append(module)
            paths.append(f"model.{name}" if name else "model")
        self.__dict__["_n_core"] = len(modules)
        self.__dict__["_order"] = None  # the call-order table belongs to this module index
        unstepped = set()
        for extra_name, extra in self.__dict__["_extra_modules"].items():
            for name, module in extra.named_modules(prefix=extra_name):
                index[id(module)] = len(modules)
                if module is extra:
                    unstepped.add(len(modules))
                modules.append(module)
                paths.append(f"model.{name}")
        self.__dict__["_unstepped"] = unstepped
        d = self.__dict__
        d["_index_map"], d["_modules_list"], d["_paths_list"] = index, modules, paths

    def _module_index(self, module: torch.nn.Module) -> int:
        index = self.__dict__["_index_map"]
        if index is None or id(module) not in index:
            self._rebuild_index()
            index = self.__dict__["_index_map"]
            if id(module) not in index:
                raise TracingError(f"{type(module).__name__} is not part of this model.")
        return index[id(module)]

    @property
    def _extra_modules(self) -> dict[str, torch.nn.Module]:
        return self.__dict__["_extra_modules"]

    def _child(self, name: str) -> Envoy:
        extra = self.__dict__["_extra_modules"].get(name)
        if extra is not None:
            children = self.__dict__["_children"]
            envoy = children.get(name)
            if envoy is None or envoy._module is not extra:
                envoy = children[name] = Envoy(extra, f"model.{name}", self)
            return envoy
        return super()._child(name)

    def _step_for(self, idx: int) -> int | None:
        """Call index to use for module `idx`: None means "the invoke's current step"."""
        return 0 if idx in self.__dict__.get("_unstepped", ()) else None

    def _result_envoy(self, kind: str) -> Envoy:
        return self

    # -- aliases --------------------------------------------------------------------------------

    def _alias_target(self, envoy: Envoy, name: str) -> Envoy | None:
        d = self.__dict__
        path = d["_root_aliases"].get(name)
        if path is not None:
            if envoy is self and path.split(".")[0] not in envoy._module._modules:
                return self.get(path)
            # A dotted rename names a path from where it starts: `{"transformer.h": "layers"}`
            # gives `model.layers`, `{"h.0": "first_layer"}` gives `model.transformer.first_layer`.
            if path.split(".")[0] in envoy._module._modules:
                return envoy.get(path)
        if envoy is self and name in d["_extra_modules"]:
            return self._child(name)
        real = d["_name_aliases"].get(name)
        if real is not None and real in envoy._module._modules:
            return envoy._child(real)
        return None

    def _tree_repr(self, envoy: Envoy) -> str:
        reverse_names = {v: k for k, v in self.__dict__["_name_aliases"].items()}

        def render(module: torch.nn.Module, indent: str) -> list[str]:
            extra = module.extra_repr()
            children = list(module._modules.items())
            if not children:
                return [f"{type(module).__name__}({extra})"]
            lines = [f"{type(module).__name__}(" + (extra if extra else "")]
            for name, child in children:
                label = f"{name}/{reverse_names[name]}" if name in reverse_names else name
                sub = render(child, indent + "  ")
                lines.append(f"{indent}  ({label}): {sub[0]}")
                lines.extend(sub[1:])
            lines.append(f"{indent})")
            return lines

        text = "\n".join(render(envoy._module, ""))
        if envoy is self and self.__dict__["_root_aliases"]:
            text += "\naliases: " + ", ".join(f"{a} -> {p}" for a, p in self.__dict__["_root_aliases"].items())
        return text

    # -- contexts -------------------------------------------------------------------------------

    def trace(self, *inputs: Any, remote: bool | str = False, backend: Any = None, **kwargs: Any) -> InterleavingTracer:
        """Run the model on `inputs` with the `with` body beside it.

        `remote=False` runs here, `remote="local"` runs the full remote path in-process (a
        faithful simulation), `remote=True` runs on an Interlace server.

        `trace=False` (as in nnsight) traces nothing: the input is prepared as a trace would
        prepare it and the model's output is returned (`out = model.trace(x, trace=False)`).
        """
        if "trace" in kwargs and kwargs["trace"] is not True:
            if kwargs.pop("trace") is False:
                return self._direct_call("trace", inputs, remote, backend, kwargs)
            raise TypeError("trace= takes True or False: `model.trace(x, trace=False)` returns the model's output.")
        kwargs.pop("trace", None)
        backend = self._backend_for(remote, backend, kwargs)
        return InterleavingTracer(self, *inputs, backend=backend, **kwargs)

    def all(self) -> StepLoop:
        """Every step of the run: `for step in model.all():`, or a bare `model.all()` (the rest runs each step)."""
        return run_steps()

    def local(self) -> contextlib.AbstractContextManager[None]:
        """`with model.local():` is `with interlace.local():` (the block runs on the client)."""
        return local()

    def _direct_call(self, kind: str, inputs: tuple, remote: Any, backend: Any, kwargs: dict[str, Any]) -> Any:
        """Run `kind` ("trace" or "generate") on `inputs` here, with no body, and return its
        output: what `model.trace(x, trace=False)` and a `model.generate(x)` that no `with`
        enters do (nnsight's direct call). The input is prepared exactly as a trace's."""
        if remote not in (False, None) or backend is not None:
            what = "model.trace(x, trace=False)" if kind == "trace" else f"model.{kind}(...)"
            example = (
                "    with model.trace(x, remote=True) as tracer:\n        out = tracer.result.save()"
                if kind == "trace" else
                "    with model.generate(x, max_new_tokens=2, remote=True) as tracer:\n"
                "        out = tracer.result.save()"
            )
            raise TracingError(
                f"{what} without a `with` block runs the model directly, which only works here "
                f"(remote=False), not with remote={remote!r} or a backend. Remote runs need a "
                f"`with` block; save what you want back:\n\n{example}"
            )
        self._before_run()
        if not self._has_input(inputs, kwargs):
            raise TracingError(
                f"model.{kind}(...) without a `with` block needs an input to run the model on: "
                f"`out = model.{kind}(x{', trace=False' if kind == 'trace' else ''})`."
            )
        args, kwargs, _ = self._batch([self._prepare_input(*inputs, **kwargs)])
        return self._call_directly(kind, args, kwargs)

    def _call_directly(self, kind: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Call the model on prepared inputs with no interleaver (see `_direct_call`)."""
        return self._call_model(kind, args, kwargs, None)

    def session(self, *, remote: bool | str = False, backend: Any = None, **kwargs: Any) -> Session:
        """Group several traces; values flow between them, only saved ones leave the session."""
        backend = self._backend_for(remote, backend, kwargs)
        if kwargs:
            raise TypeError(f"model.session() got unexpected arguments: {', '.join(kwargs)}")
        return Session(self, backend=backend)

    def scan(self, *inputs: Any, remote: bool | str = False, **kwargs: Any) -> Any:
        """Like `trace`, but with fake tensors: shapes and dtypes, no compute, no weights loaded.

        A scan runs here in every mode: fake tensors need neither the weights nor a server.
        `remote=` is accepted so that code written for a hosted model scans unchanged (it used
        to reach the model's forward as an unknown keyword argument)."""
        from ..tracing.scan import ScanningTracer

        if not (remote is False or remote is None or remote is True or remote == "local"):
            raise ValueError(f"remote must be False, True or 'local', not {remote!r}.")
        return ScanningTracer(self, *inputs, **kwargs)

    def edit(self, *, inplace: bool = False) -> Any:
        """`with model.edit() as edited:` records interventions applied to every later trace of
        `edited` (a copy sharing the modules); `inplace=True` edits this model itself."""
        from ..tracing.edit import EditingTracer

        return EditingTracer(self, inplace=inplace)

    def clear_edits(self) -> None:
        """Remove every edit recorded with `model.edit(...)` on this envoy."""
        self.__dict__["_default_edits"] = []

    def export_edits(self, path: Any) -> Any:
        """Write this envoy's edits to a safetensors file (source text + tensors; no pickle)."""
        from ..tracing.edit import export_edits

        return export_edits(self, path)

    def import_edits(self, path: Any) -> int:
        """Add the edits stored by `export_edits` (runs their source: use trusted files)."""
        from ..tracing.edit import import_edits

        return import_edits(self, path)

    def _backend_for(self, remote: bool | str, backend: Any, kwargs: dict[str, Any]) -> Any:
        if backend is not None:
            return backend
        d = self.__dict__
        if remote is True:
            if d["_remote_host"] is not None:
                kwargs.setdefault("host", d["_remote_host"])
            if d["_remote_api_key"] is not None:
                kwargs.setdefault("api_key", d["_remote_api_key"])
        elif d["_hosted"] is not None and remote in (False, None, "local"):
            from .hosted import refuse_local_run

            refuse_local_run(d["_hosted"].key, remote or False, kwargs)
        return select_backend(self, remote, kwargs)

    # -- torch.nn.Module methods that return the module (see SELF_RETURNING_METHODS) -----------

    def _apply_module_method(self, name: str, args: tuple, kwargs: dict[str, Any]) -> "NNsight":
        d = self.__dict__
        module = d["_module"]
        if d["_hosted"] is not None:  # no weights here: only what a meta module can take
            apply_without_weights(module, name, args, kwargs)
            return self
        result = getattr(module, name)(*args, **kwargs)
        if result is not module and isinstance(result, torch.nn.Module):
            self._replace_module(result)  # a module whose method returns a new module
        return self

    def _replace_module(self, module: torch.nn.Module) -> None:
        """Wrap `module` instead (LanguageModel's dispatch): a new module tree to index."""
        d = self.__dict__
        d["_module"] = module
        # Envoys the user holds (`layers = model.transformer.h` before the first run) stand
        # for the same paths in the new tree, as in nnsight: point them at its modules.
        extras = d["_extra_modules"]
        _rebind_children(self, module, keep=extras)
        d["_index_map"] = None
        d["_order"] = None  # a new module tree: record its call order again

    # -- what subclasses adapt ------------------------------------------------------------------

    def _prepare_input(self, *args: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        """Normalise one invoke's input; returns (args, kwargs, batch size)."""
        for values in (args, kwargs.values()):
            for value in values:
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    return args, kwargs, value.shape[0]
        return args, kwargs, 1

    def _has_input(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether `trace(...)` was given an input (otherwise its kwargs are options for invokes)."""
        return bool(args) or bool(kwargs)

    def _trace_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Options given to a trace whose inputs come from invokes; they apply to the whole batch."""
        return dict(kwargs)

    def _batch(self, prepared: list[tuple[tuple, dict, int]]) -> tuple[tuple, dict, int]:
        """Combine several invokes' inputs into one batch (concatenating tensors on dim 0)."""
        if len(prepared) == 1:
            args, kwargs, size = prepared[0]
            return args, kwargs, size
        total = sum(p[2] for p in prepared)
        first_args, first_kwargs, _ = prepared[0]
        try:
            args = tuple(_cat([p[0][i] for p in prepared]) for i in range(len(first_args)))
            kwargs = {k: _cat([p[1][k] for p in prepared]) for k in first_kwargs}
        except (IndexError, KeyError, TypeError, RuntimeError) as e:
            raise TracingError(
                f"Cannot batch these invokes' inputs for {type(self._module).__name__} ({e}). "
                "Invokes are batched by concatenating their tensors along dim 0, so each must "
                "pass the same arguments with matching shapes apart from the batch dimension. "
                "Otherwise use separate traces, or subclass NNsight and override `_batch`."
            ) from None
        return args, kwargs, total

    def _call_model(self, kind: str, args: tuple, kwargs: dict, interleaver: Interleaver | None) -> Any:
        return self._module(*args, **kwargs)

    def _runs_without_interleaver(self) -> bool:
        """Whether a trace whose body reads one value can run with no interleaver
        (`inline.run_one_read`): this class's `_call_model` must ignore its interleaver for
        traces (a subclass's own may not), and the run hooks must be the class's (a
        `model.edit()` copy sets its own on the instance; `.source` wraps every module)."""
        d = self.__dict__
        return (
            type(self)._call_model in CALLS_WITHOUT_INTERLEAVER
            and "_begin_run" not in d
            and "_end_run" not in d
            and not d.get("_no_lazy")
        )

    def _before_run(self) -> None:
        """Called before each local run (LanguageModel loads its weights here)."""
        hosted = self.__dict__["_hosted"]
        if hosted is not None:  # e.g. an explicit `backend=LocalBackend()`
            from .hosted import no_local_weights_error

            raise no_local_weights_error(hosted.key, False)

    def _edit_mediators(self, ns: dict[str, Any]) -> list[Mediator]:
        if not self.__dict__.get("_default_edits"):
            return []  # no edits recorded: skip the import below on every trace
        from ..tracing.edit import edit_mediators

        return edit_mediators(self, ns)

    def _new_interleaver(self, mediators: list[Mediator], batch_size: int, steps: int | None,
                         kind: type[Interleaver] = Interleaver) -> Interleaver:
        d = self.__dict__
        if d["_index_map"] is None:
            self._rebuild_index()
        modules = d["_modules_list"]
        hooks = d.get("_hooks")
        if hooks is None or hooks.modules is not modules:
            hooks = d["_hooks"] = ModuleHooks(modules)  # made once per module index
        return kind(modules, d["_paths_list"], mediators, batch_size, steps, hooks, d.get("_n_core"))

    def _begin_run(self, interleaver: Interleaver) -> None:
        d = self.__dict__
        if d["_active"] is not None:
            raise TracingError(
                "This model is already running a trace (in another thread, or a trace inside a "
                "trace's body). Run traces one after another, or group them in `model.session()`."
            )
        d["_active"] = interleaver
        if interleaver.needed is not None and not d.get("_no_lazy"):  # an inline body's reads
            interleaver.install_only(interleaver.needed)
            return
        # Wrap only what bodies need when a call-order table of this module index says every
        # module runs at most once per root forward (see OrderTable); otherwise wrap all and
        # record one. `.source` (`_no_lazy`) and shared modules always wrap everything.
        table = d.get("_order")
        if table is not None and (not table.valid or table.modules is not interleaver.modules):
            table = d["_order"] = None
        if d.get("_no_lazy"):
            interleaver.install()
        elif table is None:
            interleaver.install_recording()
        elif table.once:
            mediators = interleaver.mediators
            site = interleaver.site = mediators[0].code if len(mediators) == 1 else tuple([m.code for m in mediators])
            interleaver.install_lazy(table, table.ahead.get(site, ()))
        else:
            interleaver.install()

    def _end_run(self, interleaver: Interleaver) -> None:
        interleaver.hooks.uninstall(interleaver)
        d = self.__dict__
        d["_active"] = None
        events = interleaver.events
        if events is None:
            return
        interleaver.events = None
        table = interleaver.lazy
        if table is not None:
            # A lazy run: check the table still holds (else the next run records a new one);
            # if modules were wrapped mid-run, remember what this call site needed, so its next
            # run wraps that upfront (exact counters; see OrderTable.ahead).
            if not table.agrees(events, interleaver.n_core):
                table.valid = False
            elif len(interleaver.wrapped) != interleaver.upfront:  # type: ignore[arg-type]
                table.remember(interleaver.site, interleaver.wrapped, interleaver.n_core)  # type: ignore[arg-type]
        elif interleaver.recording and interleaver.completed and d.get("_modules_list") is interleaver.modules:
            d["_order"] = OrderTable.from_events(interleaver.modules, interleaver.n_core, events)


def _check_envoys(spec: Any) -> Any:
    """`envoys=` as given, once checked: None, an Envoy subclass, or a dict of them."""
    def is_envoy_class(value: Any) -> bool:
        return isinstance(value, type) and issubclass(value, Envoy)

    if spec is None or is_envoy_class(spec):
        return spec
    if isinstance(spec, dict) and all(
        is_envoy_class(v) and (isinstance(k, str) or (isinstance(k, type) and issubclass(k, torch.nn.Module)))
        for k, v in spec.items()
    ):
        return dict(spec)
    raise TypeError(
        f"envoys= takes an Envoy subclass, or a dict from module classes or path suffixes to Envoy "
        f"subclasses, got {spec!r}. For example:\n\n"
        "    class LinearEnvoy(interlace.Envoy):\n        ...\n\n"
        "    model = NNsight(net, envoys={torch.nn.Linear: LinearEnvoy, \"attn\": AttnEnvoy})"
    )


def _rebind_children(envoy: Envoy, module: torch.nn.Module, keep: Any = ()) -> None:
    children = envoy.__dict__["_children"]
    for name, child in list(children.items()):
        if name in keep:
            continue
        sub = module._modules.get(name)
        if sub is None or type(sub) is not type(child._module):
            del children[name]
            continue
        object.__setattr__(child, "_module", sub)
        _rebind_children(child, sub)


#: `_call_model` functions that ignore the interleaver for traces (`_runs_without_interleaver`).
CALLS_WITHOUT_INTERLEAVER = {NNsight._call_model}

#: `torch.nn.Module` methods that return the module itself. On a wrapper they return the
#: wrapper, so chains such as `NNsight(net).to("cpu").eval()` keep an NNsight (torch's own
#: `zero_grad`, `compile`, ... return None and pass through unchanged).
SELF_RETURNING_METHODS = (
    "to", "cpu", "cuda", "xpu", "ipu", "mtia", "to_empty", "type", "half", "float", "double",
    "bfloat16", "train", "eval", "requires_grad_", "apply", "share_memory",
)
#: Of those, the ones that move tensors to a device: a meta module (no weights yet, or none
#: here at all) cannot take them (they wait for the weights: see LanguageModel.dispatch).
_DEVICE_METHODS = frozenset({"cpu", "cuda", "xpu", "ipu", "mtia", "to_empty", "type", "share_memory"})


def apply_without_weights(module: torch.nn.Module, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
    """Apply what a meta-device module can take of a module method: dtype, mode, grad flags."""
    if name == "to":
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]  # torch's own parsing of .to(...)
        if dtype is not None:
            module.to(dtype=dtype)
    elif name not in _DEVICE_METHODS:
        getattr(module, name)(*args, **kwargs)


def _returns_wrapper(name: str) -> Any:
    def method(self: NNsight, *args: Any, **kwargs: Any) -> NNsight:
        return self._apply_module_method(name, args, kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"`torch.nn.Module.{name}` on the wrapped module; returns this wrapper."
    return method


for _name in SELF_RETURNING_METHODS:
    setattr(NNsight, _name, _returns_wrapper(_name))
del _name


def _cat(values: list[Any]) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values, dim=0)
    first = values[0]
    if all(v == first for v in values):
        return first
    raise TypeError("non-tensor arguments differ between invokes")


def _aliases_from(rename: dict[str, str | list[str]] | None) -> tuple[dict, dict[str, str], dict[str, str]]:
    """`rename` as (itself, root aliases, name aliases): a dotted key is a path mounted on
    the root (`model.layers`), a plain name renames that child everywhere."""
    root_aliases: dict[str, str] = {}
    name_aliases: dict[str, str] = {}
    for key, aliases in (rename or {}).items():
        key = key.lstrip(".")
        for alias in [aliases] if isinstance(aliases, str) else list(aliases):
            if "." in key:
                root_aliases[alias] = key
            else:
                name_aliases[alias] = key
    return dict(rename or {}), root_aliases, name_aliases
