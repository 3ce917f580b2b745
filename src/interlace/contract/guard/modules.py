"""Allowlisted modules as shipped code sees them: read-only proxies with a list of names each.

Design note
-----------
Shipped code never holds a real module object: a module's namespace is its globals, and every
allowed package reaches `os`, `sys` or `builtins` somewhere below it (`torch.nn.functional.torch`,
`numpy.lib.npyio`). `import torch`, a shipped `x:module` reference and any attribute that
evaluates to a module all give a `ModuleProxy`: no `__dict__`, no setattr, and only the names
its `ModuleRule` lists; a submodule is a proxy too, and only if its rule is listed here.

Small standard modules list their names outright (`allow`). `torch` and `numpy` have hundreds
of operators that change with every release, so their rule is "every public operator, class,
dtype or number of the module" (`_plain_value`: never a module, never a mutable container such
as `numpy.sctypeDict`, which a job could edit for the next one) minus an explicit `deny` list of
what reaches files, processes, extension loading, serialization or process-wide settings.
RestrictedPython has no module proxies with per-name lists (its `guarded_import` admits or
refuses whole modules), hence this file.
"""

from __future__ import annotations

import importlib
import numbers
import types
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModuleProxy", "ModuleRule", "MODULE_RULES", "BodyAPI", "body_api", "body_api_name", "proxy_for",
           "module_proxy", "allowed_object", "MSG_MODULE_NAME"]

MSG_MODULE_NAME = (
    "`{module}.{name}` is not available to code that runs on the server ({why}). "
    "Fix: compute it before the trace and pass the value in, or use another function of `{module}`."
)


@dataclass(frozen=True)
class ModuleRule:
    """What shipped code may read of one module. `allow=None`: every public plain value."""

    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    deny_prefixes: tuple[str, ...] = ()
    deny_suffixes: tuple[str, ...] = ()
    submodules: frozenset[str] = field(default_factory=frozenset)

    def permits(self, name: str) -> bool:
        if name.startswith("_") or name in self.deny:
            return False
        if self.allow is not None and name not in self.allow:
            return False
        return not name.startswith(self.deny_prefixes) and not name.endswith(self.deny_suffixes)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# torch: file I/O, hub, extension and operator-library loading, JIT/compile/export (which run
# or load code), distributed and multiprocessing, and settings that outlive the job.
_TORCH_DENY = _names("""
    load save from_file frombuffer hub ops library classes jit compile export package distributed
    multiprocessing backends serialization utils onnx fx func overrides testing profiler cpu mps xpu
    set_default_dtype set_default_device set_default_tensor_type set_num_threads set_num_interop_threads
    manual_seed seed initial_seed set_rng_state set_printoptions use_deterministic_algorithms
    set_deterministic_debug_mode set_float32_matmul_precision set_warn_always set_flush_denormal
    set_anomaly_enabled set_vital read_vitals vitals_enabled import_ir_module import_ir_module_from_buffer
    parse_ir parse_schema parse_type_comment merge_type_from_type_comment fork wait init_num_threads
    prepare_multiprocessing_environment compiled_with_cxx11_abi get_file_path typename
    clear_autocast_cache set_autocast_enabled set_autocast_dtype set_autocast_cpu_enabled
    set_autocast_cpu_dtype set_autocast_gpu_dtype set_autocast_cache_enabled set_autocast_ipu_enabled
    set_autocast_ipu_dtype set_autocast_xla_enabled set_autocast_xla_dtype autocast_increment_nesting
    autocast_decrement_nesting FileCheck Future ScriptFunction ScriptMethod ScriptModule ScriptObject
    AggregationType DisableTorchFunction DisableTorchFunctionSubclass Storage TypedStorage UntypedStorage
    random quasirandom nested sparse masked storage types return_types version cuda
    default_generator get_rng_state empty_strided
    FloatTensor DoubleTensor HalfTensor BFloat16Tensor ByteTensor CharTensor ShortTensor IntTensor
    LongTensor BoolTensor
""")

