"""`.save()`: marking which values leave a trace.

Only saved values are bound in the caller's scope after the outermost trace (or session)
ends, in every mode, so forgetting `.save()` fails the same way locally and remotely.
Saves are kept by identity in the registry of the outermost running trace, holding a
reference so an id cannot be reused by another object while the trace runs.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import torch

__all__ = ["save", "SaveRegistry", "active_registry", "push_registry", "pop_registry", "swap_registries"]

T = TypeVar("T")


class SaveRegistry:
    __slots__ = ("saved",)

    def __init__(self) -> None:
        self.saved: dict[int, Any] = {}

    def add(self, value: Any) -> None:
        self.saved[id(value)] = value

    def __contains__(self, value: Any) -> bool:
        return id(value) in self.saved and self.saved[id(value)] is value

    def select(self, namespace: dict[str, Any], names: Any = None, visibly_saved: frozenset[str] | None = None) -> dict[str, Any]:
        """The saved values among `namespace`'s variables (only `names` among them, if given:
        the names a body assigns, as a body binds nothing else in the caller).

        Values of shared immutable types (small ints, None, bools, interned strings) are the
        same object under unrelated names, so for them only `visibly_saved` names count
        (see `capture._statically_saved`).
        """
        saved = self.saved
        out = {}
        if names is None:
            names = namespace
        missing = _NOTHING
        for name in names:
            value = namespace.get(name, missing)
            if id(value) in saved and saved[id(value)] is value and not name.startswith("__interlace"):
                if visibly_saved is not None and type(value) in _SHARED_TYPES and name not in visibly_saved:
                    continue
                out[name] = value
        return out


_NOTHING = object()
_SHARED_TYPES = (int, bool, float, str, bytes, type(None))

class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.stack: list[SaveRegistry] = []  # registries of the traces running on this thread


_local = _ThreadState()


def active_registry() -> SaveRegistry | None:
    stack = _local.stack
    return stack[0] if stack else None


def push_registry() -> SaveRegistry:
    """Enter a trace; returns the registry of the outermost one (a new one if this is it)."""
    stack = _local.stack
    registry = stack[0] if stack else SaveRegistry()
    stack.append(registry)
    return registry


def pop_registry() -> None:
    _local.stack.pop()


def swap_registries(stack: list[SaveRegistry]) -> list[SaveRegistry]:
    """Make `stack` this thread's registries; returns the previous ones. A shared forward
    (`shared.py`) gives each job's body its own while that body runs."""
    previous, _local.stack = _local.stack, stack
    return previous


def save(value: T) -> T:
    """Mark `value` to be returned from the trace; returns `value` unchanged.

    Works for any object (`interlace.save(my_list)`); tensors also have `tensor.save()`, and
    inside a traced block `anything.save()` is rewritten to this call. A value that is edited
    in place after saving changes too; save a copy (`h.clone().save()`) to keep a snapshot.
    Outside a trace it does nothing.
    """
    registry = active_registry()
    if registry is not None:
        registry.add(value)
    return value


def save_in_body(value: T) -> T:
    """What `x.save()` in a traced body calls: the object's own `save()` wins if it has one
    (not one another library put on every object: nnsight mounts `save` on `object`)."""
    own = getattr(type(value), "save", None)
    if own is not None and own is not _tensor_save and own is not getattr(object, "save", None):
        return value.save()
    stack = _local.stack  # `save(value)` written out: this runs for every saved value
    if stack:
        stack[0].saved[id(value)] = value
    return value


def _tensor_save(self: torch.Tensor) -> torch.Tensor:
    """Mark this tensor to be returned from the enclosing trace (see `interlace.save`).

    Outside Interlace's traces, a `save` that another library put on every object (nnsight
    mounts one on `object`) is called instead, so that library's own traces keep working
    with Interlace imported."""
    stack = _local.stack
    if stack:
        stack[0].saved[id(self)] = self
        return self
    foreign = getattr(object, "save", None)
    if foreign is not None:
        return foreign(self)
    return self


def mount_tensor_save() -> None:
    """Give tensors a `.save()` method so helpers called from a trace can save too.

    Only added when torch's own classes do not define one (a `save` that another library
    put on `object` does not count: tensors get ours, which defers to it outside our
    traces); nothing else in torch is touched.
    """
    if not any("save" in vars(c) for c in torch.Tensor.__mro__ if c is not object):
        torch.Tensor.save = _tensor_save  # type: ignore[attr-defined]


mount_tensor_save()
