"""`tracer.cache()`: every module's output (and optionally inputs) of a run, after edits.

```python
with model.trace(prompt) as tracer:
    cache = tracer.cache()                       # saved automatically
cache.model.transformer.h[0].output              # by attribute
cache["model.transformer.h.0"].output            # by path
```

The cache is filled by the interleaver's observers, which run at each module call after every
invoke's body has seen (and possibly replaced) the value, so it holds what the model actually
used. Values are detached (unless `detach=False`) and moved to `device` ("cpu" by default;
None keeps them where they are). During generation every entry is a list with one item per
step; in a trace an entry is a single `CacheEntry` (a list if the module ran several times in
the forward). The returned `Cache` is data (see `cache_entries.py`), so it comes back from a
server like any saved dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol

import torch

from ..errors import TracingError, warn
from .batching import map_tensors, narrow
from .cache_entries import NOT_CACHED, Cache, CacheEntry
from .mediator import current_mediator
from .saving import save

if TYPE_CHECKING:
    from .host import Host

__all__ = ["Cache", "CacheEntry", "CacheOwner", "start_cache"]


class CacheOwner(Protocol):
    """The tracer a cache starts from (`tracer.InterleavingTracer`), as far as the cache uses it."""

    model: Host | None
    kind: str  # "generate" keeps every step's entry in a list


def _resolve(model: "Host", modules: Iterable[Any] | None) -> list[int]:
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


def _as_data(value: Any) -> Any:
    """`value` with every Hugging Face KV cache replaced by a snapshot of its tensors.

    A KV cache object is shared with the running model and grows in place at every
    generation step, so keeping it would not record this call; it is also not data and could
    not come back from a server. The snapshot is the layout older transformers returned,
    `((keys, values), ...)` one pair per layer, narrowed and moved like any tensor.
    """
    if isinstance(value, torch.Tensor):
        return value
    if _is_kv_cache(value):
        return tuple((getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in value.layers)
    if isinstance(value, (tuple, list, dict)) and _holds_kv_cache(value):
        if isinstance(value, dict):
            return _rebuild_mapping(value, {k: _as_data(v) for k, v in value.items()})
        items = [_as_data(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _is_kv_cache(value: Any) -> bool:
    return hasattr(value, "layers") and any(
        c.__name__ == "Cache" and c.__module__.startswith("transformers.") for c in type(value).__mro__
    )


def _holds_kv_cache(value: Any, depth: int = 0) -> bool:
    if depth > 4:
        return False
    items = value.values() if isinstance(value, dict) else value
    return any(_is_kv_cache(v) or (isinstance(v, (tuple, list, dict)) and _holds_kv_cache(v, depth + 1)) for v in items)


def _rebuild_mapping(original: dict, mapped: dict) -> dict:
    if type(original) is dict:
        return mapped
    try:  # ModelOutput and other dict subclasses keep their type
        return type(original)(**mapped)
    except Exception:
        return mapped


def start_cache(
    tracer: CacheOwner,
    modules: Iterable[Any] | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    detach: bool = True,
    include_output: bool = True,
    include_inputs: bool = False,
) -> Cache:
    mediator = current_mediator()
    if mediator is None or mediator.interleaver is None:
        raise TracingError(
            "tracer.cache() can only be called while the model runs: inside a trace with an input, "
            "or inside an invoke:\n\n    with model.trace(prompt) as tracer:\n        cache = tracer.cache()"
        )
    if not include_output and not include_inputs:
        raise TracingError(
            "tracer.cache(include_output=False, include_inputs=False) would cache nothing; "
            "keep one: `tracer.cache(include_inputs=True, include_output=False)`."
        )
    model = tracer.model
    assert model is not None
    il = mediator.interleaver
    indices = _resolve(model, modules)
    d = model.__dict__
    cache = Cache(root_aliases=d.get("_root_aliases"), name_aliases=d.get("_name_aliases"))
    generation = tracer.kind == "generate"
    group = mediator.group
    paths = il.paths

    def convert(t: torch.Tensor) -> torch.Tensor:
        if detach:
            t = t.detach()
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype)
        return t

    def observe(idx: int, n: int, args: tuple, kwargs: dict, out: Any) -> None:
        total = il.batch_size
        value = map_tensors(narrow(_as_data(out), group, total), convert) if include_output else NOT_CACHED
        inputs = NOT_CACHED
        if include_inputs and n >= begun.get(idx, 0):  # (a call begun before the cache: no inputs)
            args, kwargs = _as_data(tuple(args)), _as_data(dict(kwargs))
            inputs = map_tensors((tuple(narrow(args, group, total)), dict(narrow(kwargs, group, total))), convert)
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
    # Calls already begun (the body is inside them) give their output but not their inputs.
    begun = {idx: il.started[idx] for idx in indices if il.started[idx] > il.finished[idx]}
    serving = mediator.current
    now = (serving.idx, serving.n) if serving is not None and serving.kind else None
    missed = []
    for idx in indices:
        if now is not None and idx == now[0]:
            begun[idx] = now[1] + 1  # its output is being served now: it goes in, its inputs not
        elif il.finished[idx] > 0 and not generation:
            missed.append(paths[idx])
        il.observers.setdefault(idx, []).append(observe)
    if missed:
        warn(
            f"tracer.cache() was created after {', '.join(missed[:3])}{' ...' if len(missed) > 3 else ''} "
            "had already run, so those calls are not in the cache. Create the cache at the start of the body.",
            stacklevel=3,
        )
    return save(cache)
