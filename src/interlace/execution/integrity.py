"""Model integrity (the sandbox's layer 4): after every job the hosted model is exactly as before.

A job runs beside a model that the next job runs beside too (on a server, another user's; under
the simulation, the caller's own model). Layers 1 and 2 refuse the paths a job could change it
by; this layer does not trust them. A `ModelGuard` keeps a *baseline* of one model, taken once:

- every parameter and buffer: the tensor object, its in-place `_version`, `data_ptr`, shape,
  stride, dtype, device, `requires_grad`, and a few sampled elements (writes through `.data`
  or a numpy view change values without bumping `_version`; the sample catches a changed
  weight even then, at a fraction of a microsecond per tensor);
- every module's class and `__dict__` (the module tree is the `_modules` dicts, hooks are the
  hook dicts, attributes such as `training` or `eps` and a replaced function are entries),
  every dict, list or set directly in it (by the identity of what it holds), and the
  `__dict__` of plain objects it holds (the model's `config`);
- the `__dict__` of the module classes and their bases, of the modules that define them, and
  of `torch`, `torch.nn.functional` and `torch.Tensor` (a patched function changes every
  later job).

`begin()` before a job and `verify_and_restore()` after it compare the model with the
baseline by identity (no copy, and a namespace whose dict version counter has not moved is
not looked into, `dict_versions.py`: a few hundred microseconds for GPT-2 small, see
`tests/execution/test_integrity.py`) and put back whatever differs: entries and containers
from the baseline's shallow copies, weight values from the pristine CPU copy. What cannot be
put back exactly is reported (`Integrity.needs_recycle`, `needs_recycle(model)`): the server's
worker process then exits and a fresh one starts from the model's files.

Under the simulation the baseline follows the caller: a model the caller changed between
traces (a local edit of a weight, a new hook) is re-baselined at the next job's start, so only
what the job itself did is undone. Its pristine copy of the weights is host memory equal to the
model's size; over `SIMULATION_SNAPSHOT_MAX_BYTES` none is kept, and a job that changed weights
then fails with the model left changed (said in its message).
"""

from __future__ import annotations

import operator
import threading
from itertools import chain
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..tracing.source import accessors
from . import process_state
from .dict_versions import tag_cell, tag_value
from .fake import fake_run_active

__all__ = [
    "BUILD_LOCK", "Integrity", "ModelGuard", "SIMULATION_SNAPSHOT_MAX_BYTES", "guard_for", "needs_recycle",
]

#: Held while this process builds a transformers model (`models/`: `from_pretrained`,
#: `from_config`, and transformers' lazy first import). Building patches process-wide state and
#: puts it back after (`PreTrainedModel.tie_weights` swapped for a no-op, the default dtype,
#: `torch.nn.init`): two builds in two threads save each other's patch as "the original", and
#: every later load in the process leaves its tied weights (`lm_head`) on the meta device. A
#: guard's baseline and restore take it too, so they never record or put back a build's patch.
BUILD_LOCK = threading.RLock()

#: The simulation keeps a CPU copy of the caller's weights (to undo a job that changed them)
#: only for models up to this size; a server always keeps one.
SIMULATION_SNAPSHOT_MAX_BYTES = 4 * 1024**3

#: Elements sampled per tensor for the content check.
SAMPLES_PER_TENSOR = 8

_is = operator.is_
_values = operator.methodcaller("values")
_CONTAINERS = (dict, list, set)
_NOT_OBJECTS = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                torch.nn.Module, torch.Tensor, str, bytes, int, float, complex, bool, tuple, frozenset)


@dataclass
class Integrity:
    """What a job left changed, and whether it was all put back."""

    changed: list[str] = field(default_factory=list)  # what differed, in words (attributes, hooks, state)
    weights: list[str] = field(default_factory=list)  # parameters and buffers whose values changed
    unrestored: list[str] = field(default_factory=list)  # what could not be put back exactly

    @property
    def needs_recycle(self) -> bool:
        """The model (or the process) is not as before: the worker must be replaced."""
        return bool(self.unrestored)

    @property
    def clean(self) -> bool:
        return not (self.changed or self.weights or self.unrestored)