_NUMPY_DENY = _names("""
    load save savez savez_compressed fromfile memmap ctypeslib lib DataSource genfromtxt loadtxt savetxt
    fromregex recfromtxt recfromcsv tofile set_printoptions seterr seterrcall seterrobj setbufsize
    set_string_function show_config show_runtime info source lookfor get_include test add_newdoc
    add_docstring add_newdoc_ufunc deprecate deprecate_with_doc who safe_eval disp byte_bounds
    printoptions get_printoptions geterrobj core compat testing f2py distutils typing version
    os sys __config__ _pytesttester
""")

#: Every module shipped code can reach, and what of it.
MODULE_RULES: dict[str, ModuleRule] = {
    "torch": ModuleRule(deny=_TORCH_DENY, deny_prefixes=("set_", "is_storage"), deny_suffixes=("Storage",),
                        submodules=_names("nn linalg fft special autograd")),
    "torch.nn": ModuleRule(deny=_names("utils modules parallel parameter grad intrinsic qat quantized quantizable "
                                       "attention backends common_types init factory_kwargs"),
                           submodules=_names("functional init")),
    "torch.nn.functional": ModuleRule(deny=_names("handle_torch_function has_torch_function has_torch_function_unary "
                                                  "has_torch_function_variadic boolean_dispatch torch math warnings "
                                                  "importlib")),
    "torch.nn.init": ModuleRule(allow=_names("""
        uniform_ normal_ trunc_normal_ constant_ ones_ zeros_ eye_ dirac_ xavier_uniform_ xavier_normal_
        kaiming_uniform_ kaiming_normal_ orthogonal_ sparse_ calculate_gain""")),
    "torch.linalg": ModuleRule(),
    "torch.fft": ModuleRule(),
    "torch.special": ModuleRule(),
    "torch.autograd": ModuleRule(allow=_names("grad backward Function")),
    "numpy": ModuleRule(deny=_NUMPY_DENY, submodules=_names("linalg fft random")),
    "numpy.linalg": ModuleRule(deny=_names("test linalg")),
    "numpy.fft": ModuleRule(deny=_names("test helper")),
    "numpy.random": ModuleRule(deny=_names("seed set_state get_state test bit_generator mtrand")),
    "math": ModuleRule(),
    "cmath": ModuleRule(),
    "einops": ModuleRule(allow=_names("rearrange reduce repeat einsum pack unpack parse_shape asnumpy EinopsError")),
    "collections": ModuleRule(deny=_names("UserString"), submodules=_names("abc")),
    "collections.abc": ModuleRule(),
    "itertools": ModuleRule(),
    "functools": ModuleRule(allow=_names("""
        partial partialmethod reduce lru_cache cache cached_property total_ordering cmp_to_key
        singledispatch singledispatchmethod""")),
    "operator": ModuleRule(deny=_names("attrgetter methodcaller setitem delitem")),
    "random": ModuleRule(deny=_names("seed setstate getstate SystemRandom")),
    "json": ModuleRule(allow=_names("loads dumps JSONDecodeError JSONDecoder JSONEncoder")),
    "re": ModuleRule(deny=_names("template")),
    "typing": ModuleRule(deny=_names("get_type_hints ForwardRef")),
    # (`make_dataclass(namespace=...)` is a class factory with a namespace: see access.py)
    "dataclasses": ModuleRule(deny=_names("make_dataclass")),
    # `global_enum` copies an enum's members into the globals of the module it names
    # (`module='json'`): a job would overwrite another module's functions for every later job.
    "enum": ModuleRule(deny=_names("global_enum global_enum_repr global_flag_repr global_str")),
    "abc": ModuleRule(deny=_names("get_cache_token")),
    "string": ModuleRule(deny=_names("Formatter")),
    "statistics": ModuleRule(),
    "fractions": ModuleRule(),
    "decimal": ModuleRule(deny=_names("getcontext setcontext DefaultContext BasicContext ExtendedContext")),
    "copy": ModuleRule(allow=_names("copy deepcopy Error")),
    "heapq": ModuleRule(),
    "bisect": ModuleRule(),
    "time": ModuleRule(allow=_names("""
        time time_ns perf_counter perf_counter_ns monotonic monotonic_ns process_time process_time_ns
        gmtime localtime strftime asctime ctime mktime struct_time""")),
    "textwrap": ModuleRule(),
}

