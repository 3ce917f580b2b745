"""The outbound step both remote modes share: a captured trace becomes checked request bytes.

`build_request` encodes what the body needs (it reads the caller's names through the captured
trace's lookup, so it belongs to the client); `encode_for_remote` adds the checks only the
client can make and then the server's own (`contract.validate`), so a request the server would
refuse is refused here first, with every problem at the user's line.
"""

from __future__ import annotations

import ast
import builtins
import warnings
from typing import Any, Final

from ..contract.code.encode import CodeEncoder
from ..contract.codecheck import check_source
from ..contract.errors import UnsupportedValueError
from ..contract.fixes import fix_for_error
from ..contract.local_block import LocalBlockSpec
from ..contract.policy import DEFAULT_POLICY, Policy
from ..contract.problems import Problem, RemoteValidationError, first_line, unique
from ..contract.request import BlockSpec, BuiltRequest, TraceRequest, encode_request
from ..contract.validate import validate_request
from ..contract.values.encode import ValueEncoder
from ..tracing.backend import CapturedTrace
from ..tracing.envoy import Envoy
from ..tracing.namespace import MISSING
from ..tracing.outer_names import first_uses, free_names
from ..tracing.source import source_paths
from .client import fetch_policy
from ..tracing.syntax import parse

#: Why a model without a key cannot run on a server, and what to use instead.
MSG_NO_MODEL_KEY: Final = (
    "has no model key, so a server cannot know which model to run. "
    "Use `interlace.LanguageModel(\"hub/id-or-path\")` for hosted models, or "
    "`remote='local'` to simulate with a plain NNsight model."
)

__all__ = ["MSG_NO_MODEL_KEY", "MSG_LOCAL_NAME", "build_request", "encode_for_remote", "model_key_of", "policy_for_simulation", "warn_if_large", "warn_outer_mutations"]


def encode_for_remote(trace: CapturedTrace, model_key: str, policy: Policy, *, strict_remote: bool) -> tuple[bytes, BuiltRequest]:
    """Serialize the trace and check it against `policy`; raises RemoteValidationError with
    every problem (those only the client can see, then the server's own checks)."""
    built = build_request(trace, model_key, policy, strict_remote=strict_remote)
    payload = encode_request(built)
    problems = list(built.problems)
    if trace.model is not None and trace.model.__dict__.get("_default_edits"):
        # Edits live with the local model object; the server's model has none. Refuse rather
        # than let the simulation apply edits that a server run would silently lack.
        block = built.request.block
        problems.append(Problem(
            category="invalid-request", filename=block.filename, lineno=block.first_lineno,
            message="this model has default edits (model.edit()), which are not sent to servers yet",
            fix="# put the edit in the trace body instead:\nwith model.trace(x, remote=True):\n    model.layer.output[:] = 0\n    ...",
        ))
    # The server's checks repeat some of the client's (with the block's first line where the
    # client knew the exact line); keep the more precise one.
    seen = {(p.category, p.message) for p in problems}
    for problem in validate_request(built.request, policy, payload_size=len(payload)):
        if (problem.category, problem.message) not in seen:
            seen.add((problem.category, problem.message))
            problems.append(problem)
    if problems:
        raise RemoteValidationError(problems)
    warn_outer_mutations(built)
    return payload, built


def build_request(trace: CapturedTrace, model_key: str, policy: Policy = DEFAULT_POLICY, *, strict_remote: bool = False) -> BuiltRequest:
    """Encode what the captured body needs. Problems are collected, not raised."""
    block = trace.block
    code = CodeEncoder(policy, strict_remote=strict_remote, model=trace.model)
    encoder = ValueEncoder(extension=code)
    problems: list[Problem] = []
    lookup = trace.lookup
    # What travels is the shipped source: local blocks' code stays here, so the names only
    # they use are neither sent nor checked (`tracing/local_block.py`).
    source = block.shipped_source
    first_use = first_uses(source, block.first_lineno)
    variables: dict[str, Any] = {}
    model_refs: dict[str, str] = {}
    root = trace.model
    for name in sorted(free_names(source) - ({block.as_name} if block.as_name else set())):
        value = lookup(name)
        if value is MISSING:
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
        args = [encoder.encode(a) for a in trace.args]
        kwargs = {k: encoder.encode(v) for k, v in trace.kwargs.items()}
    except UnsupportedValueError as e:
        args, kwargs = [], {}
        problems.append(Problem(
            category="unserializable-input", filename=block.filename, lineno=block.first_lineno,
            message=f"the trace's inputs cannot be sent: {first_line(e)}",
            fix="# pass text, token ids (lists or tensors) or a dict of tensors:\nwith model.trace(\"text\", remote=True):\n    ...",
        ))
    problems.extend(code.problems)
    problems.extend(check_source(source, block.filename, block.first_lineno, policy, shipped=list(variables) + list(model_refs)))
    local_blocks = _local_block_specs(block, problems)
    request = TraceRequest(
        model_key=model_key,
        kind=trace.kind,  # type: ignore[arg-type]
        args=args,
        kwargs=kwargs,
        block=BlockSpec(filename=block.filename, first_lineno=block.first_lineno, source=source, as_name=block.as_name),
        variables=variables,
        objects=code.objects,
        model_refs=model_refs,
        remote_objects=code.remote_names,
        strict_remote=strict_remote,
        source_modules=_source_modules(trace, code.objects),
        rename=dict(getattr(trace.model, "__dict__", {}).get("_rename") or {}),
        local_blocks=local_blocks,
    )
    return BuiltRequest(request, dict(encoder.tensors), unique(problems))


