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

import ast
import builtins
import dis
import inspect
import linecache
import sys
import textwrap
import types
from typing import Any

from ..guard.modules import body_api_name
from ..policy import ENGINE_MODULE, Policy, module_allowed
from ..problems import Problem, first_line
from .origin import FUTURE_ANNOTATIONS, is_envoy, is_remote_decorated, resolve_qualname, user_source_available
from ...tracing.local_block import List, is_local_only
from ...tracing.syntax import parse

__all__ = ["CodeEncoder", "MSG_LOCAL_ONLY", "local_only_fix"]

#: A `@interlace.trace` function the shipped body would use (outside a local block).
MSG_LOCAL_ONLY = (
    "`{name}` is marked @interlace.trace: it runs only on your machine, inside `with interlace.local():`, "
    "and is never sent to the server"
)

_BUILTIN_NAMES = set(dir(builtins))


class CodeEncoder:
    """Value-encoder extension for code objects, modules and user class instances (client side).

    Problems (anything that cannot travel) are collected, not raised, so the user sees all.
    """

    def __init__(self, policy: Policy, *, strict_remote: bool = False, model: Any = None) -> None:
        self.policy = policy
        self.strict = strict_remote
        # The traced model: its envoys travel as references (`x:model`) that the executor
        # binds to the hosted model. None (at decoration time) accepts any model's envoys.
        self.model = model
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
        if is_envoy(value):
            return self._model_ref(value)
        if type(value) is List:  # `interlace.list()`: a plain list on the wire
            return encoder.encode(list(value))
        if is_local_only(value):
            name = getattr(value, "__name__", "?")
            self._problem("local-only-function", MSG_LOCAL_ONLY.format(name=name), local_only_fix(name, *self.where))
            return None
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
        if cls.__module__ not in ("builtins",) and self._reference(cls) is None and user_source_available(cls):
            state = {k: v for k, v in vars(value).items()} if hasattr(value, "__dict__") else {}
            for slot in getattr(cls, "__slots__", ()):
                if hasattr(value, slot):
                    state[slot] = getattr(value, slot)
            return {"$t": "x:instance", "cls": self.encode(cls, encoder), "state": encoder.encode(state)}
        if _is_torch_layer(value) and self._reference(cls) is not None:
            # A layer of a server-provided class (`torch.nn.Linear` in a probe, or used in the
            # body): its class by reference, its state (parameters, buffers, sublayers) as data.
            return {"$t": "x:instance", "cls": self.encode(cls, encoder), "state": encoder.encode(dict(vars(value)))}
        return NotImplemented

    # -- modules and references ---------------------------------------------------------------

    def _model_ref(self, envoy: Any) -> dict[str, Any]:
        """The model or one of its modules, reached from a shipped function's globals, closure
        or a container: sent by path, like the body's own model names (`request.model_refs`)."""
        if self.model is not None:
            root = self.model
            # An edited copy (model.edit()) shares its original's envoys: same model.
            roots = {id(root), id(root.__dict__.get("_edit_origin"))}
            if id(envoy._root) not in roots:
                from ..errors import UnsupportedValueError

                raise UnsupportedValueError(
                    f"`{envoy.path}` belongs to a different model from the one being traced; "
                    "only the traced model is on the server"
                )
        return {"$t": "x:model", "path": envoy.path}

    def _module(self, module: types.ModuleType) -> dict[str, Any]:
        name = module.__name__
        if not self.policy.allows_module(name):
            from ..policy import module_category

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
        if module.split(".", 1)[0] == ENGINE_MODULE:
            # Interlace's own functions (`from interlace import save`) go as names of the body
            # API the server gives shipped code, never as source or as the package.
            api_name = body_api_name(obj)
            return {"$t": "x:ref", "module": ENGINE_MODULE, "qualname": api_name} if api_name else None
        if module == "builtins":
            return {"$t": "x:ref", "module": "builtins", "qualname": qualname} if qualname in self.policy.allowed_builtins else None
        if not module_allowed(module, self.policy.allowed_modules):
            return None
        if is_remote_decorated(obj):  # user code inside an allowed package name: still ship by source
            return None
        try:
            if resolve_qualname(module, qualname) is not obj:
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
        from ..codecheck import check_source

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
        wanted = _global_names(source, kind)
        if kind == "class":
            wanted |= _dataclass_marker_names(source, namespace)
        for gname in sorted(wanted - set(freevars) - {name}):
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
                if self._reference(base) is None and not user_source_available(base):
                    self._problem(
                        "class-base-not-allowed",
                        f"class `{name}` derives from `{base.__module__}.{base.__qualname__}`, which the server cannot import",
                        f"# derive {name} from `object`, a torch class, or another class of yours",
                        obj,
                    )
        return key

    def _encode_captured(self, value: Any, encoder: Any, owner: Any, kind: str, var: str) -> Any:
        before = len(self.problems)
        root = encoder.path  # the failing part's path is reported below this one
        try:
            return encoder.encode(value)
        except TypeError as e:  # UnsupportedValueError is a TypeError
            from ..fixes import fix_for_error

            category = "lambda-capture" if kind == "lambda" else "unserializable-variable"
            self._problem(
                category,
                f"`{getattr(owner, '__name__', '?')}` uses `{var}` ({type(value).__name__}), which cannot be sent: {first_line(e)}",
                fix_for_error(var, e, value, root),
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
                        # the fix made for the captured value fits it (a file is read, a
                        # module imported inside a @remote function, ...)
                        "fix": problem.fix or "# make it a @remote function that imports what it needs inside:\n"
                               "@remote\ndef helper(x):\n    import torch\n    return ...",
                    })

    def _source(self, obj: Any, kind: str) -> tuple[str, str, int]:
        if kind == "lambda":
            return _lambda_source(obj)
        lines, lineno = inspect.getsourcelines(obj)
        source = _strip_remote_decorators(textwrap.dedent("".join(lines)))
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


