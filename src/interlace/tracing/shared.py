"""Several strangers' bodies beside one batched forward, each alone in its own rows.

`run_shared(model, bodies)` runs one forward of the bodies' inputs stacked as a batch, with
each body on its own greenlet as an invoke would be. Unlike invokes (one user's bodies, which
may see and edit each other's rows through views and barriers), a shared body must not be
able to tell it has neighbours. The server's co-batching (`execution/cobatch.py`) uses this.

Design note: what keeps a body alone
------------------------------------
- **Private copies, not views.** A body is served a copy of its own rows of every value (a
  tensor whose first dimension is the batch: its rows, cloned; any other tensor: cloned; an
  object such as a KV cache: a shallow copy with its tensors copied the same way). A view
  would do for reading, but its storage holds the neighbours' rows (`as_strided`,
  `untyped_storage`, `storage_offset` reach them), so none is ever handed out.
- **Edits written back to its rows only.** When the body gives control back (it waits for a
  later value, ends or stops), the copies it changed in place (a tensor's version counter
  moved) are copied into its rows of the batch; an assignment (`.output = x`, `.input = x`)
  is spliced into its rows. What cannot be made exact that way (changing a tensor that is
  not per row, a value of another shape or type, an object's inside) makes the body `solo`:
  it is dropped from this forward and its job runs again alone.
- **Its own saves, clock and warnings.** While its greenlet runs, the thread's save
  registries are the body's own (`saving.swap_registries`) and its `enter` / `leave`
  callbacks run (the job's deadline and warnings, `execution/cobatch.py`): a greenlet trace
  sees every switch, so no path into a body is missed.
- **Its own failure.** An exception in a body, `tracer.stop()`, or a module it waits for
  that never runs ends that body only; the forward goes on for the others. Operations that
  act on the whole batch (`.skip`, barriers, a module called with `hook=True`) make it solo.
  Only an exception of the forward itself (or of the model's own edits) ends the whole run:
  `run_shared` then raises it, and the caller runs every job alone.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Callable

import greenlet
import torch

from .interleaver import BARRIER, CALL, ERROR, STOP, Interleaver, Mediator
from .mediator import DONE, NOTHING, WAIT
from .saving import SaveRegistry, swap_registries

__all__ = ["SharedBody", "run_shared"]

SOLO_SKIP = "`.skip(...)` in a shared forward"
SOLO_BARRIER = "a barrier in a shared forward"
SOLO_CALL = "a module called with `hook=True` in a shared forward"
SOLO_EDIT = "an edit that is not the job's own rows (a value shared by the batch, or of another shape or type)"
SOLO_COPY = "a value that cannot be copied for one job"


class SharedBody:
    """One job's body in a shared forward, and how it ended.

    `tracer` is the job's own `InterleavingTracer` (its `block` set), `ns` the namespace its
    body runs in, `prepared` its input as `model._prepare_input` returned it. `enter` /
    `leave` run each time the body's greenlet starts or stops running. After the run: `error`
    (the body raised), `stopped` (`tracer.stop()`), `solo` (why it must run again alone) and
    `registry` (its saves)."""

    def __init__(self, tracer: Any, ns: dict[str, Any], prepared: Any, *,
                 enter: Callable[[], None] | None = None, leave: Callable[[], None] | None = None) -> None:
        self.tracer = tracer
        self.ns = ns
        self.prepared = prepared
        self.enter = enter
        self.leave = leave
        self.registry = SaveRegistry()
        self.error: BaseException | None = None
        self.stopped = False
        self.solo: str | None = None
        self._stack = [self.registry]
        self._outer: list[SaveRegistry] | None = None

    @property
    def rows(self) -> int:
        return int(self.prepared[2])

    def _entered(self) -> None:
        self._outer = swap_registries(self._stack)
        if self.enter is not None:
            self.enter()

    def _left(self) -> None:
        if self.leave is not None:
            self.leave()
        outer, self._outer = self._outer, None
        swap_registries(outer if outer is not None else [])


def run_shared(model: Any, bodies: list[SharedBody]) -> None:
    """Run `bodies` beside one forward of their stacked inputs (see the module's design note).

    The caller gives bodies whose inputs batch without padding and under the same options.
    Raises only what the forward itself raised; each body's own outcome is on the body."""
    model._before_run()
    args, kwargs, batch_size = model._batch([b.prepared for b in bodies])
    mediators: list[Mediator] = list(model._edit_mediators({}))  # the model's default edits (whole batch)
    start = 0
    for body in bodies:
        mediator = SharedMediator(body.tracer.block.code, body.ns, (start, body.rows), len(mediators),
                                  label="trace body")
        mediator.body = body
        mediators.append(mediator)
        start += body.rows
    il = model._new_interleaver(mediators, batch_size, 1, kind=SharedInterleaver)
    for body in bodies:
        body.tracer._interleaver = il
    model._begin_run(il)
    switches = _Switches()
    previous_trace = greenlet.settrace(switches)
    try:
        il.start()
        body_output = model._call_model("trace", args, kwargs, il)
        il.finish()
        del body_output
    finally:
        greenlet.settrace(previous_trace)
        switches.leave_current()
        model._end_run(il)
        il.close()
        for body in bodies:
            body.tracer._interleaver = None


class _Switches:
    """The greenlet trace of a shared run: which body runs now (see the design note)."""

    def __init__(self) -> None:
        self.current: SharedBody | None = None

    def __call__(self, event: str, args: Any) -> None:
        if event != "switch" and event != "throw":
            return
        mediator = getattr(args[1], "mediator", None)
        body = getattr(mediator, "body", None)
        if body is not self.current:
            self.leave_current()
            if body is not None:
                self.current = body
                body._entered()

    def leave_current(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current._left()


class SharedMediator(Mediator):
    """A body of a shared run: its rows come as private copies (`SharedInterleaver`)."""

    body: SharedBody
    # Per value being served: (copy, original, version when copied, is a row block) for every
    # tensor in the copy, and id(copy) -> original for every leaf and object copied.
    records: list[tuple[torch.Tensor, torch.Tensor, int, bool]] | None = None
    originals: dict[int, Any] | None = None

    def swap(self, kind: int, idx: int, value: Any, it: int | None = None) -> None:
        self.request(kind, idx, it)
        slot = self.current
        il = self.interleaver
        assert slot is not None and il is not None
        start, size = self.group  # type: ignore[misc]
        _write_back(self, slot)  # in-place edits made before the assignment count too
        if self.body.solo is not None:
            self._go_solo(self.body.solo)
        try:
            slot.value = _splice_rows(slot.value, value, start, size, il.batch_size, self.originals or {})
        except _Inexact:
            self._go_solo(SOLO_EDIT)
        if not _serve_private(self, slot, il.batch_size):
            self._go_solo(SOLO_COPY)

    def skip(self, idx: int, value: Any, it: int | None = None) -> None:
        self._go_solo(SOLO_SKIP)

    def wait_barrier(self, barrier: Any) -> None:
        self._go_solo(SOLO_BARRIER)

    def _go_solo(self, reason: str) -> None:
        """Leave this forward for good: the job runs again alone (its greenlet is unwound
        when the run closes, as after `tracer.stop()`)."""
        if self.body.solo is None:
            self.body.solo = reason
        self.interleaver.main.switch(STOP)  # type: ignore[union-attr]


class SharedInterleaver(Interleaver):
    """The model side of a shared run: serves private copies, writes edits back, and keeps each
    body's failure its own."""

    def _serve_one(self, mediator: Mediator, slot: Any) -> None:
        if not isinstance(mediator, SharedMediator):
            return super()._serve_one(mediator, slot)
        mediator.current = slot
        try:
            if not _serve_private(mediator, slot, self.batch_size):
                mediator.body.solo = mediator.body.solo or SOLO_COPY
                return
            signal = mediator.greenlet.switch(slot.view)  # type: ignore[union-attr]
            if mediator.body.solo is None and not mediator.body.error:
                _write_back(mediator, slot)
        finally:
            mediator.current = None
            mediator.records = mediator.originals = None
        if signal is not WAIT and signal is not DONE:
            self._handle_signal(mediator, signal, slot)

    def _handle_signal(self, mediator: Mediator, signal: str, slot: Any) -> None:
        if not isinstance(mediator, SharedMediator):
            return super()._handle_signal(mediator, signal, slot)
        body = mediator.body
        if signal == ERROR:
            body.error, mediator.error = mediator.error, None
        elif signal == STOP:
            body.stopped = body.solo is None
        elif signal == CALL:
            body.solo = body.solo or SOLO_CALL
        elif signal == BARRIER:
            body.solo = body.solo or SOLO_BARRIER

    def _raise_error(self, mediator: Mediator) -> None:
        if not isinstance(mediator, SharedMediator):
            return super()._raise_error(mediator)
        mediator.body.error, mediator.error = mediator.error, None



class _Inexact(Exception):
    """An edit that a shared forward cannot apply to one job's rows alone."""


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
          torch.layout, torch.memory_format, type, types.FunctionType, types.BuiltinFunctionType,
          types.MethodType, torch.nn.Module, type(Ellipsis), slice)
_MAX_DEPTH = 24


def _serve_private(mediator: SharedMediator, slot: Any, total: int) -> bool:
    """Set `slot.view` to a private copy of the mediator's rows of `slot.value`; False when
    some part of it cannot be copied."""
    start, size = mediator.group  # type: ignore[misc]
    records: list[tuple[torch.Tensor, torch.Tensor, int, bool]] = []
    originals: dict[int, Any] = {}
    try:
        view = _copy_rows(slot.value, start, size, total, records, originals, {}, 0)
    except _Inexact:
        slot.view = NOTHING
        return False
    slot.view = view
    mediator.records, mediator.originals = records, originals
    return True


def _copy_rows(value: Any, start: int, size: int, total: int, records: list, originals: dict, memo: dict,
               depth: int) -> Any:
    if isinstance(value, torch.Tensor):
        key = id(value)
        if key in memo:  # the same tensor twice (in the args and the kwargs): one copy, as alone
            return memo[key]
        row_block = value.dim() > 0 and value.shape[0] == total
        private = (value[start:start + size] if row_block else value).detach().clone()
        records.append((private, value, private._version, row_block))
        originals[id(private)] = value
        memo[key] = private
        return private
    if isinstance(value, _ATOMS) or depth > _MAX_DEPTH:
        if depth > _MAX_DEPTH:
            raise _Inexact("too deep")
        return value
    key = id(value)
    if key in memo:
        return memo[key]
    nested = depth + 1
    if isinstance(value, tuple):
        items = [_copy_rows(v, start, size, total, records, originals, memo, nested) for v in value]
        out: Any = type(value)(*items) if hasattr(value, "_fields") else (
            tuple(items) if type(value) is tuple else type(value)(items))
    elif isinstance(value, list):
        out = [_copy_rows(v, start, size, total, records, originals, memo, nested) for v in value]
    elif isinstance(value, dict):
        mapped = {k: _copy_rows(v, start, size, total, records, originals, memo, nested) for k, v in value.items()}
        if type(value) is dict:
            out = mapped
        else:
            try:  # ModelOutput and other dict subclasses
                out = type(value)(**mapped)
            except Exception:
                raise _Inexact(type(value).__name__) from None
    else:
        # An object the model passes along (a KV cache): a shallow copy whose attributes are
        # copied the same way; the model keeps its own.
        try:
            out = copy.copy(value)
            attributes = vars(out)
        except Exception:
            raise _Inexact(type(value).__name__) from None
        memo[key] = out
        for name, item in list(attributes.items()):
            attributes[name] = _copy_rows(item, start, size, total, records, originals, memo, nested)
    memo[key] = out
    originals[id(out)] = value
    return out


def _write_back(mediator: SharedMediator, slot: Any) -> None:
    """Put the body's in-place edits of its copies into its rows of the batch (or make it
    solo when an edit was not to its rows)."""
    records = mediator.records
    if not records:
        return
    start, size = mediator.group  # type: ignore[misc]
    for private, original, version, row_block in records:
        if private._version == version:
            continue
        if not row_block or private.shape != original[start:start + size].shape:
            mediator.body.solo = mediator.body.solo or SOLO_EDIT
            return
        with torch.no_grad():
            original[start:start + size].copy_(private)


def _splice_rows(original: Any, new: Any, start: int, size: int, total: int, originals: dict[int, Any]) -> Any:
    """`original` with the job's rows replaced by `new`, where `new` mirrors the job's copy of
    `original` (as `.output = x` / `.input = x` make it); `_Inexact` where it does not."""
    if originals.get(id(new)) is original and not isinstance(new, torch.Tensor):
        return original  # the job's own copy, given back (its in-place edits are checked apart)
    if isinstance(original, torch.Tensor):
        if not isinstance(new, torch.Tensor):
            raise _Inexact("not a tensor")
        if original.dim() > 0 and original.shape[0] == total:
            block = original[start:start + size]
            if new.shape != block.shape or new.dtype != original.dtype or new.device != original.device:
                raise _Inexact("shape")
            return torch.cat([original[:start], new.detach(), original[start + size:]], dim=0)
        if originals.get(id(new)) is original or (new.shape == original.shape and new.dtype == original.dtype
                                                  and torch.equal(new, original)):
            return original
        raise _Inexact("shared tensor")
    if isinstance(original, _ATOMS):
        if new is original or (type(new) is type(original) and new == original):
            return original
        raise _Inexact("value")
    if isinstance(original, (tuple, list)) and isinstance(new, (tuple, list)) and len(new) == len(original):
        items = [_splice_rows(o, n, start, size, total, originals) for o, n in zip(original, new)]
        if isinstance(original, tuple):
            return type(original)(*items) if hasattr(original, "_fields") else (
                tuple(items) if type(original) is tuple else type(original)(items))
        return items
    if isinstance(original, dict) and isinstance(new, dict) and new.keys() == original.keys():
        mapped = {k: _splice_rows(original[k], new[k], start, size, total, originals) for k in original}
        if type(original) is dict:
            return mapped
        try:
            return type(original)(**mapped)
        except Exception:
            raise _Inexact(type(original).__name__) from None
    raise _Inexact(type(original).__name__)
