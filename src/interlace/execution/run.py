"""The one executor: runs a decoded request against a hosted model.

`remote='local'` calls exactly this function in-process, and the server's workers call it
for every job; that is what makes the simulation faithful. The body that runs is compiled
from the request's source text and reads only decoded values, never the caller's objects.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle

from ..contract.policy import Policy
from ..contract.request import TraceRequest
from ..contract.code.decode import CodeDecoder, decode_failure_text, resolve_model_path, restricted_builtins
from ..contract.code.origin import original_filename, remote_filename
from ..contract.values.decode import ValueDecoder
from ..tracing.capture import block_from_source
from ..tracing.namespace import body_namespace
from ..tracing.saving import pop_registry, push_registry
from ..tracing.source import source_envoy

__all__ = ["execute_request", "ExecutionFailed", "executing_remotely"]

class _State(threading.local):
    depth = 0


_state = _State()


def executing_remotely() -> bool:
    """True while a shipped body runs (nested traces then run locally, on the hosted model)."""
    return _state.depth > 0


class ExecutionFailed(Exception):
    """A job's body failed; `text` is a traceback in the user's own files and lines."""

    def __init__(self, text: str, category: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.category = category
        self.partial = partial or {}


def execute_request(
    request: TraceRequest,
    tensors: dict[str, Any],
    model: Any,
    *,
    policy: Policy,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the request's body beside `model`; returns the saved values."""
    # The client model's aliases (`rename=`) hold for this job only (a job holds its model alone).
    renamed = model.renamed(request.rename) if hasattr(model, "renamed") else contextlib.nullcontext()
    with renamed:
        return _execute(request, tensors, model, policy=policy, log=log)


def _execute(request: TraceRequest, tensors: dict[str, Any], model: Any, *, policy: Policy,
             log: Callable[[str], None]) -> dict[str, Any]:
    filename = remote_filename(request.block.filename)
    block = block_from_source(request.block.source, filename, request.block.first_lineno)
    builtins_dict = restricted_builtins(policy, log)
    objects = {key: spec.model_dump() for key, spec in request.objects.items()}
    decoder = ValueDecoder(tensors, extension=CodeDecoder(objects, policy, builtins_dict, model=model))
    # The engine's one namespace builder: the helpers capture's rewrites call are the same
    # here as in a local trace (only the builtins are the policy's).
    ns = body_namespace(builtins_dict=builtins_dict, name="__interlace_remote__")
    # Decoding rebuilds the user's values (and runs their class bodies and decorators): a
    # failure there is the job's error, shown to the user, never an internal server error.
    try:
        for name, node in request.variables.items():
            ns[name] = decoder.decode(node, path=name)
        for name, path in request.model_refs.items():
            ns[name] = resolve_model_path(model, path)
        for path in request.source_modules:  # `.source` the client built before the trace
            source_envoy(resolve_model_path(model, path))
        args = [decoder.decode(a, path="input") for a in request.args]
        kwargs = {k: decoder.decode(v, path=k) for k, v in request.kwargs.items()}
    except Exception as error:  # noqa: BLE001 - WireFormatError, or the user's code raising
        raise ExecutionFailed(decode_failure_text(error), "invalid-request") from None
    try:
        # The user's inputs and options meet the model here: a bad one (an unknown keyword,
        # a wrong input type) is the user's error, reported at the trace's line, never an
        # internal error of the server.
        if request.kind == "trace":
            tracer = model.trace(*args, **kwargs)
        elif request.kind == "generate":
            tracer = model.generate(*args, **kwargs)
        else:
            tracer = model.session()
    except Exception as error:  # noqa: BLE001 - reported to the user as the job's ERROR
        # (No frame of the user's runs there, so it is shown at the `with` line.)
        raise ExecutionFailed(user_traceback(error, request), type(error).__name__) from None
    tracer.block = block
    if block.as_name:
        ns[block.as_name] = tracer
    registry = push_registry()
    _state.depth += 1
    modules = list(model._module.modules())
    before = weight_fingerprint(modules)
    hooks = _hook_keys(modules)
    grad_mode = _grad_mode_for(request)
    grads = _clear_grads(modules) if grad_mode is _GRAD_ON else None
    edits = _keep_edits(model)
    try:
        with grad_mode:
            tracer.execute(ns)
    except BaseException as error:  # noqa: BLE001 - every failure becomes the job's ERROR
        raise ExecutionFailed(user_traceback(error, request), type(error).__name__, registry.select(ns, visibly_saved=block.saved_names)) from None
    finally:
        _state.depth -= 1
        pop_registry()
        _remove_new_hooks(modules, hooks)
        if grads is not None:
            _restore_grads(grads)
        _restore_edits(model, edits)
    changed = changed_weights(model._module, modules, before)
    if changed:
        raise ExecutionFailed(
            "ModelModifiedError: this job changed the hosted model's weights or buffers in place ("
            + ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
            + "). On a shared server the model is read-only between jobs: edit activations "
            "(`module.output[:] = ...`) or work on a copy (`w = model.lm_head.weight.clone()`).",
            "model-modified",
        )
    return registry.select(ns, visibly_saved=block.saved_names)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks")


