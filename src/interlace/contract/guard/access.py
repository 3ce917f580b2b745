"""The runtime guards of one job: what the names the transformer (`transform.py`) inserts do.

Design note
-----------
`_getattr_`, `_getitem_`, `_getiter_`, `_write_`, `_apply_`, `_unpack_sequence_`,
`_iter_unpack_sequence_` are RestrictedPython's protocol (its transformer emits calls to them;
the unpacking ones are RestrictedPython's own `Guards`). Their policy is ours:

- attribute reads refuse names starting with `_` (a short list of dunder methods is allowed on
  `super()` and on shipped classes; `__name__`/`__qualname__`/`__doc__` anywhere), the inspect
  attributes (`gi_frame`, `f_globals`, ...), `DENIED_ATTRIBUTES` (files, pickles, storage,
  hooks, the module tree), module-mutating methods on modules and envoys (`to`, `train`,
  `apply`, ...), `.data` and in-place methods on the hosted model's weights, and `str.format`
  (format strings reach attributes). A module that comes out of an attribute is replaced by
  its read-only proxy (or refused). `numpy()` on a tensor returns a copy: a numpy view of a
  weight would change it without a version bump.
- writes (`_write_`) refuse modules, classes and functions that are not the job's own, the
  hosted model's weights and modules, and on an envoy any attribute but its values.
- `_tick_` (inserted at the top of every loop body, function body and comprehension) enforces
  the job's wall-clock deadline and memory growth in-process, raising `JobLimitExceeded`, a
  `BaseException`, so `except Exception:` does not swallow it; once tripped it raises on every
  later tick. `paused()` stops the wall clock while the job waits for its client (a local
  block), so the limit counts the server's own time only. A C loop (`sum(range(10**12))`)
  never ticks: the worker process (layer 3) kills that.
RestrictedPython's own `safer_getattr` and `full_write_guard` fit a CMS (they refuse writes on
anything without `_guarded_writes`, which would refuse `self.x = 1` in a shipped class, and know
nothing of tensors or envoys), hence these.
"""

from __future__ import annotations

import abc
import contextlib
import operator
import time
import types
from typing import Any, Callable, Iterator

from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence

from ..policy import DENIED_ATTRIBUTES, INSPECT_ATTRIBUTES, SAFE_DUNDER_METHODS, SAFE_DUNDER_READS, Policy
from ...tracing.local_block import List
from .modules import BodyAPI, ModuleProxy, proxy_for

__all__ = ["AccessRefused", "JobLimitExceeded", "JobGuards", "GuardedType", "guarded_metaclass", "MSG_PRIVATE", "MSG_WALL_TIME", "MSG_MEMORY"]

MSG_PRIVATE = (
    "`.{name}` is not available to code that runs on the server: names starting with `_` reach "
    "Python's internals (frames, globals, classes). Fix: use the object's public attributes, e.g. "
    "`type(x).__name__` for a class name, `isinstance(x, torch.Tensor)` for a type check."
)
MSG_DENIED = (
    "`.{name}` is not available to code that runs on the server: it reaches files, processes, "
    "memory or the shared model outside the trace. Fix: do it before or after the trace, on your machine."
)
MSG_FORMAT = (
    "`str.format` is not available to code that runs on the server (a format string reads "
    "attributes: \"{{0.__class__}}\"). Fix: use an f-string: f\"{{x}} and {{y}}\"."
)
MSG_MODULE_METHOD = (
    "`.{name}()` would change the shared model (its device, dtype, mode or module tree) for every "
    "later job. Fix: work on activations inside the trace, or on a copy of a weight "
    "(`w = model.layer.weight.clone()`)."
)
MSG_WEIGHT = (
    "this changes the hosted model's weights in place (`{what}`); on a shared server the model is "
    "read-only between jobs. Fix: edit activations (`module.output[:] = ...`) or work on a copy "
    "(`w = model.lm_head.weight.clone()`)."
)
MSG_WRITE = (
    "`{what}` cannot be changed by code that runs on the server: it is shared with every later job. "
    "Fix: keep your own values in variables, or in instances of your own classes."
)
MSG_WALL_TIME = (
    "the job exceeded the wall-time limit of {limit:g} s of this server (policy.timeout_seconds). "
    "Fix: do less per job (fewer tokens or steps, smaller batches), or ask the server's operator to "
    "raise the limit (`interlace env` shows it)."
)
MSG_MEMORY = (
    "the job grew the server's memory by more than the limit of {limit_mb:.0f} MB "
    "(policy.max_memory_bytes). Fix: keep fewer or smaller values (save slices: h[:, -1].save()), "
    "or ask the server's operator to raise the limit (`interlace env` shows it)."
)


