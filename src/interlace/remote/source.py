"""Functions, classes, lambdas and instances travel as source, never as bytecode or pickle.

Design note
-----------
A user function is sent as its source text plus, by value, exactly the global names its code
reads (found by compiling the source and walking every nested code object), its closure
cells, and its defaults. Functions and classes from modules the server provides (torch,
numpy, math, ...) go by reference (`module` + `qualname`) and are imported there, after the
policy allows the module. Objects are numbered in a table so a function that calls itself
(or two that call each other) is sent once.

On the server each shipped object is rebuilt by compiling its source in a fresh globals dict
under the user's filename and line numbers, so tracebacks point at the user's code.
"""

from __future__ import annotations

import __future__
import ast
import builtins
import dis
import importlib
import inspect
import linecache
import sys
import textwrap
import types
from typing import Any, Callable

from .policy import Policy, module_allowed
from .problems import Problem, first_line

__all__ = ["CodeEncoder", "CodeDecoder", "is_remote_decorated", "REMOTE_ATTR", "remote_filename"]

REMOTE_ATTR = "__interlace_remote__"
_BUILTIN_NAMES = set(dir(builtins))


def is_remote_decorated(obj: Any) -> bool:
    return REMOTE_ATTR in getattr(obj, "__dict__", {})


def remote_filename(filename: str) -> str:
    """Filename under which shipped source is compiled on the server (maps back by stripping)."""
    return filename if filename.startswith("<interlace-remote:") else f"<interlace-remote:{filename}>"


def original_filename(filename: str) -> str:
    if filename.startswith("<interlace-remote:") and filename.endswith(">"):
        return filename[len("<interlace-remote:") : -1]
    return filename


