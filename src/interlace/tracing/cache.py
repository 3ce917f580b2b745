"""`tracer.cache()`: every module's output (and optionally inputs) of a run, after edits.

```python
with model.trace(prompt) as tracer:
    cache = tracer.cache()                       # saved automatically
cache.model.transformer.h[0].output              # by attribute
cache["model.transformer.h.0"].output            # by path
```

The cache is filled by the interleaver's observers, which run at each module call after every
invoke's body has seen (and possibly replaced) the value, so it holds what the model actually
used. Values are detached and moved to `device` ("cpu" by default; None keeps them where
they are). During generation every entry is a list with one item per step; in a trace an
entry is a single `CacheEntry` (a list if the module ran several times in the forward).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from ..errors import TracingError
from .batching import _map, narrow
from .interleaver import current_mediator
from .saving import save

if TYPE_CHECKING:
    from ..models.nnsight import NNsight
    from .tracer import InterleavingTracer

__all__ = ["Cache", "CacheEntry", "start_cache"]


class CacheEntry:
    """One call of one module: `.output`, `.inputs` (`(args, kwargs)`, if cached) and `.input`."""

    __slots__ = ("output", "inputs")

    def __init__(self, output: Any, inputs: tuple[tuple, dict] | None) -> None:
        self.output = output
        self.inputs = inputs

    @property
    def input(self) -> Any:
        if self.inputs is None:
            raise TracingError("Inputs were not cached. Use `tracer.cache(include_inputs=True)`.")
        args, kwargs = self.inputs
        if args:
            return args[0]
        return next(iter(kwargs.values())) if kwargs else None

    def __repr__(self) -> str:
        return f"CacheEntry(output={_describe(self.output)}" + (", inputs=..." if self.inputs is not None else "") + ")"


class Cache(dict):
    """Maps module paths (`"model.transformer.h.0"`) to a `CacheEntry` (a list during generation).

    Attribute access walks the module tree: `cache.model.transformer.h[0].output`.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _CachePath(self, name)._step(name, first=True)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str) and not dict.__contains__(self, key) and dict.__contains__(self, f"model.{key}"):
            key = f"model.{key}"
        try:
            return dict.__getitem__(self, key)
        except KeyError:
            raise KeyError(
                f"{key!r} was not cached. Cached paths start with 'model.' (e.g. "
                f"{next(iter(self), 'model.layer')!r}); to cache a module pass it to "
                "`tracer.cache(modules=[...])`, and create the cache before the module runs."
            ) from None

    def __repr__(self) -> str:
        return "Cache(" + ", ".join(self.keys()) + ")"


class _CachePath:
    """A position in the cached module tree, reached by attributes and indexes."""

    def __init__(self, cache: Cache, path: str) -> None:
        self._cache = cache
        self._path = path

    def _step(self, name: str, first: bool = False) -> "_CachePath":
        path = name if first else f"{self._path}.{name}"
        if not any(k == path or k.startswith(path + ".") for k in self._cache):
            raise AttributeError(
                f"No cached module at {path!r}. Cached paths: {', '.join(list(self._cache)[:8])}"
                + (" ..." if len(self._cache) > 8 else "")
            )
        return _CachePath(self._cache, path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._step(name)

    def __getitem__(self, key: int | str) -> "_CachePath":
        if isinstance(key, int) and key < 0:
            prefix = self._path + "."
            children = sorted({int(k[len(prefix) :].split(".")[0]) for k in self._cache if k.startswith(prefix) and k[len(prefix) :].split(".")[0].isdigit()})
            if -key > len(children):
                raise IndexError(f"{self._path} has {len(children)} cached children; index {key} is out of range.")
            key = children[key]
        try:
            return self._step(str(key))
        except AttributeError:
            raise IndexError(f"No cached module at {self._path}.{key}.") from None

    @property
    def entry(self) -> Any:
        return self._cache[self._path]

    @property
    def output(self) -> Any:
        entry = self.entry
        return [e.output for e in entry] if isinstance(entry, list) else entry.output

    @property
    def inputs(self) -> Any:
        entry = self.entry
        return [e.inputs for e in entry] if isinstance(entry, list) else entry.inputs

    @property
    def input(self) -> Any:
        entry = self.entry
        return [e.input for e in entry] if isinstance(entry, list) else entry.input

    def __repr__(self) -> str:
        return f"<cache at {self._path}>"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def _resolve(model: "NNsight", modules: Iterable[Any] | None) -> list[int]:
    from .envoy import Envoy

    if modules is None:
        own = {id(m) for m in model._module.modules()}
        model._module_index(model._module)  # builds the index
        return [i for i, m in enumerate(model.__dict__["_modules_list"]) if id(m) in own]
    if isinstance(modules, (str, Envoy)):
        modules = [modules]
    indices = []
    for item in modules:
        if isinstance(item, Envoy):
            envoy = item
        elif isinstance(item, str):
            path = item[len("model.") :] if item.startswith("model.") else ("" if item == "model" else item)
            envoy = model.get(path)
        elif isinstance(item, torch.nn.Module):
            indices.append(model._module_index(item))
            continue
        else:
            raise TracingError(
                f"tracer.cache(modules=...) takes paths or envoys, got {type(item).__name__}: "
                "`tracer.cache(modules=['model.transformer.h.0', model.lm_head])`."
            )
        indices.append(model._module_index(envoy._module))
    return indices


def start_cache(
    tracer: "InterleavingTracer",
    modules: Iterable[Any] | None = None,
    include_inputs: bool = False,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> Cache:
    mediator = current_mediator()
    if mediator is None or mediator.interleaver is None:
        raise TracingError(
            "tracer.cache() can only be called while the model runs: inside a trace with an input, "
            "or inside an invoke:\n\n    with model.trace(prompt) as tracer:\n        cache = tracer.cache()"
        )
    model = tracer.model
    assert model is not None
    il = mediator.interleaver
    indices = _resolve(model, modules)
    cache = Cache()
    generation = tracer.kind == "generate"
    group = mediator.group
    paths = il.paths

    def convert(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype)
        return t

    def observe(idx: int, n: int, args: tuple, kwargs: dict, out: Any) -> None:
        total = il.batch_size
        value = _map(narrow(out, group, total), convert)
        inputs = None
        if include_inputs:
            inputs = _map((tuple(narrow(args, group, total)), dict(narrow(kwargs, group, total))), convert)
        entry = CacheEntry(value, inputs)
        path = paths[idx]
        old = dict.get(cache, path)
        if old is None:
            dict.__setitem__(cache, path, [entry] if generation else entry)
        elif isinstance(old, list):
            old.append(entry)
        else:
            dict.__setitem__(cache, path, [old, entry])

    if il.lazy is not None:  # a lazy run wraps the observed modules now
        for idx in indices:
            if idx < il.n_core and idx not in il.wrapped:
                il.wrap_lazily(idx, mediator.current)
                if il.lazy is None:
                    break
    missed = []
    for idx in indices:
        if il.finished[idx] > 0 and not generation:
            missed.append(paths[idx])
        il.observers.setdefault(idx, []).append(observe)
    if missed:
        warnings.warn(
            f"tracer.cache() was created after {', '.join(missed[:3])}{' ...' if len(missed) > 3 else ''} "
            "had already run, so those calls are not in the cache. Create the cache at the start of the body.",
            stacklevel=3,
        )
    return save(cache)