class AccessRefused(AttributeError):
    """An attribute (or write) shipped code may not use; the message says why and the fix.
    `category` is the job's error category (`model-modified` for a write to the weights)."""

    def __init__(self, message: str, category: str = "forbidden-attribute") -> None:
        super().__init__(message)
        self.category = category


class JobLimitExceeded(BaseException):
    """The job ran past its wall-time or memory limit. A BaseException: `except Exception`
    in the user's code does not catch it."""


#: Methods of `nn.Module` (reached through an envoy or a module) that change the shared model.
_MODULE_METHODS = frozenset(
    {
        "apply", "children", "named_children", "compile", "to", "cuda", "cpu", "xpu", "ipu", "mtia", "half",
        "float", "double", "bfloat16", "type", "train", "eval", "requires_grad_", "zero_grad",
    }
)
_ARRAY_METHODS = frozenset({"dump", "dumps", "tofile"})
#: Names whose refusal depends on the object (checked after the cheap set lookups).
_CONDITIONAL = _MODULE_METHODS | _ARRAY_METHODS | {"data", "numpy", "save", "grad", "register"}

#: Libraries whose objects reachable from a body belong to the hosted model (its config,
#: tokenizer, generation settings, the engine's own objects): shared with every later job, so
#: shipped code reads them but never writes their attributes or items.
_SHARED_LIBRARIES = frozenset({"transformers", "tokenizers", "interlace", "huggingface_hub", "safetensors"})

_STATM_PAGE = 4096
_SAMPLE_EVERY_S = 0.05


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _STATM_PAGE
    except (OSError, ValueError, IndexError):
        return 0


