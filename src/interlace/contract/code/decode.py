"""Rebuilding shipped code on the server: the decoding half of `source.py`.

Kept apart because it is the half that reads untrusted requests: every object is compiled
from its source text in a fresh namespace whose builtins are the policy's, under a file name
that maps back to the user's file (`remote_filename`), with its text registered in linecache
so tracebacks show the user's lines. Model references (`x:model`) bind to the hosted model by
module path only.
"""

from __future__ import annotations

import builtins
import contextlib
import linecache
import sys
import textwrap
import traceback
import zlib
from typing import Any, Callable

from ..guard.access import JobGuards
from ..guard.modules import allowed_object, body_api, module_proxy
from ..guard.transform import guard_module
from ..policy import ENGINE_MODULE, Policy
from ...tracing.syntax import parse
from .origin import FILE_PREFIX, FUTURE_ANNOTATIONS, REMOTE_MODULE, original_filename, remote_filename, resolve_qualname

__all__ = ["CodeDecoder", "restricted_builtins", "resolve_model_path", "decode_failure_text",
           "user_traceback_text", "shipped_model_refs", "register_lines"]


class CodeDecoder:
    """Value-decoder extension that rebuilds shipped objects under a policy."""

    def __init__(self, objects: dict[str, dict[str, Any]], policy: Policy, builtins_dict: dict[str, Any], model: Any = None) -> None:
        self.objects = objects
        self.policy = policy
        self.builtins = builtins_dict
        self.model = model  # the hosted model that `x:model` references resolve against
        self._memo: dict[str, Any] = {}
        self._building: set[str] = set()
        self._pending: dict[str, list[tuple[dict[str, Any], str]]] = {}

    def decode(self, node: dict[str, Any], decoder: Any) -> Any:
        tag = node.get("$t")
        if tag == "x:module":
            name = node.get("name")
            if not isinstance(name, str) or not self.policy.allows_module(name):
                raise _bad(f"module {name!r} is not allowed on this server")
            return _module_for_code(name)
        if tag == "x:ref":
            module, qualname = node.get("module"), node.get("qualname")
            if not isinstance(module, str) or not isinstance(qualname, str):
                raise _bad("a reference needs `module` and `qualname` strings")
            if module == "builtins":
                if qualname not in self.policy.allowed_builtins:
                    raise _bad(f"builtin {qualname!r} is not allowed")
                return getattr(builtins, qualname)
            if not self.policy.allows_module(module):
                raise _bad(f"module {module!r} is not allowed on this server")
            return self._reference(module, qualname)
        if tag == "x:model":
            if set(node) != {"$t", "path"}:
                raise _bad("a model reference has exactly one field, `path`")
            if self.model is None:
                raise _bad("model references need a model to resolve against")
            return resolve_model_path(self.model, node["path"])
        if tag == "x:object":
            return self._build(str(node.get("id")), decoder)
        if tag == "x:method":
            return self._getattr(decoder.decode(node["self"]), node["name"])
        if tag == "x:instance":
            cls = decoder.decode(node["cls"])
            if not isinstance(cls, type):
                raise _bad("an instance's class is not a class")
            obj = cls.__new__(cls)
            state = decoder.decode(node["state"])
            if not isinstance(state, dict):
                raise _bad("an instance's state must be a dict")
            for key, value in state.items():
                # (Names come from the request: never a dunder such as `__class__` or `__dict__`.)
                if type(key) is not str or (key.startswith("__") and key.endswith("__")):
                    raise _bad(f"an instance's state may not set {key!r}")
                object.__setattr__(obj, key, value)
            _restore_parameters(obj)
            return obj
        raise _bad(f"unknown tag {tag!r}")

    def _getattr(self, obj: Any, name: Any) -> Any:
        guarded = self.builtins.get("_getattr_")
        if guarded is None:
            raise _bad("shipped code needs the job's guards")
        return guarded(obj, name)

    def _reference(self, module: str, qualname: str) -> Any:
        """A function or class shipped by name: reached through the module's proxy and the
        attribute guard (`torch.nn.functional.relu`, `torch.Tensor.add`), or, for classes
        named by their defining module (`torch.nn.modules.linear.Linear`), one of the values
        some proxy hands out."""
        try:
            value: Any = _module_for_code(module)
            for part in qualname.split("."):
                value = self._getattr(value, part)
            return value
        except (AttributeError, TypeError, ImportError):
            pass
        try:
            value = resolve_qualname(module, qualname)
        except Exception:
            raise _bad(f"{module}.{qualname} does not exist on the server") from None
        if not allowed_object(value):
            raise _bad(f"{module}.{qualname} is not available to code that runs on the server")
        return value

    def _build(self, key: str, decoder: Any) -> Any:
        if key in self._memo:
            return self._memo[key]
        if key in self._building:
            return _Later(key)
        entry = self.objects.get(key)
        if not isinstance(entry, dict):
            raise _bad(f"object {key!r} is missing from the request")
        self._building.add(key)
        lineno = int(entry.get("lineno", 1) or 1)
        source = str(entry.get("source", ""))
        filename = remote_filename(str(entry.get("filename", "<unknown>")), _object_part(entry.get("name"), lineno, source))
        env: dict[str, Any] = {"__builtins__": self.builtins, "__name__": REMOTE_MODULE}
        later: list[tuple[str, str]] = []
        for name, value_node in (entry.get("globals") or {}).items():
            value = decoder.decode(value_node)
            if isinstance(value, _Later):
                later.append((name, value.key))
            else:
                env[name] = value
        closure = {name: decoder.decode(v) for name, v in (entry.get("closure") or {}).items()}
        with _module_globals(env):
            obj = _define(entry, source, filename, lineno, env, closure)
        if entry.get("kind") != "class":
            if entry.get("defaults") is not None:
                obj.__defaults__ = tuple(decoder.decode(entry["defaults"]))
            if entry.get("kwdefaults") is not None:
                obj.__kwdefaults__ = dict(decoder.decode(entry["kwdefaults"]))
        self._memo[key] = obj
        self._building.discard(key)
        for name, other in later:
            if other in self._memo:
                env[name] = self._memo[other]
            else:
                self._pending.setdefault(other, []).append((env, name))
        for target_env, name in self._pending.pop(key, []):
            target_env[name] = obj
        return obj