def _zeroed(make: Any, name: str) -> Any:
    def allocate(*args: Any, **kwargs: Any) -> Any:
        return make(*args, **kwargs)

    allocate.__name__ = allocate.__qualname__ = name
    allocate.__doc__ = f"`{name}`, filled with zeros (on a server, memory is never handed out unwritten)."
    return allocate


def _zeroed_table() -> dict[str, dict[str, Any]]:
    # Uninitialized memory holds what was there before: on a server, an earlier job's values,
    # another user's data. `empty` gives zeros here (the same shapes and dtypes; research code
    # that relies on `empty` writes every element anyway). The worker process also poisons
    # freed memory (execution/process.py, MALLOC_PERTURB_) for the constructors no proxy sees.
    import numpy
    import torch

    return {
        "torch": {"empty": _zeroed(torch.zeros, "empty"), "empty_like": _zeroed(torch.zeros_like, "empty_like")},
        "numpy": {"empty": _zeroed(numpy.zeros, "empty"), "empty_like": _zeroed(numpy.zeros_like, "empty_like")},
    }


_ZEROED = _zeroed_table()

_IMMUTABLE = (numbers.Number, str, bytes, bool, type(None), frozenset)


def _plain_value(value: Any) -> bool:
    """A value a proxy may hand out: an operator, a class, a dtype or an immutable constant;
    never a module, and never a mutable container (a job could edit it for the next one)."""
    if isinstance(value, types.ModuleType):
        return False
    if isinstance(value, _IMMUTABLE):
        return True
    if isinstance(value, tuple):
        return all(isinstance(v, _IMMUTABLE) for v in value)
    if isinstance(value, (list, dict, set, bytearray)):
        return False
    return callable(value) or type(value).__module__.split(".", 1)[0] in ("torch", "numpy")


class ModuleProxy:
    """A module as shipped code sees it: its listed names, read-only."""

    __slots__ = ("_name", "_module", "_rule", "_cache")

    def __init__(self, name: str, module: types.ModuleType, rule: ModuleRule) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "_cache", {})

    def __getattr__(self, name: str) -> Any:
        cache = object.__getattribute__(self, "_cache")
        if name in cache:
            return cache[name]
        value = _lookup(object.__getattribute__(self, "_name"), object.__getattribute__(self, "_module"),
                        object.__getattribute__(self, "_rule"), name)
        cache[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"`{object.__getattribute__(self, '_name')}` is read-only in code that runs on the server")

    __delattr__ = __setattr__  # type: ignore[assignment]

    def __dir__(self) -> list[str]:
        module = object.__getattribute__(self, "_module")
        name = object.__getattribute__(self, "_name")
        rule = object.__getattribute__(self, "_rule")
        return sorted(n for n in dir(module) if _permitted(name, module, rule, n))

    def __repr__(self) -> str:
        return f"<module '{object.__getattribute__(self, '_name')}' (read-only, as the server gives it)>"

    def __reduce__(self) -> Any:
        raise TypeError("a module cannot be pickled")


def _permitted(modname: str, module: types.ModuleType, rule: ModuleRule, name: str) -> bool:
    if not rule.permits(name):
        return False
    if name in rule.submodules:
        return True
    value = getattr(module, name, None)
    return value is not None and _plain_value(value)


def _lookup(modname: str, module: types.ModuleType, rule: ModuleRule, name: str) -> Any:
    if type(name) is not str:
        raise TypeError("attribute name must be a string")
    if not rule.permits(name):
        raise AttributeError(MSG_MODULE_NAME.format(module=modname, name=name, why="not on the server's list for this module"))
    if name in rule.submodules:
        proxy = module_proxy(f"{modname}.{name}")
        if proxy is None:
            raise AttributeError(MSG_MODULE_NAME.format(module=modname, name=name, why="not installed on the server"))
        return proxy
    zeroed = _ZEROED.get(modname, {}).get(name)
    if zeroed is not None:
        return zeroed
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module `{modname}` has no attribute `{name}`") from None
    if not _plain_value(value):
        raise AttributeError(MSG_MODULE_NAME.format(module=modname, name=name, why="a module or shared mutable value"))
    return value