class CodeEncoder:
    """Value-encoder extension for code objects, modules and user class instances (client side).

    Problems (anything that cannot travel) are collected, not raised, so the user sees all.
    """

    def __init__(self, policy: Policy, *, strict_remote: bool = False) -> None:
        self.policy = policy
        self.strict = strict_remote
        self.objects: dict[str, dict[str, Any]] = {}
        self._ids: dict[int, str] = {}
        self._keep: list[Any] = []
        self.problems: list[Problem] = []
        self.remote_names: list[str] = []
        self.where: tuple[str, int] = ("<unknown>", 0)  # user line currently being encoded

    # -- entry point used by ValueEncoder ------------------------------------------------------

    def encode(self, value: Any, encoder: Any) -> Any:
        if isinstance(value, types.ModuleType):
            return self._module(value)
        if isinstance(value, (types.FunctionType, type)):
            ref = self._reference(value)
            if ref is not None:
                return ref
            return {"$t": "x:object", "id": self._object(value, encoder)}
        if isinstance(value, (types.BuiltinFunctionType, types.MethodType)) or callable(value) and not hasattr(value, "__dict__"):
            ref = self._reference(value)
            if ref is not None:
                return ref
        if isinstance(value, types.MethodType):
            return {"$t": "x:method", "self": encoder.encode(value.__self__), "name": value.__name__}
        cls = type(value)
        if cls.__module__ not in ("builtins",) and self._reference(cls) is None and _user_source_available(cls):
            state = {k: v for k, v in vars(value).items()} if hasattr(value, "__dict__") else {}
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(value, slot):
                    state[slot] = getattr(value, slot)
            return {"$t": "x:instance", "cls": self.encode(cls, encoder), "state": encoder.encode(state)}
        return NotImplemented

    # -- modules and references ---------------------------------------------------------------

    def _module(self, module: types.ModuleType) -> dict[str, Any]:
        name = module.__name__
        if not self.policy.allows_module(name):
            from .policy import module_category

            self._problem(module_category(name), f"module `{name}` is not available on the server",
                          "# compute the value before the trace and pass it in, or use a module\n# the server provides (run `interlace env` to list them)")
        return {"$t": "x:module", "name": name}

    def _reference(self, obj: Any) -> dict[str, Any] | None:
        """By-reference node for objects importable from an allowed module, else None."""
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
        if module is None and isinstance(obj, types.BuiltinFunctionType):
            owner = getattr(obj, "__self__", None)
            module = getattr(owner, "__name__", None) if isinstance(owner, types.ModuleType) else None
        if not module or not qualname or "<" in qualname:
            return None
        if module == "builtins":
            return {"$t": "x:ref", "module": "builtins", "qualname": qualname} if qualname in self.policy.allowed_builtins else None
        if not module_allowed(module, self.policy.allowed_modules):
            return None
        if is_remote_decorated(obj):  # user code inside an allowed package name: still ship by source
            return None
        try:
            if _resolve(module, qualname) is not obj:
                return None
        except Exception:
            return None
        return {"$t": "x:ref", "module": module, "qualname": qualname}

    # -- functions and classes by source -------------------------------------------------------

    def _object(self, obj: Any, encoder: Any) -> str:
        key = self._ids.get(id(obj))
        if key is not None:
            return key
        key = f"o{len(self._ids)}"
        self._ids[id(obj)] = key
        self._keep.append(obj)
        name = getattr(obj, "__name__", "?")
        kind = "class" if isinstance(obj, type) else ("lambda" if name == "<lambda>" else "function")
        entry: dict[str, Any] = {"kind": kind, "name": name, "decorated": is_remote_decorated(obj)}
        self.objects[key] = entry
        if entry["decorated"] or kind != "lambda":
            self.remote_names.append(name)
        if self.strict and not entry["decorated"] and kind != "lambda":
            noun = "class" if kind == "class" else "function"
            # Reported at the line of the trace that uses it (self.where); the server, which
            # only knows the definition, reports the same message there.
            self._problem(
                f"undecorated-{noun}",
                f"`{name}` is not decorated with @interlace.remote (strict_remote=True)",
                f"from interlace import remote\n\n@remote\n{'class' if kind == 'class' else 'def'} {name}...",
            )
        try:
            source, filename, lineno = self._source(obj, kind)
        except OSError:
            self._problem(
                "source-unavailable",
                f"the source code of `{name}` cannot be read (defined in a REPL, with exec, or compiled), so it cannot be sent",
                f"# define {name} in a .py file or a notebook cell, or compute its result before the trace",
                obj,
            )
            entry.update(source="", filename="<unknown>", lineno=0, globals={}, closure={})
            return key
        entry.update(source=source, filename=filename, lineno=lineno)
        from .codecheck import check_source

        self.problems.extend(check_source(source, filename, lineno, self.policy, what=f"`{name}`"))
        freevars = obj.__code__.co_freevars if kind != "class" else ()
        entry["closure"] = {}
        if freevars:
            for var, cell in zip(freevars, obj.__closure__ or ()):
                try:
                    value = cell.cell_contents
                except ValueError:
                    continue
                entry["closure"][var] = self._encode_captured(value, encoder, obj, kind, var)
        namespace = _defining_globals(obj)
        entry["globals"] = {}
        for gname in sorted(_global_names(source, kind) - set(freevars) - {name}):
            if gname in namespace:
                entry["globals"][gname] = self._encode_captured(namespace[gname], encoder, obj, kind, gname)
            elif gname not in _BUILTIN_NAMES:
                continue  # NameError at run time, exactly as it would be locally
        if kind != "class":
            entry["defaults"] = encoder.encode(obj.__defaults__) if obj.__defaults__ else None
            entry["kwdefaults"] = encoder.encode(obj.__kwdefaults__) if obj.__kwdefaults__ else None
        else:
            for base in obj.__bases__:
                if base is object:
                    continue
                if self._reference(base) is None and not _user_source_available(base):
                    self._problem(
                        "class-base-not-allowed",
                        f"class `{name}` derives from `{base.__module__}.{base.__qualname__}`, which the server cannot import",
                        f"# derive {name} from `object`, a torch class, or another class of yours",
                        obj,
                    )
        return key

    def _encode_captured(self, value: Any, encoder: Any, owner: Any, kind: str, var: str) -> Any:
        before = len(self.problems)
        try:
            return encoder.encode(value)
        except TypeError as e:  # UnsupportedValueError is a TypeError
            category = "lambda-capture" if kind == "lambda" else "unserializable-variable"
            self._problem(
                category,
                f"`{getattr(owner, '__name__', '?')}` uses `{var}` ({type(value).__name__}), which cannot be sent: {first_line(e)}",
                f"# turn `{var}` into a tensor, number, list or dict before the trace, or\n# make it a @remote function that imports what it needs inside:\n"
                f"@remote\ndef {var if var.isidentifier() else 'helper'}(x):\n    import torch\n    ...",
                owner,
            )
            return None
        finally:
            if kind == "lambda":
                code = owner.__code__
                for i in range(before, len(self.problems)):
                    problem = self.problems[i]
                    self.problems[i] = problem.model_copy(update={
                        "category": "lambda-capture",
                        "filename": code.co_filename,
                        "lineno": code.co_firstlineno,
                        "message": f"this lambda uses `{var}`, which cannot be sent ({problem.message})",
                        "fix": "# make it a @remote function that imports what it needs inside:\n"
                               "@remote\ndef helper(x):\n    import torch\n    return ...",
                    })

    def _source(self, obj: Any, kind: str) -> tuple[str, str, int]:
        if kind == "lambda":
            return _lambda_source(obj)
        lines, lineno = inspect.getsourcelines(obj)
        source = textwrap.dedent("".join(lines))
        if kind != "class":
            source = _strip_remote_decorators(source)
        filename = (inspect.getsourcefile(obj) or "<unknown>") if kind == "class" else obj.__code__.co_filename
        return source, filename, max(lineno, 1)

    def _problem(self, category: str, message: str, fix: str, obj: Any = None) -> None:
        filename, lineno = self.where
        if obj is not None:
            try:
                filename, lineno = inspect.getsourcefile(obj) or filename, inspect.getsourcelines(obj)[1]
            except (OSError, TypeError):
                pass  # no source: keep the trace line that uses it
        self.problems.append(Problem(category=category, message=message, filename=filename, lineno=lineno, fix=fix))


