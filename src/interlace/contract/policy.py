"""The server policy: what shipped code may use, and the size limits. One place, versioned.

The client checks against it before sending, the simulator runs under it, and the server
enforces it on receipt (`validate.py`) and at run time (restricted builtins and imports).
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Policy", "DEFAULT_POLICY", "POLICY_VERSION", "module_allowed"]

POLICY_VERSION = 2

_ALLOWED_MODULES = (
    "torch", "numpy", "math", "cmath", "einops", "collections", "itertools", "functools",
    "operator", "random", "json", "re", "typing", "dataclasses", "enum", "abc", "string",
    "statistics", "fractions", "decimal", "copy", "heapq", "bisect", "time", "textwrap",
    "transformers", "interlace",
)

_ALLOWED_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "classmethod", "complex", "dict", "divmod", "enumerate", "filter", "float", "format",
    "frozenset", "getattr", "hasattr", "hash", "hex", "id", "int", "isinstance", "issubclass",
    "iter", "len", "list", "map", "max", "min", "next", "object", "oct", "ord", "pow", "print",
    "property", "range", "repr", "reversed", "round", "set", "setattr", "slice", "sorted",
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
    "__import__": "forbidden-builtin", "globals": "forbidden-builtin", "locals": "forbidden-builtin",
    "vars": "forbidden-builtin", "breakpoint": "forbidden-builtin", "input": "forbidden-builtin",
    "open": "file-io", "exit": "forbidden-builtin", "quit": "forbidden-builtin", "delattr": "forbidden-builtin",
    "memoryview": "forbidden-builtin",
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

#: Attributes that lead from ordinary objects to frames, code and interpreter internals.
FORBIDDEN_ATTRIBUTES = frozenset(
    {
        "__globals__", "__code__", "__closure__", "__subclasses__", "__builtins__", "__bases__",
        "__mro__", "__dict__", "__getattribute__", "__reduce__", "__reduce_ex__", "__loader__",
        "__spec__", "f_globals", "f_locals", "f_builtins", "f_back", "gi_frame", "gi_code",
        "cr_frame", "ag_frame", "tb_frame", "co_code", "func_globals", "__self__", "__import__",
        "_module", "__setattr__", "__delattr__", "__init_subclass__", "__class_getitem__",
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
    requests_per_minute: int = Field(default=600, ge=1)

    def allows_module(self, name: str) -> bool:
        return module_allowed(name, self.allowed_modules)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def module_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    root = name.split(".", 1)[0]
    return root in allowed


def module_category(name: str) -> str:
    return MODULE_CATEGORIES.get(name.split(".", 1)[0], "module-not-allowed")


DEFAULT_POLICY = Policy()

# Standard-library modules are allowed only when listed; this set lets messages say "standard
# library module not available on the server" rather than "unknown package".
STDLIB = frozenset(sys.stdlib_module_names)
