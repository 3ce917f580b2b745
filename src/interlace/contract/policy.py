"""The server policy: what shipped code may use, and the size limits. One place, versioned.

The client checks against it before sending, the simulator runs under it, and the server
enforces it on receipt (`validate.py`) and at run time (restricted builtins and imports).
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Policy", "DEFAULT_POLICY", "POLICY_VERSION", "module_allowed", "ENGINE_MODULE", "RESERVED_PREFIX",
    "FORBIDDEN_ATTRIBUTES", "FORBIDDEN_CALLS", "INSPECT_ATTRIBUTES", "DENIED_ATTRIBUTES", "SAFE_DUNDER_METHODS",
    "SAFE_DUNDER_READS", "MODULE_CATEGORIES", "STDLIB", "module_category",
]

POLICY_VERSION = 2

_ALLOWED_MODULES = (
    "torch", "numpy", "math", "cmath", "einops", "collections", "itertools", "functools",
    "operator", "random", "json", "re", "typing", "dataclasses", "enum", "abc", "string",
    "statistics", "fractions", "decimal", "copy", "heapq", "bisect", "time", "textwrap",
)

#: The one name of Interlace itself a body may use: `interlace.save(x)` and the other names
#: bodies call. Shipped code never gets the package: it gets a read-only proxy of exactly those
#: names (`contract/guard/modules.py`, `BODY_API`); `interlace.server` and every other
#: submodule stay refused.
ENGINE_MODULE = "interlace"

#: The engine's own helper names in compiled bodies (`__interlace_save__`, ...). User code may
#: not name them: they are the engine's, not the job's.
RESERVED_PREFIX = "__interlace"

_ALLOWED_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "classmethod", "complex", "dict", "divmod", "enumerate", "filter", "float", "format",
    "frozenset", "getattr", "hasattr", "hash", "hex", "id", "int", "isinstance", "issubclass",
    "iter", "len", "list", "map", "max", "min", "next", "object", "oct", "ord", "pow", "print",
    "property", "range", "repr", "reversed", "round", "set", "setattr", "delattr", "slice", "sorted",
    "staticmethod", "str", "sum", "super", "tuple", "type", "zip", "__build_class__", "__name__",
    "None", "True", "False", "Ellipsis", "NotImplemented",
    # exceptions users raise and catch
    "ArithmeticError", "AssertionError", "AttributeError", "BaseException", "Exception",
    "IndexError", "KeyError", "LookupError", "NameError", "NotImplementedError", "RuntimeError",
    "StopIteration", "TypeError", "ValueError", "ZeroDivisionError", "UserWarning", "Warning",
)

# Names that reach the host: files, processes, the network, or Python's own machinery.
FORBIDDEN_CALLS = {
    "eval": "forbidden-builtin", "exec": "forbidden-builtin", "compile": "forbidden-builtin",
    "globals": "forbidden-builtin", "locals": "forbidden-builtin",
    "vars": "forbidden-builtin", "breakpoint": "forbidden-builtin", "input": "forbidden-builtin",
    "open": "file-io", "exit": "forbidden-builtin", "quit": "forbidden-builtin", "help": "forbidden-builtin",
    "memoryview": "forbidden-builtin", "dir": "forbidden-builtin",
}

#: Modules whose use is named by its own category (a clearer message than "not allowed").
MODULE_CATEGORIES = {
    "os": "file-io", "io": "file-io", "pathlib": "file-io", "shutil": "file-io", "tempfile": "file-io",
    "glob": "file-io", "pickle": "file-io", "sqlite3": "file-io",
    "socket": "network", "urllib": "network", "http": "network", "requests": "network", "httpx": "network",
    "ftplib": "network", "smtplib": "network", "ssl": "network", "asyncio": "network",
    "subprocess": "subprocess", "multiprocessing": "subprocess", "signal": "subprocess",
    "threading": "subprocess", "ctypes": "subprocess", "sys": "subprocess", "importlib": "forbidden-builtin",
    "builtins": "forbidden-builtin", "inspect": "forbidden-builtin", "gc": "forbidden-builtin",
}

#: Attributes on frames, code, generators, coroutines and tracebacks that lead to a frame's
#: globals (RestrictedPython's INSPECT_ATTRIBUTES, and a few it leaves to its `_` rule).
INSPECT_ATTRIBUTES = frozenset(
    {
        "tb_frame", "tb_next", "f_back", "f_builtins", "f_code", "f_generator", "f_globals", "f_locals",
        "f_trace", "co_code", "gi_frame", "gi_code", "gi_yieldfrom", "cr_await", "cr_frame", "cr_code",
        "cr_origin", "ag_await", "ag_frame", "ag_code", "func_globals", "func_code", "im_func", "im_self",
    }
)

#: Attribute names refused on every object, before and while the code runs: each reaches
#: files, processes, pickles, raw memory, process-wide state, or the shared model's weights and
#: hooks without a version bump. (`.save()` is not here: it is Interlace's save, rewritten before
#: the code runs; `.save(path)` on other objects is refused at run time by the guard.)
DENIED_ATTRIBUTES = frozenset(
    {
        # files, pickles, raw memory
        "tofile", "from_file", "fromfile", "memmap", "savez", "save_pretrained", "from_pretrained",
        "push_to_hub", "to_json_file", "to_pickle", "save_vocabulary", "save_model", "ctypes", "ctypeslib",
        "from_json_file", "get_config_dict",  # a config's class methods that read files
        # a view at any offset reads (or writes) memory outside the tensor: earlier jobs' data
        "as_strided", "as_strided_", "as_strided_scatter",
        # memory handed out unwritten shows what was there before (an earlier job's values)
        "resize_", "resize_as_", "new_empty", "new_empty_strided",
        # a class's method resolution order lists its metaclasses' bases: the real `type`
        "mro",
        # the hosted model's tokenizer is shared with every later job
        "add_tokens", "add_special_tokens",
        # the shared model: weights, module tree, process-wide state
        "load_state_dict", "state_dict", "share_memory", "share_memory_", "untyped_storage", "storage",
        "set_", "register_buffer", "register_parameter", "add_module", "register_module", "set_submodule",
        "get_submodule", "get_parameter", "get_buffer", "set_extra_state", "get_extra_state", "to_empty",
        # format strings reach attributes (`"{0.__class__}".format(x)`): use f-strings
        "format", "format_map",
    }
)

#: Dunder methods shipped classes may define and call (`super().__init__(...)`, `__len__`):
#: the data model a class needs. Not `__class__`, `__dict__`, `__globals__`, `__getattr__`,
#: `__reduce__`, `__del__`, `__init_subclass__`, `__class_getitem__`, `__set_name__`, ...
SAFE_DUNDER_METHODS = frozenset(
    {
        "__init__", "__post_init__", "__call__", "__len__", "__getitem__", "__setitem__", "__delitem__",
        "__iter__", "__next__", "__reversed__", "__contains__", "__repr__", "__str__", "__bool__",
        "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__enter__", "__exit__",
        "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
        "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__floordiv__", "__rfloordiv__",
        "__mod__", "__rmod__", "__pow__", "__rpow__", "__matmul__", "__rmatmul__", "__neg__", "__pos__",
        "__abs__", "__invert__", "__and__", "__or__", "__xor__", "__int__", "__float__", "__index__",
    }
)

#: Dunder attributes that are plain strings, safe to read on anything (`type(x).__name__`).
SAFE_DUNDER_READS = frozenset({"__name__", "__qualname__", "__doc__", "__file__"})

#: Every attribute the validator refuses outright (besides `_` names and DENIED_ATTRIBUTES).
FORBIDDEN_ATTRIBUTES = INSPECT_ATTRIBUTES | frozenset(
    {
        "__globals__", "__code__", "__closure__", "__subclasses__", "__builtins__", "__bases__", "__base__",
        "__mro__", "__dict__", "__class__", "__getattribute__", "__reduce__", "__reduce_ex__", "__loader__",
        "__spec__", "__self__", "__func__", "__import__", "__setattr__", "__delattr__", "__init_subclass__",
        "__class_getitem__", "__getattr__", "__del__", "__set_name__", "__wrapped__", "__module__",
        "__defaults__", "__kwdefaults__", "__annotations__", "__objclass__", "__traceback__", "__context__",
        "__cause__", "_module",
    }
)


class Policy(BaseModel):
    """What a server accepts. Served at `GET /v1/policy`; `interlace env` prints it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = POLICY_VERSION
    allowed_modules: tuple[str, ...] = _ALLOWED_MODULES
    allowed_builtins: tuple[str, ...] = _ALLOWED_BUILTINS
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    max_result_bytes: int = Field(default=1024 * 1024 * 1024, ge=1)
    max_source_bytes: int = Field(default=1024 * 1024, ge=1)
    strict_remote: bool = False
    # Per-job limits (issue "Sandbox"): the runtime and the worker process enforce them, the
    # server serves them here so a client knows them before sending.
    timeout_seconds: float = Field(default=600.0, gt=0)  # wall clock, from start to result
    cpu_seconds: float = Field(default=600.0, gt=0)  # CPU time of the job's worker
    max_memory_bytes: int = Field(default=8 * 1024 * 1024 * 1024, ge=1)  # memory a job may add
    max_log_bytes: int = Field(default=1024 * 1024, ge=1)  # printed text kept per job
    # Per-key limits (the server's queue; 429 beyond them).
    max_queued_per_key: int = Field(default=64, ge=1)
    requests_per_minute: int = Field(default=6000, ge=1)  # 100 a second: abuse, not research loops
    # Local blocks (`with interlace.local():`, `contract/local_block.py`): the job waits for the
    # client at most this long per block (its own wall clock is paused meanwhile) ...
    local_block_seconds: float = Field(default=300.0, gt=0)
    # ... and, when no client is watching the job, at most this long for one to come back.
    local_grace_seconds: float = Field(default=30.0, gt=0)

    def allows_module(self, name: str) -> bool:
        return module_allowed(name, self.allowed_modules)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def module_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether shipped code may import `name`: its top package is allowed (and then only the
    names `contract/guard/modules.py` lists reach the code), or it is exactly the engine's
    body API (`interlace`, never a submodule of it)."""
    if name == ENGINE_MODULE:
        return True
    root = name.split(".", 1)[0]
    return root in allowed and root != ENGINE_MODULE


def module_category(name: str) -> str:
    return MODULE_CATEGORIES.get(name.split(".", 1)[0], "module-not-allowed")


DEFAULT_POLICY = Policy()

# Standard-library modules are allowed only when listed; this set lets messages say "standard
# library module not available on the server" rather than "unknown package".
STDLIB = frozenset(sys.stdlib_module_names)