#: A name a local block exchanges with the server must be a plain one (the wire's rule).
MSG_LOCAL_NAME: Final = (
    "`{name}` goes {way} the local block at line {line}, but only plain ASCII names that start with a "
    "letter travel between the server and a local block"
)


def _local_block_specs(block: Any, problems: list[Problem]) -> list[LocalBlockSpec]:
    """The request's `local_blocks`: each block's line and the names it exchanges."""
    specs = []
    for code in block.local_blocks:
        bad = [(n, "into") for n in code.reads if not _plain(n)] + [(n, "out of") for n in code.writes if not _plain(n)]
        for name, way in bad:
            problems.append(Problem(
                category="invalid-request", filename=block.filename, lineno=code.line,
                message=MSG_LOCAL_NAME.format(name=name, way=way, line=code.line),
                fix=f"# rename `{name}` in the body and in the block, e.g.\n{_renamed(name)} = ...",
            ))
        specs.append(LocalBlockSpec(line=code.line, reads=tuple(filter(_plain, code.reads)),
                                    writes=tuple(filter(_plain, code.writes))))
    return specs


def _renamed(name: str) -> str:
    stripped = name.lstrip("_")
    return stripped if _plain(stripped) else "value"


def _plain(name: str) -> bool:
    """The names `LocalBlockSpec` takes: ASCII, starting with a letter, at most 201 characters."""
    return name.isascii() and name[:1].isalpha() and len(name) <= 201


def _source_modules(trace: CapturedTrace, objects: dict[str, Any]) -> list[str]:
    """Paths of the traced model's modules with a built `.source`, when the shipped code may
    use `.source` at all (building it on the server makes the hosted model wrap every module)."""
    root = trace.model
    texts = [trace.block.shipped_source] + [str(spec.get("source", "")) for spec in objects.values()]  # CodeEncoder.objects: dicts
    if root is None or not any("source" in text for text in texts):
        return []
    return source_paths(root)




def _is_builtin_name(name: str, value: Any) -> bool:
    return getattr(builtins, name, _SENTINEL) is value


_SENTINEL = object()


_MUTATORS = frozenset({"append", "extend", "insert", "update", "add", "setdefault"})


def warn_outer_mutations(built: BuiltRequest) -> None:
    """Warn where a remote body changes a container made before the block (`results[k] = ...`,
    `found.append(...)`): the job changes the server's copy, so the caller's stays as it was
    (nnsight's behaviour too, but silent there)."""
    block = built.request.block
    outer = set(built.request.variables)
    try:
        tree = parse(block.source)
    except SyntaxError:
        return
    defined = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    defined |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs + n.posonlyargs}
    outer -= defined
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name):
            name, how, store = node.value.id, f"`{node.value.id}[...] = ...`", f"{node.value.id}[key] = value"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS
              and isinstance(node.func.value, ast.Name)):
            name, how = node.func.value.id, f"`{node.func.value.id}.{node.func.attr}(...)`"
            store = f"{name}.{node.func.attr}(value)"
        if name is None or name not in outer:
            continue
        warnings.warn_explicit(
            f"{how} changes `{name}`, which was made before this remote block: the job changes the "
            f"server's copy, so your `{name}` stays as it was. Save the value under a name and store "
            f"it after the block, or make the container inside the block:\n\n"
            f"    with model.trace(x, remote=True):\n"
            f"        value = model.lm_head.output.save()\n"
            f"    {store}\n\n"
            f"    with model.trace(x, remote=True):\n"
            f"        {name} = interlace.save([])\n"
            f"        {name}.append(model.lm_head.output)",
            UserWarning, block.filename, block.first_lineno - 1 + node.lineno,
        )


def warn_if_large(payload: bytes, max_upload_mb: float) -> None:
    """`max_upload_mb=`: warn (in both remote modes alike) when the request is larger.

    The server's own limit is its policy's, checked by the validator; this is the user's
    early warning about a slow upload."""
    if max_upload_mb and len(payload) > max_upload_mb * 1024 * 1024:
        warnings.warn(
            f"The request is {len(payload) / 1024 / 1024:.1f} MB, over max_upload_mb="
            f"{max_upload_mb:g} MB. Sending it to a server will be slow; compute large "
            "values inside the trace instead of passing them in (max_upload_mb=0 silences this).",
            UserWarning,
            stacklevel=5,
        )


def model_key_of(model: Any, *, simulation: bool = False) -> str:
    key = getattr(model, "model_key", None)
    if isinstance(key, str) and key:
        return key
    if simulation:
        return f"local:{type(model._module).__name__}"
    raise ValueError(f"{type(model).__name__} {MSG_NO_MODEL_KEY}")


_validated: tuple[Any, Policy] = (None, DEFAULT_POLICY)


def policy_for_simulation() -> Policy:
    """The configured server's policy if it answers quickly, else the default policy.

    Asked through the HTTP client's one policy fetch (`client.fetch_policy`: its TLS context
    and headers, remembered per host and key), so the simulation checks what that server checks."""
    global _validated
    found = fetch_policy()
    if found is None:
        return DEFAULT_POLICY
    if _validated[0] is not found:  # validate each fetched answer once
        _validated = (found, Policy.model_validate(found))
    return _validated[1]
