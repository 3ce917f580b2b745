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

from ..remote.policy import Policy
from ..remote.request import TraceRequest
from ..remote.source import CodeDecoder, original_filename, remote_filename, restricted_builtins
from ..remote.values import ValueDecoder
from ..tracing.capture import SAVE_HELPER, block_from_source
from ..tracing.frames import NAMESPACE_MARKER
from ..tracing.saving import pop_registry, push_registry, save_in_body

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
    filename = remote_filename(request.block.filename)
    block = block_from_source(request.block.source, filename, request.block.first_lineno)
    builtins_dict = restricted_builtins(policy, log)
    objects = {key: spec.model_dump() for key, spec in request.objects.items()}
    decoder = ValueDecoder(tensors, extension=CodeDecoder(objects, policy, builtins_dict))
    ns: dict[str, Any] = {"__builtins__": builtins_dict, "__name__": "__interlace_remote__", NAMESPACE_MARKER: True, SAVE_HELPER: save_in_body}
    for name, node in request.variables.items():
        ns[name] = decoder.decode(node, path=name)
    for name, path in request.model_refs.items():
        ns[name] = model if path == "model" else model.get(path[len("model.") :])
    args = [decoder.decode(a, path="input") for a in request.args]
    kwargs = {k: decoder.decode(v, path=k) for k, v in request.kwargs.items()}
    if request.kind == "trace":
        tracer = model.trace(*args, **kwargs)
    elif request.kind == "generate":
        tracer = model.generate(*args, **kwargs)
    else:
        tracer = model.session()
    tracer.block = block
    if block.as_name:
        ns[block.as_name] = tracer
    registry = push_registry()
    _state.depth += 1
    modules = list(model._module.modules())
    before = weight_fingerprint(modules)
    hooks = _hook_keys(modules)
    try:
        with _grad_mode_for(request):
            tracer.execute(ns)
    except BaseException as error:  # noqa: BLE001 - every failure becomes the job's ERROR
        raise ExecutionFailed(user_traceback(error), type(error).__name__, registry.select(ns, visibly_saved=block.saved_names)) from None
    finally:
        _state.depth -= 1
        pop_registry()
        _remove_new_hooks(modules, hooks)
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


def _hook_keys(modules: list[Any]) -> int:
    # Every torch hook handle (module or tensor) takes the next id of one class-wide counter,
    # so an unchanged counter proves no hook was added anywhere, at O(1) cost.
    return RemovableHandle.next_id


def _remove_new_hooks(modules: list[Any], start_id: int) -> None:
    """Hooks a job registered die with the job (the validator also refuses `register_*hook`)."""
    if RemovableHandle.next_id == start_id:
        return
    for m in modules:
        for d in _HOOK_DICTS:
            table = getattr(m, d, None)
            if table:
                for key in [k for k in table if isinstance(k, int) and k >= start_id]:
                    del table[key]


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


def _grad_mode_for(request: TraceRequest) -> Any:
    """No autograd graph for jobs that cannot use one.

    Only saved values leave a job, as fresh tensors, so a graph is needed only when the code
    itself asks for gradients; building it roughly doubles a small model's forward time. Any
    mention of `grad` or `backward` in the shipped source keeps grad mode on.
    """
    texts = [request.block.source] + [spec.source for spec in request.objects.values()]
    if any("grad" in text or "backward" in text for text in texts):
        return contextlib.nullcontext()
    return torch.no_grad()


def user_traceback(error: BaseException) -> str:
    """The traceback with only the user's frames, in their own file names and lines."""
    lines = ["Traceback (most recent call last):\n"]
    for frame in traceback.extract_tb(error.__traceback__):
        if not frame.filename.startswith("<interlace-remote:"):
            continue
        lines.append(f'  File "{original_filename(frame.filename)}", line {frame.lineno}, in {_where(frame.name)}\n')
        if frame.line:
            lines.append(f"    {frame.line.strip()}\n")
    lines.extend(traceback.format_exception_only(type(error), error))
    return "".join(lines).rstrip("\n")


def _where(name: str) -> str:
    return "<with block>" if name == "<module>" else name
