"""What `tracer.cache()` returns: `Cache` (module path -> `CacheEntry`) and its lookups.

Plain data on purpose: a cache made on a server travels back through the value codec
(`contract/values/`, tags `cache` and `cacheentry`) as its entries and alias tables, and
decodes into these same classes, so every lookup below works the same in all three modes.
This module imports nothing from the engine, so the codec can import it.

Lookups, as in nnsight:

```python
cache["model.transformer.h.0"].output          # by path ("model." may be left out)
cache.model.transformer.h[0].output            # by attribute path, as on the model
cache.model.transformer["h.0"].output          # a dotted rest of the path
cache.model.layers[0].output                   # through the model's `rename=` aliases
```
"""

from __future__ import annotations

from typing import Any

import torch


__all__ = ["Cache", "CacheEntry", "NOT_CACHED"]


class _NotCached:
    """Marks an entry's part that `tracer.cache(...)` was told not to keep."""

    _instance: "_NotCached | None" = None

    def __new__(cls) -> "_NotCached":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_CACHED"


NOT_CACHED: Any = _NotCached()


class CacheEntry:
    """One call of one module: `.output`, `.inputs` (`(args, kwargs)`) and `.input`.

    A part the cache was told not to keep reads as None, as in nnsight.
    """

    __slots__ = ("_output", "_inputs")

    def __init__(self, output: Any = NOT_CACHED, inputs: tuple[tuple, dict] | Any = NOT_CACHED) -> None:
        self._output = output
        self._inputs = inputs

    @property
    def has_output(self) -> bool:
        return self._output is not NOT_CACHED

    @property
    def has_inputs(self) -> bool:
        return self._inputs is not NOT_CACHED

    @property
    def output(self) -> Any:
        """The module's output; None if outputs were not cached (`include_output=False`)."""
        return None if self._output is NOT_CACHED else self._output

    @property
    def inputs(self) -> tuple[tuple, dict] | None:
        """`(args, kwargs)`; None, as in nnsight, if inputs were not cached (pass
        `tracer.cache(include_inputs=True)`) or the module had started before the cache."""
        return None if self._inputs is NOT_CACHED else self._inputs

    @property
    def input(self) -> Any:
        if self._inputs is NOT_CACHED:
            return None
        args, kwargs = self._inputs
        if args:
            return args[0]
        return next(iter(kwargs.values())) if kwargs else None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CacheEntry):
            return NotImplemented
        return _same(self._output, other._output) and _same(self._inputs, other._inputs)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        parts = []
        if self.has_output:
            parts.append(f"output={_describe(self._output)}")
        if self.has_inputs:
            parts.append("inputs=...")
        return "CacheEntry(" + ", ".join(parts) + ")"


class Cache(dict):
    """Maps module paths (`"model.transformer.h.0"`) to a `CacheEntry`, or to a list of them
    (one per call) during generation or when a module ran several times.

    `root_aliases` and `name_aliases` are the model's `rename=` tables (alias -> real dotted
    path mounted at the root, and alias -> real child name anywhere), so alias paths find
    the same entries as on the model.
    """

    def __init__(
        self,
        entries: Any = (),
        *,
        root_aliases: dict[str, str] | None = None,
        name_aliases: dict[str, str] | None = None,
    ) -> None:
        super().__init__(entries)
        self.__dict__["root_aliases"] = dict(root_aliases or {})
        self.__dict__["name_aliases"] = dict(name_aliases or {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _CachePath(self, "")._step(name)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str) and not dict.__contains__(self, key):
            real = self.real_path(key)
            if dict.__contains__(self, real):
                key = real
        try:
            return dict.__getitem__(self, key)
        except KeyError:
            raise KeyError(
                f"{key!r} was not cached. Cached paths start with 'model.' (e.g. "
                f"{next(iter(self), 'model.layer')!r}); to cache a module pass it to "
                "`tracer.cache(modules=[...])`, and create the cache before the module runs."
            ) from None

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        return isinstance(key, str) and dict.__contains__(self, self.real_path(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def real_path(self, path: str) -> str:
        """`path` with "model." added if missing and aliases replaced by real names."""
        parts = path.split(".") if path else []
        if not parts or parts[0] != "model":
            parts = ["model", *parts]
        out = ["model"]
        for part in parts[1:]:
            if part in self.root_aliases and not self._has_prefix(".".join([*out, part])):
                # a dotted rename, from where its path starts (the root or deeper)
                target = self.root_aliases[part].split(".")
                if len(out) == 1 or self._has_prefix(".".join([*out, *target])):
                    out.extend(target)
                    continue
            if part in self.name_aliases and not self._has_prefix(".".join([*out, part])):
                part = self.name_aliases[part]
            out.append(part)
        return ".".join(out)

    def _has_prefix(self, path: str) -> bool:
        dotted = path + "."
        return any(k == path or k.startswith(dotted) for k in dict.keys(self))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict):
            return NotImplemented
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Cache(" + ", ".join(self.keys()) + ")"


class _CachePath:
    """A position in the cached module tree, reached by attributes and indexes."""

    def __init__(self, cache: Cache, path: str) -> None:
        self._cache = cache
        self._path = path

    def _step(self, name: str) -> "_CachePath":
        path = f"{self._path}.{name}" if self._path else name
        real = self._cache.real_path(path)
        if not self._cache._has_prefix(real):
            cached = list(self._cache)
            raise AttributeError(
                f"No cached module at {path!r}. Cached paths: {', '.join(cached[:8])}"
                + (" ..." if len(cached) > 8 else "")
            )
        return _CachePath(self._cache, path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._step(name)

    def __getitem__(self, key: int | str) -> "_CachePath":
        if isinstance(key, int) and key < 0:
            prefix = self._cache.real_path(self._path) + "."
            children = sorted({
                int(k[len(prefix):].split(".")[0])
                for k in self._cache
                if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()
            })
            if -key > len(children):
                raise IndexError(f"{self._path} has {len(children)} cached children; index {key} is out of range.")
            key = children[key]
        try:
            return self._step(str(key))
        except AttributeError:
            prefix = self._cache.real_path(self._path) + "."
            listed = any(k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit() for k in self._cache)
            if isinstance(key, int) and listed:
                raise IndexError(f"Index {key} is out of range: no cached module at {self._path}.{key}.") from None
            # as in nnsight: a module that is not a list cannot be indexed
            raise KeyError(f"No cached module at {self._path}[{key!r}]; {self._path} is not a module list.") from None

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


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return type(value).__name__ + "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__
