"""Job isolation: what a job's own run leaves on the hosted model by design, put back.

A job runs beside a model that the next job (on a server, another user's; under the
simulation, the caller's own model) runs beside too. A backward pass leaves parameter
gradients and `model.edit(inplace=True)` adds default edits: both are kept before the job and
put back after it here, whether the job ends well or not. Everything else a job could change
(weights, buffers, hooks, module attributes, the module tree, process-wide state) is the
integrity check's (`integrity.py`, `process_state.py`): compared with a baseline, restored,
or reported so the worker is replaced.
"""

from __future__ import annotations

from typing import Any

from .hosted import HostedModel

__all__ = ["clear_grads", "keep_edits", "restore_edits", "restore_grads"]


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
