"""What `remote='local'` and `remote=True` share on the client side."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ..contract.policy import DEFAULT_POLICY, Policy
from ..contract.problems import RemoteValidationError
from ..contract.request import BuiltRequest, build_request, encode_request
from ..contract.validate import validate_request

if TYPE_CHECKING:
    from ..tracing.tracer import Tracer

__all__ = ["encode_for_remote", "model_key_of", "policy_for_simulation", "warn_if_large"]


def encode_for_remote(tracer: "Tracer", model_key: str, policy: Policy, *, strict_remote: bool) -> tuple[bytes, BuiltRequest]:
    """Serialize the trace and check it against `policy`; raises RemoteValidationError with
    every problem (those only the client can see, then the server's own checks)."""
    built = build_request(tracer, model_key, policy, strict_remote=strict_remote)
    payload = encode_request(built)
    problems = list(built.problems)
    if tracer.model is not None and tracer.model.__dict__.get("_default_edits"):
        # Edits live with the local model object; the server's model has none. Refuse rather
        # than let the simulation apply edits that a server run would silently lack.
        from ..contract.problems import Problem

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


_MUTATORS = frozenset({"append", "extend", "insert", "update", "add", "setdefault"})


def warn_outer_mutations(built: BuiltRequest) -> None:
    """Warn where a remote body changes a container made before the block (`results[k] = ...`,
    `found.append(...)`): the job changes the server's copy, so the caller's stays as it was
    (nnsight's behaviour too, but silent there)."""
    import ast

    block = built.request.block
    outer = set(built.request.variables)
    try:
        tree = ast.parse(block.source)
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
    raise ValueError(
        f"{type(model).__name__} has no model key, so a server cannot know which model to run. "
        "Use `interlace.LanguageModel(\"hub/id-or-path\")` for hosted models, or "
        "`remote='local'` to simulate with a plain NNsight model."
    )


_policy_cache: dict[str, Policy] = {}


def policy_for_simulation() -> Policy:
    """The configured server's policy if it answers quickly, else the default policy."""
    from ..config import CONFIG

    host = CONFIG.API.HOST
    if host in _policy_cache:
        return _policy_cache[host]
    policy = DEFAULT_POLICY
    try:
        import httpx

        response = httpx.get(host.rstrip("/") + "/v1/policy", timeout=0.5)
        if response.status_code == 200:
            policy = Policy.model_validate(response.json())
    except Exception:  # no server configured or reachable: the default policy applies
        policy = DEFAULT_POLICY
    _policy_cache[host] = policy
    return policy