class _Dict:
    """A dict-like namespace's entries, compared by identity. `owner` is the class for a class
    dict (a mappingproxy, changed through setattr) or None for a plain dict."""

    __slots__ = ("label", "live", "keys", "values", "owner", "shared")

    def __init__(self, label: str, live: Any, owner: Any = None, shared: bool = False) -> None:
        self.label = label
        self.live = live
        self.keys = tuple(live)
        self.values = tuple(live.values())
        self.owner = owner
        self.shared = shared  # a Python module's globals: other threads read them meanwhile

    def same(self) -> bool:
        live = self.live
        return tuple(live) == self.keys and all(map(_is, live.values(), self.values))

    def diff(self) -> list[str]:
        live = self.live
        old = dict(zip(self.keys, self.values))
        names = [k for k in live if k not in old or live[k] is not old[k]]
        names += [k for k in old if k not in live]
        return sorted(set(map(str, names)))

    def restore(self) -> None:
        live, old = self.live, dict(zip(self.keys, self.values))
        if self.owner is not None:  # a class: its dict is read-only, setattr keeps caches right
            for k in [k for k in live if k not in old]:
                delattr(self.owner, k)
            for k, v in old.items():
                if live.get(k, _MISSING) is not v:
                    setattr(self.owner, k, v)
        elif self.shared:  # never empty, even for a moment
            for k in [k for k in live if k not in old]:
                del live[k]
            for k, v in old.items():
                if live.get(k, _MISSING) is not v:
                    live[k] = v
        else:  # an instance dict or a container: back in the same order (hooks run in order)
            live.clear()
            live.update(old)


class _Seq:
    __slots__ = ("label", "live", "values")

    def __init__(self, label: str, live: Any) -> None:
        self.label = label
        self.live = live
        self.values = tuple(live)

    def same(self) -> bool:
        live = self.live
        if isinstance(live, set):
            return len(live) == len(self.values) and all(v in live for v in self.values)
        return len(live) == len(self.values) and all(map(_is, live, self.values))

    def diff(self) -> list[str]:
        return ["(contents)"]

    def restore(self) -> None:
        if isinstance(self.live, set):
            self.live.clear()
            self.live.update(self.values)
        else:
            self.live[:] = self.values


_MISSING = object()
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


class _Tensor:
    """One parameter or buffer: what in-place changes move, and a few sampled values."""

    __slots__ = ("name", "tensor", "version", "ptr", "shape", "stride", "offset", "storage", "dtype",
                 "device", "requires_grad", "index", "view", "sample", "pristine", "hooks")

    def __init__(self, name: str, t: torch.Tensor, pristine: torch.Tensor | None, rng: np.random.Generator) -> None:
        self.name = name
        self.tensor = t
        self.version = t._version
        self.ptr = t.data_ptr()
        self.shape = t.shape
        self.stride = t.stride()
        self.offset = t.storage_offset()
        self.storage = t.untyped_storage()  # kept alive: a job that swapped it gets the same memory back
        self.dtype = t.dtype
        self.device = t.device
        self.requires_grad = t.requires_grad
        self.pristine = pristine
        # Tensor hooks (`w.register_hook(fn)`) live on the tensor, not in a module dict.
        self.hooks = {attr: (d, None if d is None else dict(d))
                      for attr in _TENSOR_HOOKS for d in [getattr(t, attr, None)]}
        n = t.numel()
        self.index = np.unique(rng.integers(0, n, size=min(n, SAMPLES_PER_TENSOR))) if n else np.zeros(0, np.int64)
        self.view = _flat_view(t)
        self.sample = self.read_sample()

    def read_sample(self) -> bytes:
        if self.view is not None:
            return self.view[self.index].tobytes()
        if self.tensor.numel() == 0 or self.tensor.is_meta:  # meta: no values (a dry run's model)
            return b""
        # Not on the CPU (or a dtype numpy lacks): a gather on the tensor's device.
        with torch.no_grad():
            picked = self.tensor.detach().reshape(-1)[torch.as_tensor(self.index, device=self.device)]
            return picked.to("cpu").view(torch.uint8).numpy().tobytes()

    def meta_same(self) -> bool:
        t = self.tensor
        return (t._version == self.version and t.data_ptr() == self.ptr and t.shape == self.shape
                and t.stride() == self.stride and t.requires_grad == self.requires_grad)

    def same(self) -> bool:
        return self.meta_same() and self.read_sample() == self.sample

    def hooks_same(self) -> bool:
        t = self.tensor
        for attr, (table, items) in self.hooks.items():
            now = getattr(t, attr, None)
            if now is not table or (table is not None and (len(table) != len(items) or
                                                           not all(map(_is, table.values(), items.values())))):
                return False
        return True

    def restore_hooks(self) -> None:
        for attr, (table, items) in self.hooks.items():
            if table is not None:
                table.clear()
                table.update(items)
            setattr(self.tensor, attr, table)

    def restore(self) -> bool:
        """Put the original memory and values back; False when there is no copy to take them from."""
        t = self.tensor
        with torch.no_grad():
            if t.data_ptr() != self.ptr or t.shape != self.shape or t.stride() != self.stride or t.dtype != self.dtype:
                t.set_(self.storage, self.offset, self.shape, self.stride)
            if t.requires_grad != self.requires_grad:
                t.requires_grad_(self.requires_grad)
            if self.pristine is None:
                return t._version == self.version and self.read_sample() == self.sample
            t.copy_(self.pristine.to(t.device))
        # The next job compares against the version the copy left.
        self.version = t._version
        return self.read_sample() == self.sample


