"""Giving each invoke its own rows of a batched value, and putting its edits back.

A batch group is `(start, size)` within a batch of `total` rows, or None for "the whole
batch" (empty invokes, or a single input). Tensors whose first dimension is not the batch
size (position ids, caches, scalars) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BatchGroup", "map_tensors", "narrow", "splice", "whole"]

BatchGroup = tuple[int, int] | None


def whole(group: BatchGroup, total: int) -> bool:
    return group is None or (group[0] == 0 and group[1] == total)


def narrow(value: Any, group: BatchGroup, total: int) -> Any:
    """This invoke's view of `value`: a `narrow` view, so in-place edits reach the model."""
    if whole(group, total):
        return value
    start, size = group  # type: ignore[misc]
    return map_tensors(value, lambda t: t.narrow(0, start, size) if t.dim() and t.shape[0] == total else t)


def splice(original: Any, replacement: Any, group: BatchGroup, total: int) -> Any:
    """`original` with this invoke's rows replaced by `replacement` (new tensors, autograd-safe)."""
    if whole(group, total):
        return replacement
    start, size = group  # type: ignore[misc]

    def one(orig: Any, new: Any) -> Any:
        if isinstance(orig, torch.Tensor) and orig.dim() and orig.shape[0] == total:
            new_t = torch.as_tensor(new, dtype=orig.dtype, device=orig.device)
            if new_t.dim() == orig.dim() and new_t.shape[0] == size:
                return torch.cat([orig[:start], new_t, orig[start + size :]], dim=0)
            return torch.cat([orig[:start], new_t.expand_as(orig[start : start + size]), orig[start + size :]], dim=0)
        if isinstance(orig, (tuple, list)) and isinstance(new, (tuple, list)) and len(orig) == len(new):
            out = [one(o, n) for o, n in zip(orig, new)]
            return type(orig)(out) if not hasattr(orig, "_fields") else type(orig)(*out)
        if isinstance(orig, dict) and isinstance(new, dict):
            merged = dict(orig)
            for key, val in new.items():
                merged[key] = one(orig[key], val) if key in orig else val
            return merged
        return new

    return one(original, replacement)


def map_tensors(value: Any, fn: Any) -> Any:
    """`value` with `fn` applied to every tensor in it (through tuples, named tuples, lists
    and dicts, keeping their types)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        mapped = {k: map_tensors(v, fn) for k, v in value.items()}
        if type(value) is dict:
            return mapped
        try:  # ModelOutput and other dict subclasses
            return type(value)(**mapped)
        except Exception:
            return mapped
    return value
