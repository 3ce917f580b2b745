"""Envoys: a mirror of the module tree through which a traced body reads and edits values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..errors import TracingError
from greenlet import getcurrent

from .interleaver import INPUT, OUTPUT, Mediator, current_mediator

if TYPE_CHECKING:
    from ..models.nnsight import NNsight

__all__ = ["Envoy"]


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
    _root: "NNsight"

    def __init__(self, module: torch.nn.Module, path: str, root: "NNsight | None" = None) -> None:
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
            envoy = Envoy(module, f"{self._path}.{name}", self._root)
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
        if name in ("output", "input", "inputs") or name in type(self).__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self._module, name, value)

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

    def modules(self) -> Iterator["Envoy"]:
        """This envoy and every descendant, parents first."""
        yield self
        for child in self:
            yield from child.modules()

    def named_modules(self) -> Iterator[tuple[str, "Envoy"]]:
        for envoy in self.modules():
            yield envoy._path, envoy

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
            raise _outside_trace(self._path, what)
        return mediator

    def _idx(self) -> int:
        return self._root._module_index(self._module)

    def _locate(self, what: str) -> tuple[Mediator, int, int | None]:
        """The running invoke, this module's index and the call to address (None: the
        invoke's current step). The hot path of every `.output`, so written out flat."""
        mediator = getattr(getcurrent(), "mediator", None)
        if mediator is None:
            raise _outside_trace(self._path, what)
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
        from .source import source_envoy

        return source_envoy(self)

    def skip(self, value: Any) -> None:
        """Do not run this module; use `value` as its output. Call before the module runs."""
        self._mediator("skip(...)").skip(self._idx(), value)

    def next(self, step: int = 1) -> "Envoy":
        """Move this invoke to the module's next call (generation step); returns self."""
        self._mediator("next()").step += step
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module directly, e.g. the logit lens `model.lm_head(model.transformer.ln_f(h))`.

        Inside a trace this runs the module on the given values without touching the traced
        forward (no values are served and no call is counted).
        """
        return self._module(*args, **kwargs)