@contextlib.contextmanager
def _module_globals(env: dict[str, Any]) -> Any:
    """While a shipped class is defined, its module's namespace holds the class's globals, as
    it would at home: decorators that resolve names through the class's module (dataclasses
    reading a string annotation `ClassVar[int]` under `from __future__ import annotations`)
    see them."""
    holder = sys.modules[REMOTE_MODULE].__dict__
    added = [k for k in env if k not in holder]
    holder.update({k: env[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            holder.pop(k, None)


class _Later:
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _bad(message: str) -> Exception:
    from ..errors import WireFormatError

    return WireFormatError(message)


def _define(entry: dict[str, Any], source: str, filename: str, lineno: int, env: dict[str, Any], closure: dict[str, Any]) -> Any:
    kind = entry.get("kind")
    name = str(entry.get("name"))
    padded = "\n" * (lineno - 1)
    if closure:
        # Closures are rebuilt by a factory whose parameters become the captured cells.
        params = ", ".join(closure)
        inner = f"return {source}" if kind == "lambda" else f"{source}\nreturn {name}"
        text = "\n" * max(lineno - 2, 0) + f"def __interlace_factory__({params}):\n" + textwrap.indent(inner, "    ") + "\n"
    elif kind == "lambda":
        text = padded + f"__interlace_value__ = {source}\n"
    else:
        text = padded + source
    register_lines(filename, text)
    # Compiled under the sandbox's guards (contract/guard/transform.py), like the body.
    tree = guard_module(parse(text, filename), filename)
    code = compile(tree, filename, "exec", flags=FUTURE_ANNOTATIONS, dont_inherit=True)
    exec(code, env)
    if closure:
        return env.pop("__interlace_factory__")(**closure)
    if kind == "lambda":
        return env.pop("__interlace_value__")
    return env[name]


def shipped_model_refs(request: Any) -> list[str]:
    """`function: name -> model path` for each model reference in the shipped functions'
    and classes' globals and closures (what verbose output lists beside the body's refs)."""
    refs = []
    for spec in request.objects.values():
        entry = spec if isinstance(spec, dict) else spec.model_dump()
        for table in ("globals", "closure"):
            for var, node in (entry.get(table) or {}).items():
                if isinstance(node, dict) and node.get("$t") == "x:model":
                    refs.append(f"{entry.get('name')}: {var} -> {node.get('path')}")
    return sorted(refs)


def resolve_model_path(model: Any, path: Any) -> Any:
    """The envoy at `path` ("model", "model.transformer.h.0") of the hosted `model`.

    Paths come from untrusted requests, so only child modules are followed (never plain
    attributes, which could lead to a module's functions and their globals).
    """
    if type(path) is not str or not (path == "model" or path.startswith("model.")):
        raise _bad(f"model path {path!r} must be 'model' or start with 'model.'")
    envoy = model
    for part in path.split(".")[1:]:
        if part not in envoy._module._modules:
            raise _bad(f"the model on the server has no module {path!r} (no submodule {part!r} there)")
        envoy = envoy._child(part)
    return envoy


def _object_part(name: Any, lineno: int, source: str) -> str:
    # Content-addressed: two jobs running at once that ship different code from the same file
    # and line (two versions of a script) get different linecache entries.
    return f"{str(name)[:64]}:{lineno}:{zlib.crc32(source.encode('utf-8', 'replace')):08x}"


_REGISTERED: dict[str, None] = {}
_REGISTERED_LIMIT = 4096


def register_lines(filename: str, text: str) -> None:
    """Put shipped source text into linecache under the name it is compiled with, so that
    tracebacks show the user's lines. Bounded: a long-running server forgets the oldest."""
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    _REGISTERED.pop(filename, None)
    _REGISTERED[filename] = None
    while len(_REGISTERED) > _REGISTERED_LIMIT:
        old = next(iter(_REGISTERED))
        del _REGISTERED[old]
        linecache.cache.pop(old, None)


def user_traceback_text(error: BaseException) -> str:
    """`error` as a traceback of only the user's shipped frames, in their own files and lines
    (frames of code compiled under `remote_filename`; lines from what `register_lines` and
    the block's registration put in linecache)."""
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(error.__traceback__):
        if not frame.filename.startswith(FILE_PREFIX):
            continue
        name = "<with block>" if frame.name == "<module>" and "#" not in frame.filename.rpartition(">")[2] else frame.name
        lines.append(f'  File "{original_filename(frame.filename)}", line {frame.lineno}, in {name}\n')
        if frame.line:
            lines.append(f"    {frame.line.strip()}\n")
    lines.extend(traceback.format_exception_only(type(error), error))
    return "".join(lines).rstrip("\n")


def decode_failure_text(error: BaseException) -> str:
    """What the user sees when the server cannot rebuild the values a request sends.

    If the user's own code raised while being rebuilt (a class body, a decorator), that is
    shown as a traceback in their lines; otherwise the decoder's message, which names the
    value's path, with the likely cause.
    """
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if any(f.filename.startswith(FILE_PREFIX) for f in traceback.extract_tb(cause.__traceback__)):
            return (user_traceback_text(cause)
                    + "\n(raised while the server rebuilt a function or class that the trace uses, "
                      "from its source)")
        cause = cause.__cause__ or cause.__context__
    return (f"The server could not rebuild a value this trace sends: {error}\n"
            "Use the same Interlace version on client and server (`interlace env` shows both), "
            "and send data (numbers, strings, lists, dicts, tensors) or @interlace.remote objects.")


MSG_LOG_TRUNCATED = (
    "[interlace] printed output of this job passed the server's limit of {limit} bytes "
    "(policy.max_log_bytes); the rest is not kept. Fix: print less (save values and print them "
    "after the trace)."
)


def restricted_builtins(policy: Policy, log: Callable[[str], None] | None = None,
                        guards: JobGuards | None = None) -> dict[str, Any]:
    """The builtins shipped code sees: the policy's list, with `getattr`/`setattr`/`hasattr`/
    `delattr` and the transformer's names bound to the job's `guards`, a guarded `__import__`
    that gives read-only module proxies, and `print` sent to the job log, bounded by
    `policy.max_log_bytes`."""
    if guards is None:
        guards = JobGuards(policy)
    allowed = {name: getattr(builtins, name) for name in policy.allowed_builtins if hasattr(builtins, name)}
    allowed.update(guards.names())

    def guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level or type(name) is not str or not policy.allows_module(name):
            raise ImportError(f"module {name!r} is not available on the Interlace server (allowed: {', '.join(policy.allowed_modules)})")
        if fromlist:
            return _module_for_code(name)
        return _module_for_code(name.split(".", 1)[0])  # `import a.b` binds `a`

    allowed["__import__"] = guarded_import
    if log is not None:
        limit = int(policy.max_log_bytes)
        state = {"used": 0}

        def remote_print(*args: Any, sep: Any = " ", end: Any = "\n", **_: Any) -> None:
            used = state["used"]
            if used > limit:
                return
            text = str(sep).join(str(a) for a in args) + ("" if end == "\n" else str(end))
            size = len(text.encode("utf-8", "replace"))
            if used + size > limit:
                state["used"] = limit + 1
                keep = text.encode("utf-8", "replace")[: max(limit - used, 0)].decode("utf-8", "ignore")
                if keep:
                    log(keep)
                log(MSG_LOG_TRUNCATED.format(limit=limit))
                return
            state["used"] = used + size
            log(text)

        allowed["print"] = remote_print
    return allowed


def _module_for_code(name: str) -> Any:
    """What shipped code gets for module `name`: its read-only proxy, or for `interlace` the
    body API; ImportError if shipped code may not have it."""
    if name == ENGINE_MODULE:
        return body_api()
    proxy = module_proxy(name)
    if proxy is None:
        raise ImportError(f"module {name!r} is not available to code that runs on the Interlace server")
    return proxy


def _restore_parameters(obj: Any) -> None:
    """A torch layer's parameters travel as tensors: make them parameters again."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.nn.Module):
        return
    params = obj.__dict__.get("_parameters")
    if isinstance(params, dict):
        for name, value in list(params.items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                params[name] = torch.nn.Parameter(value, requires_grad=value.requires_grad)