_proxies: dict[str, ModuleProxy] = {}


def module_proxy(name: str) -> ModuleProxy | None:
    """The proxy of module `name`, or None if shipped code may not have it."""
    proxy = _proxies.get(name)
    if proxy is not None:
        return proxy
    rule = MODULE_RULES.get(name)
    if rule is None:
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    proxy = _proxies[name] = ModuleProxy(name, module, rule)
    return proxy


def proxy_for(module: types.ModuleType) -> ModuleProxy | None:
    """The proxy of a real module object (an attribute that turned out to be a module)."""
    name = getattr(module, "__name__", None)
    if type(name) is not str:
        return None
    proxy = module_proxy(name)
    if proxy is not None and object.__getattribute__(proxy, "_module") is not module:
        return None
    return proxy


# -- the engine's body API (`interlace.save(x)`) ----------------------------------------------------

class BodyAPI:
    """What `interlace` is inside shipped code: the names bodies call, never the package."""

    __slots__ = ("_names",)

    def __init__(self, names: dict[str, Any]) -> None:
        object.__setattr__(self, "_names", dict(names))

    def __getattr__(self, name: str) -> Any:
        names = object.__getattribute__(self, "_names")
        if name in names:
            return names[name]
        raise AttributeError(
            f"`interlace.{name}` is not available inside code that runs on the server "
            f"(available: {', '.join(sorted(names))}). Fix: call it before or after the trace."
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("`interlace` is read-only in code that runs on the server")

    __delattr__ = __setattr__  # type: ignore[assignment]

    def __dir__(self) -> list[str]:
        return sorted(object.__getattribute__(self, "_names"))

    def __repr__(self) -> str:
        return "<module 'interlace' (the names a traced body may call)>"


def _body_names() -> dict[str, Any]:
    from ... import errors
    from ...tracing.local_block import List, local
    from ...tracing.saving import save

    # `local`: `with interlace.local():` in shipped code is compiled away (the server's side of
    # the block runs instead), but `from interlace import local` must still resolve.
    names: dict[str, Any] = {"save": save, "local": local, "list": List}
    for name in ("InterlaceError", "TracingError", "OutOfOrderError", "MissedProviderError",
                 "ModuleNotCalledError", "NotSavedError", "GenerationEndedWarning"):
        if hasattr(errors, name):
            names[name] = getattr(errors, name)
    return names


_body: list[BodyAPI] = []


def body_api() -> BodyAPI:
    """The one `interlace` proxy (its names are the engine's body-facing functions)."""
    if not _body:
        _body.append(BodyAPI(_body_names()))
    return _body[0]


def body_api_name(obj: Any) -> str | None:
    """The name under which `obj` is in the body API (`interlace.save` -> "save"), if it is."""
    for name, value in object.__getattribute__(body_api(), "_names").items():
        if value is obj:
            return name
    return None


_allowed_ids: dict[int, Any] = {}


def allowed_object(obj: Any) -> bool:
    """Whether `obj` is a value some proxy hands out (a reference shipped by `module` and
    `qualname`, such as `torch.nn.modules.linear.Linear`, must be one)."""
    if not _allowed_ids:
        for modname in MODULE_RULES:
            proxy = module_proxy(modname)
            if proxy is None:
                continue
            for name in dir(proxy):
                try:
                    value = getattr(proxy, name)
                except AttributeError:
                    continue
                if not isinstance(value, (ModuleProxy,) + _IMMUTABLE):
                    _allowed_ids[id(value)] = value
        for value in object.__getattribute__(body_api(), "_names").values():
            _allowed_ids[id(value)] = value
    return _allowed_ids.get(id(obj)) is obj