class JobGuards:
    """The guards of one job: its limits, the hosted model's weights and modules it protects,
    and the functions its compiled code calls (`names()`)."""

    def __init__(self, policy: Policy, *, protected: tuple[Any, ...] = (), remote_module: str = "__interlace_remote__",
                 log: Callable[[str], None] | None = None) -> None:
        self.policy = policy
        self.timeout = float(policy.timeout_seconds)
        self.deadline = time.monotonic() + self.timeout
        self.max_memory = int(policy.max_memory_bytes)
        self.base_rss = _rss()
        self.next_sample = 0.0
        self.tripped: str | None = None
        self.remote_module = remote_module
        self._protected: dict[int, Any] = {}
        self._protected_modules: dict[int, Any] = {}
        self._paths: dict[int, str] = {}
        self.protect(protected)
        import torch  # (the guards run beside a torch model)
        import numpy

        self._torch = torch
        self._tensor = torch.Tensor
        self._parameter = torch.nn.Parameter
        self._nn_module = torch.nn.Module
        self._ndarray = numpy.ndarray
        from ...tracing.envoy import Envoy

        self._envoy = Envoy

    def protect(self, objects: Any) -> None:
        """Keep the hosted model's modules, parameters and buffers from being written.
        `objects`: modules, tensors, or (path, module) pairs (`named_modules()`), whose paths
        name a refused weight in the message."""
        torch = __import__("torch")
        for obj in objects:
            path = ""
            if isinstance(obj, tuple) and len(obj) == 2:
                path, obj = obj
            if isinstance(obj, torch.nn.Module):
                self._protected_modules[id(obj)] = obj
                for table in (obj._parameters, obj._buffers):
                    for name, t in table.items():
                        if t is not None:
                            self._protected[id(t)] = t
                            self._paths[id(t)] = f"{path}.{name}" if path else name
            elif isinstance(obj, torch.Tensor):
                self._protected[id(obj)] = obj

    def _weight_error(self, obj: Any, what: str) -> AccessRefused:
        key = id(obj) if id(obj) in self._protected else id(getattr(obj, "_base", None))
        where = self._paths.get(key)
        text = MSG_WEIGHT.format(what=what)
        return AccessRefused(f"ModelModifiedError: {text}" if where is None else f"ModelModifiedError: {where}: {text}",
                             category="model-modified")

    # -- limits --------------------------------------------------------------------------------

    def tick(self) -> bool:
        if self.tripped is not None:
            raise JobLimitExceeded(self.tripped)
        now = time.monotonic()
        if now > self.deadline:
            self.tripped = MSG_WALL_TIME.format(limit=self.timeout)
            raise JobLimitExceeded(self.tripped)
        if now >= self.next_sample:
            self.next_sample = now + _SAMPLE_EVERY_S
            grown = _rss() - self.base_rss
            if grown > self.max_memory:
                self.tripped = MSG_MEMORY.format(limit_mb=self.max_memory / 1e6)
                raise JobLimitExceeded(self.tripped)
        return True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the job's wall clock while it waits for something outside it (a local block
        running on the client): the deadline moves on by the time spent here. The memory
        limit still holds: it is checked at the next tick."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.deadline += time.monotonic() - start

    def close(self) -> None:
        """The job is over: code it left behind (a `__del__`, a callback) stops at its first tick."""
        self.tripped = "the job this code belongs to has ended"

    # -- reads ---------------------------------------------------------------------------------

    def getattr(self, obj: Any, name: str, *default: Any) -> Any:
        if type(name) is not str:
            raise TypeError("attribute name must be a string")
        if name[:1] == "_":
            self._check_private(obj, name)
        elif name in DENIED_ATTRIBUTES or name in INSPECT_ATTRIBUTES or (name.startswith("register_") and "hook" in name):
            if name in ("format", "format_map"):
                raise AccessRefused(MSG_FORMAT)
            raise AccessRefused(MSG_DENIED.format(name=name))
        elif name in _CONDITIONAL:
            special = self._conditional(obj, name)
            if special is not None:
                return special
        elif name[-1:] == "_" and self._is_protected(obj):
            raise self._weight_error(obj, f".{name}(...)")
        value = getattr(obj, name, *default)
        if isinstance(value, type) and issubclass(value, type):
            return guarded_metaclass(value)  # `abc.ABCMeta`, `enum.EnumMeta`: class factories
        if isinstance(value, types.ModuleType):
            proxy = proxy_for(value)
            if proxy is None:
                raise AccessRefused(f"`.{name}` is a module that code on the server may not use ({value.__name__})")
            return proxy
        return value

    def _check_private(self, obj: Any, name: str) -> None:
        if name in SAFE_DUNDER_READS:
            return
        if name in SAFE_DUNDER_METHODS and (type(obj) is super or self._shipped(obj)):
            return
        raise AccessRefused(MSG_PRIVATE.format(name=name))

    def _shipped(self, obj: Any) -> bool:
        cls = obj if isinstance(obj, type) else type(obj)
        return getattr(cls, "__module__", None) == self.remote_module

    def _conditional(self, obj: Any, name: str) -> Any:
        if name in _MODULE_METHODS and (isinstance(obj, self._envoy) or id(obj) in self._protected_modules):
            raise AccessRefused(MSG_MODULE_METHOD.format(name=name))
        if name in _ARRAY_METHODS and isinstance(obj, self._ndarray):
            raise AccessRefused(MSG_DENIED.format(name=name))
        if name == "data" and self._is_protected(obj):
            raise self._weight_error(obj, ".data")
        if name == "numpy" and isinstance(obj, self._tensor):
            return _numpy_copy(obj)
        if name == "register" and isinstance(obj, abc.ABCMeta) and not self._shipped(obj):
            # `collections.abc.Mapping.register(torch.Tensor)` would change `isinstance` for
            # every later job in this process.
            raise AccessRefused(MSG_WRITE.format(what=f"the abstract class {obj.__name__}'s registry"))
        if name == "save" and not isinstance(obj, (BodyAPI, self._tensor, self._envoy)):
            # `x.save()` is rewritten to Interlace's save before the code runs; any other
            # `.save` (a tokenizer's `save(path)`) writes a file.
            raise AccessRefused(MSG_DENIED.format(name=name))
        return None

    def _is_protected(self, obj: Any) -> bool:
        if id(obj) in self._protected:
            return True
        if isinstance(obj, self._tensor):
            base = obj._base
            return base is not None and id(base) in self._protected
        return False

    def hasattr(self, obj: Any, name: str) -> bool:
        if type(name) is str and name[:1] == "_" and name in SAFE_DUNDER_METHODS | SAFE_DUNDER_READS:
            return hasattr(obj, name)  # (existence only: `hasattr(x, "__len__")`)
        try:
            self.getattr(obj, name)
        except AccessRefused:
            raise
        except AttributeError:
            return False
        return True

    # -- writes --------------------------------------------------------------------------------

    def write(self, obj: Any) -> Any:
        t = type(obj)
        if t is list or t is dict or t is set or t is List:  # `interlace.list()` is the body's own
            return obj
        if isinstance(obj, self._tensor):
            if self._is_protected(obj):
                raise self._weight_error(obj, "weight[...] = ...")
            return obj
        if isinstance(obj, self._envoy):
            return _EnvoyWriter(obj)
        if isinstance(obj, (types.ModuleType, ModuleProxy, BodyAPI)):
            raise AccessRefused(MSG_WRITE.format(what="a module"))
        if isinstance(obj, type):
            if self._shipped(obj):
                return obj
            raise AccessRefused(MSG_WRITE.format(what=f"the class {obj.__name__}"))
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            if getattr(obj, "__module__", None) == self.remote_module:
                return obj
            raise AccessRefused(MSG_WRITE.format(what="a library function"))
        if id(obj) in self._protected_modules:
            raise AccessRefused(MSG_WRITE.format(what="a module of the hosted model"))
        if type(obj).__module__.partition(".")[0] in _SHARED_LIBRARIES and not self._shipped(obj):
            raise AccessRefused(MSG_WRITE.format(what=f"a {type(obj).__name__} object of the hosted model"))
        return obj

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        self._check_name_write(name)
        setattr(self.write(obj), name, value)

    def delattr(self, obj: Any, name: str) -> None:
        self._check_name_write(name)
        delattr(self.write(obj), name)

    def _check_name_write(self, name: Any) -> None:
        if type(name) is not str:
            raise TypeError("attribute name must be a string")
        if name[:1] == "_":
            raise AccessRefused(MSG_PRIVATE.format(name=name))
        if name in DENIED_ATTRIBUTES or name in INSPECT_ATTRIBUTES:
            raise AccessRefused(MSG_DENIED.format(name=name))

    # -- what compiled code calls ----------------------------------------------------------------

    def names(self) -> dict[str, Any]:
        """The names the transformer's output calls, and the guarded builtins."""
        return {
            "_getattr_": self.getattr,
            "_getitem_": operator.getitem,
            "_getiter_": iter,
            "_write_": self.write,
            "_tick_": self.tick,
            "_apply_": _apply,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "type": GuardedType,
            "getattr": self.getattr,
            "hasattr": self.hasattr,
            "setattr": self.setattr,
            "delattr": self.delattr,
        }


