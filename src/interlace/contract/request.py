"""The request: what a trace sends to a server, built from a captured tracer.

Only what the body references travels: the names its code reads that the caller defines
(not names the body assigns before reading), each encoded by value; the model and its
submodules as references bound on the other side; user functions and classes as source.
"""

from __future__ import annotations

import ast
import functools
import sys
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .._version import PROTOCOL_VERSION, __version__
from .codecheck import check_source
from .errors import UnsupportedValueError, WireFormatError
from .fixes import fix_for_error
from .policy import DEFAULT_POLICY, Policy
from .problems import Problem, first_line, unique
from .code.encode import CodeEncoder
from .values.encode import ValueEncoder
from .wire.decode import decode_message
from .wire.encode import encode_message

if TYPE_CHECKING:
    from ..tracing.tracer import Tracer

__all__ = ["BlockSpec", "ObjectSpec", "TraceRequest", "BuiltRequest", "build_request", "encode_request", "decode_request", "free_names"]


class BlockSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: str = Field(max_length=4096)
    first_lineno: int = Field(ge=1)
    source: str
    as_name: str | None = None


class ObjectSpec(BaseModel):
    """A function, lambda or class shipped by source (see `source.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["function", "lambda", "class"]
    name: str = Field(max_length=512)
    decorated: bool = False
    source: str = ""
    filename: str = Field(default="<unknown>", max_length=4096)
    lineno: int = Field(default=0, ge=0)
    globals: dict[str, Any] = {}
    closure: dict[str, Any] = {}
    defaults: Any = None
    kwdefaults: Any = None


# `rename=` travels as data the server applies to its model for the job: module paths and
# plain alias names only, so an alias can never name a dunder or a private attribute.
_ModulePath = Annotated[str, StringConstraints(pattern=r"^\.?[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", max_length=200)]
_AliasName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=100)]


class TraceRequest(BaseModel):
    """The JSON envelope of a request (tensors travel beside it in the safetensors part)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = PROTOCOL_VERSION  # type: ignore[assignment]
    interlace_version: str = __version__
    python_version: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    model_key: str
    kind: Literal["trace", "generate", "session"]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    block: BlockSpec
    variables: dict[str, Any] = {}
    objects: dict[str, ObjectSpec] = {}
    model_refs: dict[str, str] = {}
    remote_objects: list[str] = []
    strict_remote: bool = False
    # Modules whose `.source` the client built before the trace: built on the server too,
    # before the run, so their ops count from the start there as well.
    source_modules: list[str] = []
    # The client model's aliases (`rename=`), so `model.layers[0]` means the same on the server.
    rename: dict[_ModulePath, _AliasName | list[_AliasName]] = Field(default_factory=dict, max_length=100)


class BuiltRequest:
    def __init__(self, request: TraceRequest, tensors: dict[str, Any], problems: list[Problem]) -> None:
        self.request = request
        self.tensors = tensors
        self.problems = problems


def build_request(tracer: "Tracer", model_key: str, policy: Policy = DEFAULT_POLICY, *, strict_remote: bool = False) -> BuiltRequest:
    """Encode what `tracer`'s body needs. Problems are collected, not raised."""
    from ..tracing.envoy import Envoy
    from ..tracing.tracer import frame_lookup, _MISSING

    block = tracer.block
    frame = tracer._frame
    assert block is not None and frame is not None
    code = CodeEncoder(policy, strict_remote=strict_remote, model=tracer.model)
    encoder = ValueEncoder(extension=code)
    problems: list[Problem] = []
    lookup = frame_lookup(frame)
    first_use = _first_uses(block.source, block.first_lineno)
    variables: dict[str, Any] = {}
    model_refs: dict[str, str] = {}
    root = tracer.model
    for name in sorted(free_names(block.source) - ({block.as_name} if block.as_name else set())):
        value = lookup(name)
        if value is _MISSING:
            continue
        line = first_use.get(name, block.first_lineno)
        code.where = (block.filename, line)
        if isinstance(value, Envoy):
            # An edited copy (model.edit()) shares its original's envoys: same model.
            roots = {id(root), id(root.__dict__.get("_edit_origin"))} if root is not None else set()
            if id(value._root) in roots:
                model_refs[name] = value.path
            else:
                problems.append(Problem(
                    category="unserializable-variable", filename=block.filename, lineno=line,
                    message=f"`{name}` is a different model from the one being traced; only the traced model is on the server",
                    fix=f"# use the traced model's modules, or run a separate trace on {name}",
                ))
            continue
        if not _is_builtin_name(name, value):
            try:
                variables[name] = encoder.encode(value)
            except UnsupportedValueError as e:
                problems.append(Problem(
                    category="unserializable-variable", filename=block.filename, lineno=line,
                    message=f"`{name}` ({type(value).__name__}) cannot be sent to the server: {first_line(e)}",
                    fix=fix_for_error(name, e, value),
                ))
    code.where = (block.filename, block.first_lineno)
    try:
        args = [encoder.encode(a) for a in tracer.args]
        kwargs = {k: encoder.encode(v) for k, v in tracer.kwargs.items()}
    except UnsupportedValueError as e:
        args, kwargs = [], {}
        problems.append(Problem(
            category="unserializable-input", filename=block.filename, lineno=block.first_lineno,
            message=f"the trace's inputs cannot be sent: {first_line(e)}",
            fix="# pass text, token ids (lists or tensors) or a dict of tensors:\nwith model.trace(\"text\", remote=True):\n    ...",
        ))
    problems.extend(code.problems)
    problems.extend(check_source(block.source, block.filename, block.first_lineno, policy, shipped=list(variables) + list(model_refs)))
    request = TraceRequest(
        model_key=model_key,
        kind=tracer.kind,  # type: ignore[arg-type]
        args=args,
        kwargs=kwargs,
        block=BlockSpec(filename=block.filename, first_lineno=block.first_lineno, source=block.source, as_name=block.as_name),
        variables=variables,
        objects=code.objects,
        model_refs=model_refs,
        remote_objects=code.remote_names,
        strict_remote=strict_remote,
        source_modules=_source_modules(tracer, code.objects),
        rename=dict(getattr(tracer.model, "__dict__", {}).get("_rename") or {}),
    )
    return BuiltRequest(request, dict(encoder.tensors), unique(problems))