def _user_source_available(cls: type) -> bool:
    """True for the user's own classes: readable source outside the stdlib and installed packages
    (those must come by reference from a module the server allows, or not at all)."""
    root = (cls.__module__ or "").split(".")[0]
    if root in ("builtins",) or root in sys.stdlib_module_names:
        return False
    try:
        path = inspect.getsourcefile(cls) or ""
    except (OSError, TypeError):
        return False
    return "site-packages" not in path and "dist-packages" not in path


def _defining_globals(obj: Any) -> dict[str, Any]:
    if isinstance(obj, type):
        module = sys.modules.get(obj.__module__)
        return vars(module) if module is not None else {}
    return obj.__globals__


def _resolve(module: str, qualname: str) -> Any:
    value: Any = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


_FUTURE_ANNOTATIONS = __future__.annotations.compiler_flag


def _global_names(source: str, kind: str) -> set[str]:
    """Names the source reads from its globals (decorators, defaults, bases and bodies)."""
    code = compile(source, "<names>", "exec", flags=_FUTURE_ANNOTATIONS, dont_inherit=True)
    names: set[str] = set()
    stack = [code]
    while stack:
        co = stack.pop()
        for ins in dis.get_instructions(co):
            # Dunders such as the `__name__` every class body reads belong to the receiving side.
            if ins.opname in ("LOAD_NAME", "LOAD_GLOBAL") and not (ins.argval.startswith("__") and ins.argval.endswith("__")):
                names.add(ins.argval)
        stack.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
    return names


def _strip_remote_decorators(source: str) -> str:
    """Drop `@remote` / `@interlace.remote(...)` lines: the server does not need to re-validate
    at definition time, and the decorator name would otherwise have to be shipped."""
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.decorator_list:
        return source
    lines = source.splitlines(keepends=True)
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "remote":
            for i in range(dec.lineno - 1, (dec.end_lineno or dec.lineno)):
                lines[i] = "\n"  # keep line numbers
    return "".join(lines)


def _lambda_source(fn: types.FunctionType) -> tuple[str, str, int]:
    """The text of exactly this lambda, even with several lambdas on one line."""
    code = fn.__code__
    filename = code.co_filename
    lines = linecache.getlines(filename, fn.__globals__)
    if not lines:
        raise OSError("no source")
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError:
        raise OSError("source does not parse") from None
    params = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    body_positions = {(p[0], p[2]) for p in code.co_positions() if p[0] is not None}
    candidates = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Lambda) and node.lineno <= code.co_firstlineno <= (node.end_lineno or node.lineno):
            names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
            if names == params:
                candidates.append(node)
    if not candidates:
        raise OSError("lambda not found")
    if len(candidates) > 1:
        exact = [n for n in candidates if (n.body.lineno, n.body.col_offset) in body_positions]
        candidates = exact or candidates
    node = candidates[0]
    segment = ast.get_source_segment("".join(lines), node)
    if segment is None:
        raise OSError("lambda source not found")
    return "(" + segment + ")", filename, node.lineno


