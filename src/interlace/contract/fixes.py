"""Fixes that fit the value: what to write instead of sending a value that cannot travel.

A fix is only useful if it applies: `torch.as_tensor(log_file)` for an open file is worse
than no advice. So each value is sorted into a kind (an open file, a module, a generator,
a lock or socket, a container subclass, a tensor-like, a user object, ...) and each kind has
its own one-line hint (for `UnsupportedValueError` messages) and code (for a `Problem.fix`).

`expr` below is how the user's code spells the value: a name (`log_file`) or a path inside
one (`config['log']`).
"""

from __future__ import annotations

import collections.abc
import io
import numbers
import types
from dataclasses import dataclass
from typing import Any, Callable

from .code.origin import is_envoy, user_source_available

__all__ = ["ValueFix", "fix_for_value", "value_hint", "value_fix"]


@dataclass(frozen=True)
class ValueFix:
    kind: str
    hint: str  # prose, completes "...; <hint>"
    code: Callable[[str], str]  # expr -> code, for Problem.fix


def _stem(expr: str) -> str:
    """An identifier made from `expr` for the new variable the fix introduces."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in expr).strip("_")
    while "__" in out:
        out = out.replace("__", "_")
    if not out or out[0].isdigit():
        out = "value" + ("_" + out if out else "")
    return out


# -- kinds, most specific first --------------------------------------------------------------

_PROCESS_LOCAL_NAMES = (
    # (module prefix, class name fragment) of objects that only mean something in this process
    "lock", "rlock", "semaphore", "condition", "event", "barrier", "thread", "socket", "popen",
    "process", "queue", "pool", "executor", "connection", "cursor", "loop", "selector", "pipe",
    "future", "logger", "handler", "session", "client", "engine", "mmap",
)
_PROCESS_LOCAL_MODULES = (
    "_thread", "threading", "socket", "ssl", "subprocess", "multiprocessing", "queue", "asyncio",
    "concurrent", "sqlite3", "logging", "selectors", "mmap", "select", "http", "urllib", "requests",
    "httpx", "aiohttp", "psycopg", "psycopg2", "sqlalchemy", "redis", "zmq",
)


def _is_file(value: Any) -> bool:
    if isinstance(value, io.IOBase):
        return True
    # tempfile.NamedTemporaryFile and similar wrappers
    return callable(getattr(value, "read", None)) and callable(getattr(value, "fileno", None))


def _is_binary_file(value: Any) -> bool:
    if isinstance(value, (io.RawIOBase, io.BufferedIOBase)):
        return True
    mode = getattr(value, "mode", "")
    return isinstance(mode, str) and "b" in mode


def _is_process_local(value: Any) -> bool:
    cls = type(value)
    root = (cls.__module__ or "").split(".")[0]
    if root in _PROCESS_LOCAL_MODULES:
        return True
    name = cls.__name__.lower()
    return root not in ("builtins",) and any(name.endswith(part) for part in _PROCESS_LOCAL_NAMES) and not user_source_available(cls)


def _is_iterator(value: Any) -> bool:
    return isinstance(value, (types.GeneratorType, collections.abc.Iterator, types.AsyncGeneratorType))


def _is_tensor_like(value: Any) -> bool:
    cls = type(value)
    return any(hasattr(cls, attr) for attr in ("__array__", "__dlpack__", "__array_interface__", "__cuda_array_interface__"))


def _file(value: Any) -> ValueFix:
    binary = _is_binary_file(value)
    what = "bytes" if binary else "text"
    return ValueFix(
        "file",
        f"an open file cannot be sent; read it before the trace and send its {'bytes' if binary else 'text'} "
        f"(`{what} = f.read()`), or load tensors from it with torch.load before the trace",
        lambda e: f"# read the file before the trace, on your machine, and use its contents in the body:\n"
                  f"{_stem(e)}_{what} = {e}.read()",
    )


def _module(value: Any) -> ValueFix:
    name = getattr(value, "__name__", "module")
    return ValueFix(
        "module",
        "a module object is not sent; import it inside a @interlace.remote function that uses it",
        lambda e: f"# `{e}` is the module {name}: import it inside a @remote function instead of passing it in:\n"
                  f"from interlace import remote\n\n@remote\ndef helper(x):\n    import {name}\n    return ...",
    )


def _iterator(value: Any) -> ValueFix:
    return ValueFix(
        "iterator",
        "a generator or iterator is not sent; turn it into a list before the trace (`list(...)`)",
        lambda e: f"# materialize it before the trace:\n{e} = list({e})",
    )


def _process_local(value: Any) -> ValueFix:
    cls = type(value)
    kind = f"{cls.__module__}.{cls.__qualname__}"
    if "logg" in kind.lower():
        return ValueFix(
            "logger",
            "a logger only works in this process; in the body use print(...), which goes to the job's log",
            lambda e: f"# in the body, print instead (it goes to the job's log); use `{e}` after the trace:\n"
                      f"print(\"step done\")",
        )
    return ValueFix(
        "process-local",
        f"a {cls.__qualname__} only works in this process (locks, threads, sockets, connections "
        "cannot move to a server); don't use it in the trace body",
        lambda e: f"# don't use `{e}` ({cls.__qualname__}) inside the trace; use it before or after,\n"
                  f"# on your machine, with the values the trace saved:\n"
                  f"with model.trace(x, remote=True):\n    h = model.layer.output.save()\n"
                  f"...  # use {e} here, with h",
    )


def _convert(kind: str, ctor: str) -> ValueFix:
    return ValueFix(
        kind,
        f"convert it with {ctor}(...) before the trace, or decorate its class with @interlace.remote",
        lambda e: f"# convert it before the trace:\n{e} = {ctor}({e})",
    )


def _tensor_like(value: Any) -> ValueFix:
    cls = type(value)
    if cls.__module__.split(".")[0] == "pandas":
        return ValueFix(
            "dataframe",
            "convert it with torch.as_tensor(x.to_numpy()) or x.to_dict() before the trace",
            lambda e: f"# convert it before the trace:\n{e} = torch.as_tensor({e}.to_numpy())   # or {e}.to_dict()",
        )
    return ValueFix(
        "array-like",
        "convert it with np.asarray(...) or torch.as_tensor(...) before the trace",
        lambda e: f"# convert it before the trace:\n{e} = torch.as_tensor(np.asarray({e}))",
    )


def _number(value: Any) -> ValueFix:
    # Decimal is a Number but not Real; float() is still what fits it.
    if isinstance(value, numbers.Integral):
        ctor = "int"
    elif isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        ctor = "complex"
    else:
        ctor = "float"
    return _convert("number", ctor)


def _callable(value: Any) -> ValueFix:
    return ValueFix(
        "callable",
        "only functions and classes with readable source (your own, decorated with @interlace.remote) "
        "or from modules the server provides can be sent; wrap the call in a @interlace.remote function",
        lambda e: f"# call it inside a @remote function of yours, or compute its result before the trace:\n"
                  f"from interlace import remote\n\n@remote\ndef helper(x):\n    return ...  # what {e}(x) computes",
    )


def _other_model(value: Any) -> ValueFix:
    return ValueFix(
        "other-model",
        "only the traced model is on the server; use its modules, or run a separate trace on the other model",
        lambda e: f"# use the traced model's modules, or run a separate trace for the model of `{e}`",
    )


def _user_object(value: Any) -> ValueFix:
    cls = type(value)
    return ValueFix(
        "object",
        _GENERIC_HINT,
        lambda e: f"# decorate its class (defined in a .py file) so it can be sent:\nfrom interlace import remote\n\n"
                  f"@remote\nclass {cls.__name__}:\n    ...\n"
                  f"# or send only its data, e.g. {_stem(e)}_state = dict(vars({e}))",
    )


def _library_object(value: Any) -> ValueFix:
    cls = type(value)
    return ValueFix(
        "library-object",
        f"a {cls.__module__}.{cls.__qualname__} cannot be sent; compute what the body needs from it before "
        "the trace (numbers, strings, lists, dicts, tensors) and send that",
        lambda e: f"# compute what the body needs from `{e}` before the trace, and pass that in:\n"
                  f"{_stem(e)}_value = ...   # e.g. a number, list, dict or tensor computed from {e}",
    )


def fix_for_value(value: Any) -> ValueFix:
    """The kind of `value` with its hint and fix (for a value that cannot be sent)."""
    if is_envoy(value):
        return _other_model(value)
    if isinstance(value, types.ModuleType):
        return _module(value)
    if _is_file(value):
        return _file(value)
    if _is_iterator(value):
        return _iterator(value)
    if _is_process_local(value):
        return _process_local(value)
    # container and scalar subclasses that lost their exact type (namedtuple, defaultdict, ...)
    for base, ctor in ((tuple, "tuple"), (list, "list"), (dict, "dict"), (set, "set"), (frozenset, "frozenset"),
                       (str, "str"), (bytes, "bytes"), (bool, "bool"), (int, "int"), (float, "float")):
        if isinstance(value, base):
            return _convert("subclass", ctor)
    if isinstance(value, memoryview):
        return _convert("bytes-like", "bytes")
    if _is_tensor_like(value):
        return _tensor_like(value)
    if isinstance(value, numbers.Number):
        return _number(value)
    if isinstance(value, collections.abc.Mapping):
        return _convert("mapping", "dict")
    if isinstance(value, (collections.abc.Set, collections.abc.KeysView)):
        return _convert("set-like", "set")
    if isinstance(value, (collections.abc.Sequence, collections.abc.ValuesView, collections.abc.ItemsView)):
        return _convert("sequence", "list")
    cls = type(value)
    user_class = cls.__module__ == "__main__" or user_source_available(cls)
    if isinstance(value, type) or (callable(value) and not user_class):
        return _callable(value)
    if user_class:
        return _user_object(value)
    if cls.__module__ == "builtins":
        return ValueFix("other", _GENERIC_HINT, lambda e: f"# send data instead: a number, string, list, dict or tensor computed from {e}")
    return _library_object(value)


_GENERIC_HINT = "convert it to a tensor, list or dict before the trace, or decorate its class with @interlace.remote"


def value_hint(value: Any) -> str:
    return fix_for_value(value).hint


def value_fix(expr: str, value: Any) -> str:
    return fix_for_value(value).code(expr)


def fix_for_error(name: str, error: BaseException, value: Any, root: str = "value") -> str:
    """The fix, as code, for `name` whose encoding raised `error` (an UnsupportedValueError
    from `ValueEncoder`, which records the failing part and its path under `root`)."""
    part = getattr(error, "value", value)
    path = getattr(error, "path", None)
    expr = name
    if part is not value and isinstance(path, str) and path.startswith(root):
        expr = name + path[len(root):]
    return value_fix(expr, part)