def _apply(f: Any, *args: Any, **kwargs: Any) -> Any:
    return f(*args, **kwargs)


def _numpy_copy(tensor: Any) -> Any:
    def numpy(*, force: bool = False) -> Any:
        return tensor.numpy(force=force).copy()

    return numpy


class _EnvoyWriter:
    """What `envoy.name = value` writes through: only an envoy's values (`output`, `input`,
    `inputs`, ...: its properties), never the module's attributes."""

    __slots__ = ("_envoy",)

    def __init__(self, envoy: Any) -> None:
        object.__setattr__(self, "_envoy", envoy)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_envoy"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        envoy = object.__getattribute__(self, "_envoy")
        if name[:1] == "_" or not isinstance(getattr(type(envoy), name, None), property):
            raise AccessRefused(MSG_WRITE.format(what=f"{envoy.path}.{name}") + " (an envoy takes only `.output`, `.input` and `.inputs`)")
        setattr(envoy, name, value)

    def __delattr__(self, name: str) -> None:
        raise AccessRefused(MSG_WRITE.format(what=f"{object.__getattribute__(self, '_envoy').path}.{name}"))

    def __getitem__(self, key: Any) -> Any:
        return object.__getattribute__(self, "_envoy")[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        raise AccessRefused(MSG_WRITE.format(what="a module list of the hosted model"))


# -- class factories ---------------------------------------------------------------------------
#
# Design note: a class whose namespace holds protocol dunders (`__reduce_ex__`, `__deepcopy__`,
# `__setstate__`, ...) is a gadget: library code (`copy.deepcopy`, which transformers and
# dataclasses call too) obeys them and writes attributes on any object they name, a library
# class included, past every guard here. `class` statements are checked by the transformer;
# these close the other door, calling a metaclass with a namespace (`type("G", (), {...})`,
# `abc.ABCMeta(...)`, `type(SomeClass)(...)`). Shipped code never holds a real metaclass:
# `type(x)` and attributes that are metaclasses give a `guarded_metaclass` stand-in that checks
# the namespace and otherwise behaves as the metaclass does (`isinstance(c, type)` still works).

MSG_CLASS_NAMESPACE = (
    "a class made by code on the server may not define `{name}` (Python and its libraries call it "
    "outside your code's control). Fix: define only ordinary methods and the data-model methods "
    "a class statement allows (`__init__`, `__call__`, `__len__`, `__getitem__`, ...)."
)
_NAMESPACE_DUNDERS = SAFE_DUNDER_METHODS | {"__module__", "__qualname__", "__doc__"}


def _check_namespace(namespace: Any) -> None:
    if not isinstance(namespace, dict):
        return
    for key in namespace:
        if type(key) is not str or (key.startswith("_") and key.endswith("_") and key not in _NAMESPACE_DUNDERS):
            raise AccessRefused(MSG_CLASS_NAMESPACE.format(name=key))


class _MetaGuard(type):
    """The metaclass of the stand-ins: `isinstance`/`issubclass` and calls go to the real one."""

    _real: type

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls._real)

    def __subclasscheck__(cls, sub: Any) -> bool:
        return isinstance(sub, type) and issubclass(sub, cls._real)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        real = cls._real
        if real is type and len(args) == 1 and not kwargs:
            found = type(args[0])
            return guarded_metaclass(found) if issubclass(found, type) else found
        if len(args) == 3:
            _check_namespace(args[2])
        elif "dict" in kwargs or len(args) > 3:
            raise AccessRefused(MSG_CLASS_NAMESPACE.format(name="a namespace"))
        return real(*args, **kwargs)

    def __repr__(cls) -> str:
        return repr(cls._real)


_guarded_metas: dict[type, type] = {}


def guarded_metaclass(meta: type) -> type:
    """The stand-in for metaclass `meta` (one per metaclass)."""
    found = _guarded_metas.get(meta)
    if found is None:
        found = _guarded_metas[meta] = _MetaGuard(meta.__name__, (), {"_real": meta, "__slots__": ()})
    return found


GuardedType = guarded_metaclass(type)