# -- decoding (server side) --------------------------------------------------------------------


class CodeDecoder:
    """Value-decoder extension that rebuilds shipped objects under a policy."""

    def __init__(self, objects: dict[str, dict[str, Any]], policy: Policy, builtins_dict: dict[str, Any]) -> None:
        self.objects = objects
        self.policy = policy
        self.builtins = builtins_dict
        self._memo: dict[str, Any] = {}
        self._building: set[str] = set()
        self._pending: dict[str, list[tuple[dict[str, Any], str]]] = {}

    def decode(self, node: dict[str, Any], decoder: Any) -> Any:
        tag = node.get("$t")
        if tag == "x:module":
            name = node.get("name")
            if not isinstance(name, str) or not self.policy.allows_module(name):
                raise _bad(f"module {name!r} is not allowed on this server")
            return importlib.import_module(name)
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
            try:
                return _resolve(module, qualname)
            except Exception:
                raise _bad(f"{module}.{qualname} does not exist on the server") from None
        if tag == "x:object":
            return self._build(str(node.get("id")), decoder)
        if tag == "x:method":
            return getattr(decoder.decode(node["self"]), node["name"])
        if tag == "x:instance":
            cls = decoder.decode(node["cls"])
            if not isinstance(cls, type):
                raise _bad("an instance's class is not a class")
            obj = cls.__new__(cls)
            state = decoder.decode(node["state"])
            if not isinstance(state, dict):
                raise _bad("an instance's state must be a dict")
            for key, value in state.items():
                object.__setattr__(obj, key, value)
            return obj
        raise _bad(f"unknown tag {tag!r}")

    def _build(self, key: str, decoder: Any) -> Any:
        if key in self._memo:
            return self._memo[key]
        if key in self._building:
            return _Later(key)
        entry = self.objects.get(key)
        if not isinstance(entry, dict):
            raise _bad(f"object {key!r} is missing from the request")
        self._building.add(key)
        filename = remote_filename(str(entry.get("filename", "<unknown>")))
        lineno = int(entry.get("lineno", 1) or 1)
        source = str(entry.get("source", ""))
        env: dict[str, Any] = {"__builtins__": self.builtins, "__name__": _REMOTE_MODULE}
        later: list[tuple[str, str]] = []
        for name, value_node in (entry.get("globals") or {}).items():
            value = decoder.decode(value_node)
            if isinstance(value, _Later):
                later.append((name, value.key))
            else:
                env[name] = value
        closure = {name: decoder.decode(v) for name, v in (entry.get("closure") or {}).items()}
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


# Shipped classes report this module; it exists (empty) so that machinery which looks up a
# class's module, such as dataclasses resolving string annotations, finds one.
_REMOTE_MODULE = "__interlace_remote__"
sys.modules.setdefault(_REMOTE_MODULE, types.ModuleType(_REMOTE_MODULE, "Namespace of code shipped to Interlace."))


class _Later:
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _bad(message: str) -> Exception:
    from .errors import WireFormatError

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
    lines = text.splitlines(keepends=True)
    linecache.cache[filename] = (len(text), None, lines, filename)
    code = compile(text, filename, "exec", flags=_FUTURE_ANNOTATIONS, dont_inherit=True)
    exec(code, env)
    if closure:
        return env.pop("__interlace_factory__")(**closure)
    if kind == "lambda":
        return env.pop("__interlace_value__")
    return env[name]


def restricted_builtins(policy: Policy, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The builtins shipped code sees: the policy's list, a guarded `__import__`, and `print`
    sent to the job log."""
    allowed = {name: getattr(builtins, name) for name in policy.allowed_builtins if hasattr(builtins, name)}

    def guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level or not policy.allows_module(name):
            raise ImportError(f"module {name!r} is not available on the Interlace server (allowed: {', '.join(policy.allowed_modules)})")
        return importlib.import_module(name) if not fromlist else __import__(name, globals, locals, fromlist, 0)

    allowed["__import__"] = guarded_import
    if log is not None:
        def remote_print(*args: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
            log(sep.join(str(a) for a in args) + ("" if end == "\n" else end))

        allowed["print"] = remote_print
    return allowed
