"""Job isolation: what a job may not leave behind on the hosted model.

A job runs beside a model that the next job (on a server, another user's; under the
simulation, the caller's own model) runs beside too. Everything a job could change is put
back here, whether the job ends well or not: hooks it registered (and the marks transformers
sets when it installs its own), parameter gradients, default edits, and, when it changed
weights in place, the weights themselves (`snapshot` / `restore`).
"""

from __future__ import annotations

from typing import Any

from torch.utils.hooks import RemovableHandle

from .hosted import HostedModel

__all__ = [
    "changed_weights", "clear_grads", "hook_keys", "keep_edits", "remove_new_hooks", "restore", "restore_edits",
    "restore_grads", "snapshot", "weight_fingerprint",
]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks")


# Set by transformers (5.x) on a model once it has installed its output-capturing hooks
# (`output_hidden_states=True` and the like), lazily, in the first forward that asks.
_HF_HOOKED_FLAG = "_output_capturing_hooks_installed"


def hook_keys(modules: list[Any]) -> tuple[int, set[int]]:
    # Every torch hook handle (module or tensor) takes the next id of one class-wide counter,
    # so an unchanged counter proves no hook was added anywhere, at O(1) cost.
    return RemovableHandle.next_id, {id(m) for m in modules if m.__dict__.get(_HF_HOOKED_FLAG)}


def remove_new_hooks(modules: list[Any], keys: tuple[int, set[int]]) -> None:
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


def clear_grads(modules: list[Any]) -> list[tuple[Any, Any]]:
    """Start a job that may run a backward pass without parameter gradients, keeping the
    ones there were: a job's `loss.backward()` must neither see an earlier job's gradients
    nor leave its own for the next job (on a server, another user's; under the simulation,
    the caller's own model, which a server run would leave untouched)."""
    kept = [(p, p.grad) for m in modules for p in m._parameters.values() if p is not None]
    for p, _ in kept:
        p.grad = None
    return kept


def restore_grads(kept: list[tuple[Any, Any]]) -> None:
    for p, grad in kept:
        p.grad = grad


def keep_edits(model: HostedModel) -> tuple[Any, list[Any]]:
    """The hosted model's default edits (`model.edit(inplace=True)` in a shipped session
    adds to them, `model.clear_edits()` empties them): a job's own must die with the job."""
    edits = model.__dict__.get("_default_edits")
    return edits, list(edits or ())


def restore_edits(model: HostedModel, kept: tuple[Any, list[Any]]) -> None:
    edits, items = kept
    if edits is not None:
        edits[:] = items
    model.__dict__["_default_edits"] = edits if edits is not None else []


def snapshot(model: HostedModel) -> dict[str, Any]:
    """A CPU copy of every parameter and buffer, with the original tensor objects."""
    module = model._module
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return {name: (tensor, tensor.detach().to("cpu", copy=True)) for name, tensor in state.items()}


def restore(model: HostedModel, pristine: dict[str, Any]) -> None:
    """Put back the original tensor objects and their values."""
    import torch

    module = model._module
    with torch.no_grad():
        for name, (original, copy) in pristine.items():
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if attr in owner._parameters:
                owner._parameters[attr] = original
            elif attr in owner._buffers:
                owner._buffers[attr] = original
            original.copy_(copy.to(original.device))