def local_only_fix(name: str, filename: str, lineno: int) -> str:
    """The fix for a local-only function used at `filename:lineno`: that statement in a local block."""
    statement = f"result = {name}(...)"
    line = linecache.getline(filename, lineno).strip()
    if name in line:
        try:
            tree = parse(line)
        except SyntaxError:
            tree = None
        if tree is not None and len(tree.body) == 1 and not isinstance(tree.body[0], ast.With):
            statement = ast.unparse(tree.body[0])  # (without its comment)
    return f"with interlace.local():\n    {statement}"


def _is_torch_layer(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _defining_globals(obj: Any) -> dict[str, Any]:
    if isinstance(obj, type):
        module = sys.modules.get(obj.__module__)
        return vars(module) if module is not None else {}
    return obj.__globals__


def _global_names(source: str, kind: str) -> set[str]:
    """Names the source reads from its globals (decorators, defaults, bases and bodies)."""
    code = compile(source, "<names>", "exec", flags=FUTURE_ANNOTATIONS, dont_inherit=True)
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


def _dataclass_marker_names(source: str, namespace: dict[str, Any]) -> set[str]:
    """Names in a class's annotations that dataclasses must resolve to tell a `ClassVar` or an
    `InitVar` from a field. Under `from __future__ import annotations` annotations are strings
    that no bytecode loads, and dataclasses reads these names from the class's module."""
    import dataclasses
    import typing

    markers = (typing.ClassVar, dataclasses.InitVar, typing, dataclasses)
    names: set[str] = set()
    for node in ast.walk(parse(textwrap.dedent(source))):
        if isinstance(node, ast.AnnAssign):
            for sub in ast.walk(node.annotation):
                if isinstance(sub, ast.Name) and any(namespace.get(sub.id) is m for m in markers):
                    names.add(sub.id)
    return names


def _strip_remote_decorators(source: str) -> str:
    """Drop `@remote` / `@interlace.remote(...)` lines of a function or class: the server does
    not re-validate at definition time (the decorator's check reads source files, which the
    server does not have), and the decorator name would otherwise have to be shipped."""
    tree = parse(source)
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or not node.decorator_list:
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
        tree = parse("".join(lines))
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