def _flat_view(t: torch.Tensor) -> Any:
    """A numpy view of a CPU tensor's elements (no copy), for sampling without a torch op."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    try:
        arr = t.detach().numpy()
    except (TypeError, RuntimeError):  # bfloat16 and friends: view the bytes as integers instead
        try:
            width = t.element_size()
            as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
            arr = t.detach().view(as_int).numpy()
        except (KeyError, RuntimeError, TypeError):
            return None
    return arr.reshape(-1)


class ModelGuard:
    """The baseline of one hosted model, and the check and restore around each job."""

    def __init__(self, module: torch.nn.Module, *, pristine: bool, follow_caller: bool,
                 host: Any = None) -> None:
        self.module = module
        # The wrapper a job's body holds (`model`: its class, its tokenizer), watched like the
        # modules: a class-level change there reaches every later job too.
        self.host = host
        self.keep_pristine = pristine
        self.follow_caller = follow_caller  # simulation: re-baseline when the caller changed the model
        self.tainted: list[str] = []
        self._rng = np.random.default_rng()  # private: a job cannot read where samples are taken
        self._globals = process_state.capture() if not follow_caller else None
        self._baseline()

    # -- baseline -------------------------------------------------------------------------

    def _baseline(self) -> None:
        module = self.module
        modules = list(module.modules())
        self.modules = modules
        self.classes = [(m, type(m)) for m in modules]
        dicts: list[Any] = []
        seen: set[int] = set()
        for i, m in enumerate(modules):
            d = m.__dict__
            dicts.append(_Dict(f"module #{i} ({type(m).__name__})", d))
            for key, value in d.items():
                self._contents(dicts, f"{type(m).__name__}.{key}", value, seen)
        for cls in {c for m in modules for c in type(m).__mro__ if c is not object}:
            dicts.append(_Dict(f"class {cls.__qualname__}", vars(cls), owner=cls))
        for name in {c.__module__ for m in modules for c in type(m).__mro__} | {"torch", "torch.nn.functional"}:
            mod = __import__("sys").modules.get(name)
            if mod is not None:
                # (`warnings` adds this registry on a module's first warning: made now, so a
                # warning is not a change; its contents are not watched)
                mod.__dict__.setdefault("__warningregistry__", {})
                dicts.append(_Dict(f"module {name}", mod.__dict__, shared=True))
                for key, value in mod.__dict__.items():  # module-level hook tables and registries
                    if isinstance(value, (dict, list, set)) and key not in ("__warningregistry__", "__builtins__"):
                        self._contents(dicts, f"{name}.{key}", value, seen)
        dicts.append(_Dict("class torch.Tensor", vars(torch.Tensor), owner=torch.Tensor))
        host = self.host
        if host is not None:
            tokenizer = host.__dict__.get("tokenizer")
            watched = [c for c in type(host).__mro__ if c is not object]
            if tokenizer is not None:
                watched += [c for c in type(tokenizer).__mro__ if c is not object]
                if isinstance(getattr(tokenizer, "__dict__", None), dict):
                    dicts.append(_Dict(f"tokenizer ({type(tokenizer).__name__})", tokenizer.__dict__))
                    for key, value in tokenizer.__dict__.items():
                        self._contents(dicts, f"tokenizer.{key}", value, seen)
            known = {id(c) for m in modules for c in type(m).__mro__}
            for cls in dict.fromkeys(watched):
                if id(cls) not in known:
                    dicts.append(_Dict(f"class {cls.__qualname__}", vars(cls), owner=cls))
        self.dicts = dicts
        # The fast path compares everything at once, in C loops (chained iteration, `is` by
        # `map`): one Python call per namespace would cost about 1 ms for GPT-2 small.
        # Most containers (hook dicts) are empty: the length check covers them, the others are
        # compared entry by entry.
        self._lives = tuple(d.live for d in dicts)
        self._lens = list(map(len, self._lives))
        # Non-empty dicts by their version counter (`dict_versions.py`); the rest (lists, sets, a
        # dict without one) entry by entry.
        cells = [(d, tag_cell(d.live)) if d.live and isinstance(d, _Dict) else (d, None) for d in dicts]
        self._tagged = [d for d, c in cells if c is not None]
        self._cells = tuple(c for d, c in cells if c is not None)
        self._tags = list(map(tag_value, self._cells))
        self._full = tuple(d.live for d, c in cells if d.live and c is None)
        self._dict_lives = tuple(d.live for d, c in cells if d.live and c is None and isinstance(d, _Dict))
        self._flat_keys = tuple(chain.from_iterable(self._full))
        self._flat_values = tuple(chain.from_iterable(map(_values, self._dict_lives)))
        self.tensors = self._tensor_baseline()
        self.vocabulary = _vocabulary(self.host)
        self.hook_id = torch.utils.hooks.RemovableHandle.next_id

    def _contents(self, out: list[Any], label: str, value: Any, seen: set[int]) -> None:
        if id(value) in seen:
            return
        kind = type(value)
        if kind in _CONTAINERS or isinstance(value, dict):
            seen.add(id(value))
            out.append(_Dict(label, value) if isinstance(value, dict) else _Seq(label, value))
        elif not isinstance(value, _NOT_OBJECTS) and value is not None and hasattr(value, "__dict__") \
                and isinstance(getattr(value, "__dict__", None), dict):
            seen.add(id(value))  # a plain object the module holds (the model's config)
            out.append(_Dict(f"{label} ({kind.__name__})", value.__dict__))
            for k, v in value.__dict__.items():
                if type(v) in _CONTAINERS:
                    self._contents(out, f"{label}.{k}", v, seen)

    def _tensor_baseline(self) -> list[_Tensor]:
        names: dict[int, str] = {}
        for name, t in [*self.module.named_parameters(remove_duplicate=False),
                        *self.module.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), name)
        size = sum(t.numel() * t.element_size() for t in _tensors(self.modules))
        copy = self.keep_pristine and (not self.follow_caller or size <= SIMULATION_SNAPSHOT_MAX_BYTES)
        # A re-baseline (the caller changed their model) copies only the weights that changed.
        kept = {id(e.tensor): e.pristine for e in getattr(self, "tensors", ()) if e.pristine is not None and e.same()}
        out = []
        for t in _tensors(self.modules):
            pristine = kept.get(id(t)) if id(t) in kept else (t.detach().to("cpu", copy=True) if copy else None)
            out.append(_Tensor(names.get(id(t), "?"), t, pristine, self._rng))
        return out

    # -- per job --------------------------------------------------------------------------

    def begin(self) -> Any:
        """Before a job: the process state to return to (and, under the simulation, a fresh
        baseline when the caller changed the model since the last job)."""
        with BUILD_LOCK:  # never a baseline of a build's passing patch (`BUILD_LOCK`)
            return self._begin()

    def _begin(self) -> Any:
        if self.follow_caller:
            # Every trace (the caller's local ones too) registers and removes the engine's own
            # hooks, so a moved hook counter alone is no change: only what it could mean is
            # looked at (tensor hooks; module hook tables are in `_model_same`). A full new
            # baseline costs milliseconds, a check tenths of one.
            moved = torch.utils.hooks.RemovableHandle.next_id != self.hook_id
            if (moved and not all(t.hooks_same() for t in self.tensors)) or not self._model_same():
                self._baseline()
            self.hook_id = torch.utils.hooks.RemovableHandle.next_id
        return self._globals if self._globals is not None else process_state.capture()

    def _model_same(self) -> bool:
        # (A module the engine gave its `.source` subclass computes the same: not a change.)
        return (all(type(m) is c or _engine_rewrite(m, c) for m, c in self.classes) and self._dicts_same()
                and all(t.same() for t in self.tensors) and _vocabulary(self.host) == self.vocabulary)

    def _dicts_same(self) -> bool:
        try:
            if not (list(map(len, self._lives)) == self._lens
                    and tuple(chain.from_iterable(self._full)) == self._flat_keys
                    and all(map(_is, chain.from_iterable(map(_values, self._dict_lives)), self._flat_values))):
                return False
        except Exception:  # noqa: BLE001 - a changed entry whose `==` raises (a tensor), or a
            return False   # namespace another thread changed meanwhile: compare one by one
        tags = list(map(tag_value, self._cells))
        if tags == self._tags:
            return True
        for i, (now, then) in enumerate(zip(tags, self._tags)):
            if now != then:  # changed since: compare it in full
                if not _same(self._tagged[i]):
                    return False
                self._tags[i] = now  # changed and put back (the engine's hooks come and go): same
        return True

    def verify_and_restore(self, before: Any) -> Integrity:
        """After a job (whether it ended well or not): compare with the baseline, put back
        what differs, and say what differed and what could not be put back."""
        with BUILD_LOCK:  # never puts back (or undoes) a build's passing patch
            return self._verify_and_restore(before)

    def _verify_and_restore(self, before: Any) -> Integrity:
        report = Integrity()
        for name in process_state.restore(before, report.unrestored):
            report.changed.append(f"process state: {name}")
        for m, cls in self.classes:
            if type(m) is not cls:
                if _engine_rewrite(m, cls):  # `.source`: the engine's own subclass, same computation
                    continue
                report.changed.append(f"class of {cls.__name__} module")
                try:
                    object.__setattr__(m, "__class__", cls)
                except TypeError:
                    report.unrestored.append(f"class of {cls.__name__} module")
        # Containers and attributes first: a replaced parameter entry puts the original tensor back.
        for d in () if self._dicts_same() else self.dicts:
            if not _same(d):
                report.changed.append(f"{d.label}: {', '.join(d.diff()[:5])}")
                try:
                    d.restore()
                except Exception as error:  # noqa: BLE001 - any failure here means: replace the worker
                    report.unrestored.append(f"{d.label} ({type(error).__name__})")
        if torch.utils.hooks.RemovableHandle.next_id != self.hook_id:
            # A hook was registered somewhere (every handle takes the next id of one counter):
            # tensor hooks are looked at only then.
            for t in self.tensors:
                if not t.hooks_same():
                    report.changed.append(f"hooks of {t.name}")
                    t.restore_hooks()
        for t in self.tensors:
            if t.same():
                continue
            report.weights.append(t.name)
            try:
                if not t.restore():
                    report.unrestored.append(f"weights of {t.name} (no pristine copy to restore from)")
            except Exception as error:  # noqa: BLE001
                report.unrestored.append(f"weights of {t.name} ({type(error).__name__}: {error})")
        if _vocabulary(self.host) != self.vocabulary:
            # Added tokens live in the tokenizer's backend, not in an attribute that can be put
            # back: a tokenizer whose vocabulary changed is replaced with its worker.
            report.changed.append("tokenizer vocabulary")
            report.unrestored.append("tokenizer vocabulary (added tokens cannot be removed in place)")
        if report.unrestored:
            self.tainted.extend(report.unrestored)
        elif not report.clean and not self._model_same():
            report.unrestored.append("the model after restoring differs from its baseline")
            self.tainted.extend(report.unrestored)
        self.hook_id = torch.utils.hooks.RemovableHandle.next_id
        report.weights = sorted(set(report.weights))
        return report


def _vocabulary(host: Any) -> Any:
    """The size of the host's tokenizer's vocabulary, added tokens included (None: no tokenizer)."""
    tokenizer = getattr(host, "__dict__", {}).get("tokenizer")
    if tokenizer is None:
        return None
    try:
        return len(tokenizer)
    except Exception as error:  # noqa: BLE001 - a tokenizer a job broke is a changed one
        return ("broken", type(error).__name__)


def _same(d: Any) -> bool:
    try:
        return d.same()
    except Exception:  # noqa: BLE001 - see `_dicts_same`
        return False


def _tensors(modules: list[torch.nn.Module]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for m in modules:
        for table in (m._parameters, m._buffers):
            for t in table.values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


def _engine_rewrite(module: torch.nn.Module, cls: type) -> bool:
    """`envoy.source` gives a module its own subclass with a rewritten forward (see
    `tracing/source.py`); it computes the same and later `.source` uses rely on it."""
    accessor = accessors.get(module)
    now = type(module)
    return accessor is not None and now.__bases__ == (cls,) and now.__dict__.get("forward") is accessor.function


_GUARDS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelGuard]" = weakref.WeakKeyDictionary()


def guard_for(model: Any, *, server: bool = False, pristine: bool = True) -> "ModelGuard | _NoGuard":
    """The guard of a hosted model, made on first use. `server=True` (the job runner, at
    start): a fixed baseline with a pristine copy of the weights and of the process state.
    Otherwise (the simulation): a baseline that follows the caller's own changes.

    `pristine=False` keeps no copy of the weights (no host memory spent): a job that changed
    weights then leaves the guard tainted (`needs_recycle`), for a worker process that is
    cheaper to replace from the model's files than to hold a second copy."""
    module = model._module
    guard = _GUARDS.get(module)
    if guard is None or (server and guard.follow_caller):
        if any(t.is_meta for t in _tensors(list(module.modules()))):
            if fake_run_active():
                # A dry run (`fake.py`): the weights stay unloaded; the baseline is of
                # everything but their values (there are none to sample or copy).
                # Not kept: a real run of this model loads its weights and needs a real guard.
                return ModelGuard(module, pristine=False, follow_caller=True, host=model)
            # Weights not loaded yet (a lazy `LanguageModel` before its first run): load them
            # now, as the run would, so the baseline is of the weights the job runs beside.
            dispatch = getattr(model, "dispatch", None)
            try:
                if dispatch is None:
                    raise RuntimeError("no weights")
                dispatch()
            except Exception:  # noqa: BLE001 - no weights here at all: the run fails by itself
                return _NO_GUARD
            module = model._module
            meta = [name for name, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
            if meta:  # (asking again would recurse forever: loading left these unloaded)
                raise RuntimeError(f"the model's weights were loaded, but {', '.join(meta[:5])} "
                                   "are still on the meta device (not in its checkpoint?)")
        with BUILD_LOCK:  # (the baseline reads class dicts a build in another thread patches)
            guard = _GUARDS[module] = ModelGuard(module, pristine=pristine, follow_caller=not server, host=model)
    return guard


class _NoGuard:
    """For a model without weights (nothing a job could change survives it)."""

    tainted: list[str] = []

    def begin(self) -> Any:
        return None

    def verify_and_restore(self, before: Any) -> Integrity:
        return Integrity()


_NO_GUARD = _NoGuard()


def needs_recycle(model: Any) -> bool:
    """Whether a job left this model (or the process) in a state that could not be put back:
    the worker process running it must exit and be replaced."""
    guard = _GUARDS.get(model._module)
    return bool(guard is not None and guard.tainted)