# Set by transformers (5.x) on a model once it has installed its output-capturing hooks
# (`output_hidden_states=True` and the like), lazily, in the first forward that asks.
_HF_HOOKED_FLAG = "_output_capturing_hooks_installed"


def _hook_keys(modules: list[Any]) -> tuple[int, set[int]]:
    # Every torch hook handle (module or tensor) takes the next id of one class-wide counter,
    # so an unchanged counter proves no hook was added anywhere, at O(1) cost.
    return RemovableHandle.next_id, {id(m) for m in modules if m.__dict__.get(_HF_HOOKED_FLAG)}


def _remove_new_hooks(modules: list[Any], keys: tuple[int, set[int]]) -> None:
    """Hooks a job registered die with the job (the validator also refuses `register_*hook`)."""
    start_id, hooked = keys
    if RemovableHandle.next_id == start_id:
        return
    for m in modules:
        for d in _HOOK_DICTS:
            table = getattr(m, d, None)
            if table:
                for key in [k for k in table if isinstance(k, int) and k >= start_id]:
                    del table[key]
        # The model's own hooks installed during the job went too: let it install them again,
        # or later runs (the next job's, or the caller's own under the simulation) would get
        # `hidden_states=()`.
        if m.__dict__.get(_HF_HOOKED_FLAG) and id(m) not in hooked:
            del m.__dict__[_HF_HOOKED_FLAG]


def weight_fingerprint(modules: list[Any]) -> list[tuple[int, int]]:
    """Identity and in-place version of every parameter and buffer (reads no data; cheap)."""
    return [
        (id(t), t._version)
        for m in modules
        for table in (m._parameters, m._buffers)
        for t in table.values()
        if t is not None
    ]


def changed_weights(module: Any, modules: list[Any], before: list[tuple[int, int]]) -> list[str]:
    if weight_fingerprint(modules) == before:
        return []
    seen = set(before)
    return sorted(name for name, t in _named_state(module) if (id(t), t._version) not in seen)


def _named_state(module: Any) -> Any:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _clear_grads(modules: list[Any]) -> list[tuple[Any, Any]]:
    """Start a job that may run a backward pass without parameter gradients, keeping the
    ones there were: a job's `loss.backward()` must neither see an earlier job's gradients
    nor leave its own for the next job (on a server, another user's; under the simulation,
    the caller's own model, which a server run would leave untouched)."""
    kept = [(p, p.grad) for m in modules for p in m._parameters.values() if p is not None]
    for p, _ in kept:
        p.grad = None
    return kept


def _restore_grads(kept: list[tuple[Any, Any]]) -> None:
    for p, grad in kept:
        p.grad = grad


_GRAD_ON = contextlib.nullcontext()


def _keep_edits(model: Any) -> tuple[Any, list[Any]]:
    """The hosted model's default edits (`model.edit(inplace=True)` in a shipped session
    adds to them, `model.clear_edits()` empties them): a job's own must die with the job."""
    edits = model.__dict__.get("_default_edits")
    return edits, list(edits or ())


def _restore_edits(model: Any, kept: tuple[Any, list[Any]]) -> None:
    edits, items = kept
    if edits is not None:
        edits[:] = items
    model.__dict__["_default_edits"] = edits if edits is not None else []


def _grad_mode_for(request: TraceRequest) -> Any:
    """No autograd graph for jobs that cannot use one.

    Only saved values leave a job, as fresh tensors, so a graph is needed only when the code
    itself asks for gradients; building it roughly doubles a small model's forward time. Any
    mention of `grad` or `backward` in the shipped source keeps grad mode on.
    """
    texts = [request.block.source] + [spec.source for spec in request.objects.values()]
    if any("grad" in text or "backward" in text for text in texts):
        return _GRAD_ON
    return torch.no_grad()


def user_traceback(error: BaseException, request: TraceRequest | None = None) -> str:
    """The traceback with only the user's frames, in their own file names and lines.

    An error raised by the model itself (say, a keyword argument the model does not take) has
    no user frame; it is then shown at the trace's `with` line, as a local run shows it."""
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(error.__traceback__):
        if not frame.filename.startswith("<interlace-remote:"):
            continue
        lines.append(f'  File "{original_filename(frame.filename)}", line {frame.lineno}, in {_where(frame.name)}\n')
        if frame.line:
            lines.append(f"    {frame.line.strip()}\n")
    if len(lines) == 1 and request is not None:
        lines.extend(_with_line(request))
    lines.extend(traceback.format_exception_only(type(error), error))
    return "".join(lines).rstrip("\n")


def _with_line(request: TraceRequest) -> list[str]:
    block = request.block
    first = block.source.splitlines()[0].strip() if block.source else ""
    lines = [f'  File "{block.filename}", line {block.first_lineno}, in <with block>\n']
    if first:
        lines.append(f"    {first}\n")
    return lines


def _where(name: str) -> str:
    return "<with block>" if name == "<module>" else name