def _source_modules(tracer: "Tracer", objects: dict[str, Any]) -> list[str]:
    """Paths of the traced model's modules with a built `.source`, when the shipped code may
    use `.source` at all (building it on the server makes the hosted model wrap every module)."""
    root = tracer.model
    texts = [tracer.block.source] + [str(spec.get("source", "")) for spec in objects.values()]  # CodeEncoder.objects: dicts
    if root is None or not any("source" in text for text in texts):
        return []
    from ..tracing.source import source_paths

    return source_paths(root)


def encode_request(built: BuiltRequest, *, compress: bool = True) -> bytes:
    return encode_message("request", built.request.model_dump(mode="json"), built.tensors, compress=compress)


def decode_request(data: bytes, policy: Policy = DEFAULT_POLICY) -> tuple[TraceRequest, dict[str, Any]]:
    """Strictly decode request bytes; anything wrong raises WireFormatError."""
    message = decode_message(data, expected_kind="request", max_bytes=policy.max_upload_bytes,
                             max_decompressed_bytes=policy.max_upload_bytes * 4)
    try:
        request = TraceRequest.model_validate(message.body)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise WireFormatError(f"The request does not match format {PROTOCOL_VERSION}: {errors}. "
                              "Use the same Interlace version on client and server (`interlace env` shows both).") from None
    return request, dict(message.tensors)


def _is_builtin_name(name: str, value: Any) -> bool:
    import builtins

    return getattr(builtins, name, _SENTINEL) is value


_SENTINEL = object()


# -- which names a body needs from outside -----------------------------------------------------

_UNCONDITIONAL = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Import, ast.ImportFrom, ast.FunctionDef,
                  ast.AsyncFunctionDef, ast.ClassDef, ast.Expr, ast.Delete)


@functools.lru_cache(maxsize=1024)
def free_names(source: str) -> frozenset[str]:
    """Names the `with` body reads before (or without) assigning them itself.

    A name first assigned unconditionally at the top of the body is not needed from outside;
    one assigned only inside an `if`/`for`/`try` may still be read from outside.
    """
    tree = ast.parse(source)
    node = tree.body[0]
    body = node.body if isinstance(node, (ast.With, ast.AsyncWith)) else tree.body
    needed: set[str] = set()
    assigned: set[str] = set()
    _walk_block(body, needed, assigned)
    return frozenset(needed)


def _walk_block(body: list[ast.stmt], needed: set[str], assigned: set[str]) -> None:
    for stmt in body:
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                needed |= _loads(item.context_expr) - assigned
                if item.optional_vars is not None:
                    assigned |= _stores(item.optional_vars)
            _walk_block(stmt.body, needed, assigned)
            continue
        needed |= _loads(stmt) - assigned
        if isinstance(stmt, _UNCONDITIONAL):
            assigned |= _stores(stmt)


def _loads(node: ast.AST) -> set[str]:
    """Names read by `node`, not counting names local to nested functions and comprehensions."""
    names: set[str] = set()
    stack: list[ast.AST] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = n.args
            params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
            params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
            body = n.body if isinstance(n.body, list) else [n.body]
            local = set().union(*(_stores_deep(b) for b in body)) if body else set()
            inner = set().union(*(_loads(b) for b in body)) if body else set()
            names |= inner - params - local
            stack.extend(args.defaults + [d for d in args.kw_defaults if d is not None])
            stack.extend(getattr(n, "decorator_list", []))
            continue
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            targets = set().union(*(_stores_deep(g.target) for g in n.generators))
            parts: list[ast.AST] = [g.iter for g in n.generators[:1]]
            inner_nodes: list[ast.AST] = [g.iter for g in n.generators[1:]] + [c for g in n.generators for c in g.ifs]
            inner_nodes += [n.key, n.value] if isinstance(n, ast.DictComp) else [n.elt]
            names |= set().union(*(_loads(x) for x in inner_nodes)) - targets
            stack.extend(parts)
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Load, ast.Del)):
            names.add(n.id)
        stack.extend(ast.iter_child_nodes(n))
    return names


def _stores_deep(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | {
        n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def _stores(node: ast.AST) -> set[str]:
    names = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


@functools.lru_cache(maxsize=1024)
def _first_uses(source: str, first_lineno: int) -> dict[str, int]:
    uses: dict[str, int] = {}
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Name):
            line = first_lineno + n.lineno - 1
            if n.id not in uses or line < uses[n.id]:
                uses[n.id] = line
    return uses
