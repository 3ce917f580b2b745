"""The body side of interleaving: one invoke body (a `Mediator`), the greenlet it runs on,
and the signals it hands back to the model side (see the design note in `interleaver.py`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol

from greenlet import GreenletExit, getcurrent, greenlet

from ..errors import OutOfOrderError, TracingError
from .batching import BatchGroup, narrow, splice
from .frames import user_location

__all__ = [
    "Mediator", "ModelSide", "Slot", "current_mediator", "take_worker", "by_index",
    "INPUT", "OUTPUT", "KIND_NAME", "NOTHING", "StopForward", "GenerationEnded",
    "WAIT", "DONE", "STOP", "BARRIER", "ERROR", "CALL",
]

INPUT = 0
OUTPUT = 1
KIND_NAME = {INPUT: "input", OUTPUT: "output"}

# What a body greenlet hands back to the model side when it gives up control.
WAIT = "wait"
DONE = "done"
STOP = "stop"
BARRIER = "barrier"
ERROR = "error"  # the body raised; the exception is in `mediator.error`
CALL = "call"  # the body asks the model side to run `mediator.call` (`envoy(..., hook=True)`)


class StopForward(Exception):
    """Unwinds the model's forward after `tracer.stop()`."""


class GenerationEnded(BaseException):
    """Ends a body that waits for a generation step that will never come."""


#: "No value": a slot's view not made yet, a module not skipped.
NOTHING = object()


class Slot:
    """The value of one module call being served (its inputs or output)."""

    view: Any = NOTHING  # this invoke's rows of `value`, made when first asked for
    skips: tuple[tuple["Mediator", Any], ...] = ()  # (invoke, value) pairs of `.skip(value)`

    def __init__(self, kind: int, idx: int, n: int, value: Any) -> None:
        self.kind = kind
        self.idx = idx
        self.n = n
        self.value = value


class ModelSide(Protocol):
    """The model side of a run (`interleaver.Interleaver`) as bodies and the module wrappers
    (`wrapping.py`) use it; declared here so that neither imports the interleaver."""

    main: greenlet  # the greenlet the model runs in
    batch_size: int
    started: list[int]  # calls begun, per module index
    finished: list[int]  # calls ended, per module index
    input_waiters: dict[int, list[Mediator]]
    output_waiters: dict[int, list[Mediator]]
    observers: dict[int, list[Callable[..., None]]]
    wrapped: set[int] | range  # the wrapped module indices (every one unless a lazy run)
    tap: Callable[[int], None] | None  # records call starts/ends while recording the order

    def path(self, idx: int) -> str:
        """The dotted path of module `idx`."""
        ...

    def wrap_lazily(self, idx: int, slot: Slot | None) -> None:
        """Wrap module `idx` (and its callers) for the rest of a lazy run."""
        ...

    def _call(self, idx: int, inner: Callable[..., Any], args: tuple, kwargs: dict, n: int) -> Any:
        """A module call that bodies wait on the inputs of (a wrapper's slow path)."""
        ...

    def _after(self, idx: int, n: int, args: tuple, kwargs: dict, out: Any) -> Any:
        """Serve a module call's output to waiting bodies and observers; returns the output."""
        ...


class _BodyGreenlet(greenlet):
    """A reusable greenlet that runs one body after another.

    Starting a new greenlet costs ~9 us (its first switch sets up a C stack); switching to a
    live one ~0.7 us. So finished workers wait in a per-thread pool for the next body.
    """

    mediator: "Mediator | None" = None


class _Pool(threading.local):
    def __init__(self) -> None:
        self.idle: list[_BodyGreenlet] = []  # this thread's parked workers


_pool = _Pool()
_POOL_SIZE = 16

# Design note: greenlets share the thread's C stack. Switching to a greenlet copies out the
# part of the stack between the current depth and the greenlet's base (where it was first
# started), and copies it back on return. A worker started at the trace's depth therefore
# copies the model's whole forward stack (tens of KB) on every value served from inside it.
# New workers are started from a few dozen C frames deeper, so a switch from a module's
# forward only moves the body's own small stack (measured ~2.3 -> ~1.4 us a round trip).
_PRIME_DEPTH = 32


class _Descend:
    def __call__(self, depth: int, then: Callable[[], Any]) -> Any:
        # `self(...)` goes through tp_call, so each level takes C stack (Python-to-Python
        # calls do not in 3.11).
        return then() if depth <= 0 else self(depth - 1, then)


# Design note: a C-level stack walk that starts in a worker (torch captures one for every
# C++ error, e.g. `IndexError` from `h[999]` in a body) goes up through the greenlet's base
# into the memory above it, which holds whatever the model side has there now, not the
# frames that started the worker: walking it can crash the process. Torch walks at most 65
# frames, so each worker first descends `_FLOOR_DEPTH` levels (~6 C frames each) and runs
# its bodies from there: every walk that starts in a body ends before the base.
# `tests/tracing/test_engine_errors.py` checks the distance with torch's own stack walker.
_FLOOR_DEPTH = 12


def _worker_base() -> Any:
    started = False

    def loop() -> Any:
        nonlocal started
        started = True
        return _worker_loop()

    try:
        return _Descend()(_FLOOR_DEPTH, loop)
    except RecursionError:
        if started:
            raise
        return _worker_loop()  # too near the recursion limit to descend: run bodies from here


def _new_worker(main: Any) -> _BodyGreenlet:
    worker = _BodyGreenlet(_worker_base, parent=main)
    try:
        _Descend()(_PRIME_DEPTH, worker.switch)  # the worker starts there and parks at once
    except RecursionError:  # near the recursion limit: start it at its first body instead
        pass
    return worker


def take_worker(main: Any) -> _BodyGreenlet:
    """A parked worker greenlet from this thread's pool (a new one if none), returning to `main`."""
    idle = _pool.idle
    while idle:
        worker = idle.pop()
        if worker.dead:
            continue
        if worker.parent is not main:
            try:
                worker.parent = main  # a worker that ends returns to the model's side
            except ValueError:  # would make a parent cycle (nested traces): use a new one
                continue
        return worker
    return _new_worker(main)


def _worker_loop() -> Any:
    """Run bodies: the model side sets `worker.mediator` and switches in to start each one.

    Nothing is passed through `switch` or the run arguments: greenlet keeps a new greenlet's
    run arguments alive as long as it lives, which would pin the first body's namespace.
    """
    me: _BodyGreenlet = getcurrent()  # type: ignore[assignment]
    if me.mediator is None:  # started by _new_worker: park until the first body
        me.parent.switch()  # type: ignore[union-attr]
    while True:
        mediator = me.mediator
        assert mediator is not None
        try:
            try:
                exec(mediator.code, mediator.namespace)
            except GenerationEnded:
                pass
            mediator.done = True
            signal = DONE
        except GreenletExit:  # unwound by Interleaver.close() (or garbage collection): retire
            mediator.greenlet = None
            me.mediator = None
            return DONE
        except BaseException as error:
            # Handed over by reference, not raised through `switch`, so a waiting worker
            # does not keep the exception (and the frames and tensors it holds) alive.
            mediator.error = error
            signal = ERROR
        main = mediator.interleaver.main  # type: ignore[union-attr]
        mediator.greenlet = None
        me.mediator = None
        mediator = None  # type: ignore[assignment]
        idle = _pool.idle
        if len(idle) >= _POOL_SIZE:
            return signal
        idle.append(me)
        main.switch(signal)
        del main


def by_index(mediator: "Mediator") -> int:
    """Sort key: invoke order."""
    return mediator.index


def current_mediator() -> "Mediator | None":
    return getattr(getcurrent(), "mediator", None)


class Mediator:
    """One invoke body and its place in the batch.

    Per-run state starts from the class defaults below: every trace makes mediators, and
    each line of set-up runs with cold caches right before or after a forward.
    """

    step = 0
    iter_depth = 0  # > 0 inside `tracer.iter[...]`
    interleaver: "ModelSide | None" = None
    greenlet: "_BodyGreenlet | None" = None
    current: "Slot | None" = None  # the value being served to this body
    want: tuple[int, int, int] | None = None  # (kind, module, call) it waits for
    done = False
    barrier: Any = None
    error: BaseException | None = None
    call: "Callable[[], Any] | None" = None  # what a `CALL` signal asks the model side to run
    deferred = False  # its body starts when its first value arrives (Interleaver.defer_start)
    # A body run as inline statements (Interleaver.run_inline): its plan, the statement that
    # comes next, the values of that statement's reads before its last (kept in order), and
    # whether a statement is running right now.
    plan: "list[tuple[Any, tuple[int, ...], list[int] | None]] | None" = None
    block: Any = None
    seg = 0
    loop_pos = 0  # in a step loop: the position of the step it waits for among the loop's steps
    kept: list[Any] | None = None
    inline = False
    # Values served before a greenlet took over from inline statements (module -> its rows).
    prefetched: dict[int, Any] | None = None
    paths: "list[str] | None" = None  # module paths, for a body run with no interleaver

    def __init__(
        self,
        code: Any,
        namespace: dict[str, Any],
        group: BatchGroup,
        index: int,
        label: str = "invoke",
    ) -> None:
        self.code = code
        self.namespace = namespace
        self.group = group
        self.index = index
        self.label = label

    # -- body side (runs in the mediator's greenlet) ------------------------------------------

    def request(self, kind: int, idx: int, it: int | None = None) -> Any:
        """The value of module `idx` (its inputs or output) at call `it`, for this invoke."""
        il: ModelSide = self.interleaver  # type: ignore[assignment]
        if it is None:
            it = self.step
        slot = self.current
        if slot is not None and slot.idx == idx and slot.kind == kind and slot.n == it:
            if slot.skips and any(m is self for m, _ in slot.skips):
                self._raise_skipped(idx)
            if slot.view is NOTHING:
                slot.view = narrow(slot.value, self.group, il.batch_size)
            return slot.view
        prefetched = self.prefetched
        if prefetched is not None and kind and it == 0 and idx in prefetched:
            value = prefetched.pop(idx)
            if not prefetched:
                self.prefetched = None
            return value
        if self.inline:
            # A statement run inline (Interleaver.run_inline) cannot wait; only code it calls
            # that the static check cannot see (a value's own `.save()`) gets here. (With no
            # interleaver, `inline.run_one_read`, the model's module paths are at hand.)
            path = il.path(idx) if il is not None else self.paths[idx]  # type: ignore[index]
            raise TracingError(
                f"`{path}.{KIND_NAME[kind]}` was asked for by code that a traced "
                "statement called (a value's own `.save()` method?) while Interlace ran that "
                "statement on the model's side, where it cannot wait for another value. Start "
                "the block with a statement that reads no module (`_ = 0`) so the body runs on "
                "its own greenlet, or read the value in the block itself."
            )
        if idx not in il.wrapped:  # only in a lazy run (otherwise `wrapped` holds every index)
            il.wrap_lazily(idx, slot)
        if (il.finished if kind else il.started)[idx] > it:  # OUTPUT is 1, INPUT 0
            self._raise_passed(kind, idx, it)
        self.want = (kind, idx, it)
        table = il.output_waiters if kind else il.input_waiters
        queue = table.get(idx)
        if queue is None:
            table[idx] = [self]
        else:
            queue.append(self)
        return il.main.switch(WAIT)

    def swap(self, kind: int, idx: int, value: Any, it: int | None = None) -> None:
        """Replace module `idx`'s inputs or output (this invoke's rows) with `value`."""
        self.request(kind, idx, it)
        slot = self.current
        assert slot is not None
        il = self.interleaver
        assert il is not None
        slot.value = splice(slot.value, value, self.group, il.batch_size)
        slot.view = NOTHING

    def skip(self, idx: int, value: Any, it: int | None = None) -> None:
        self.request(INPUT, idx, it)
        slot = self.current
        assert slot is not None
        if any(m is self for m, _ in slot.skips):
            raise TracingError(f"{self.interleaver.path(idx)} is already skipped in this invoke.")  # type: ignore[union-attr]
        slot.skips = (*slot.skips, (self, value))

    def call_on_model_side(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model's side (so module wrappers see a model call) and return its
        result here; an exception it raises is raised here."""
        il = self.interleaver
        assert il is not None
        self.call = fn
        result, error = il.main.switch(CALL)
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        il = self.interleaver
        assert il is not None
        il.main.switch(STOP)

    def wait_barrier(self, barrier: Any) -> None:
        self.barrier = barrier
        self.interleaver.main.switch(BARRIER)  # type: ignore[union-attr]

    def _raise_skipped(self, idx: int) -> None:
        il = self.interleaver
        assert il is not None
        path = il.path(idx)
        filename, line = user_location()
        raise OutOfOrderError(
            f"`{path}` is skipped in this invoke (its `.skip(...)` came first), so its inputs "
            f"are no longer used; asked for again at {filename}:{line}. Read or edit "
            f"`{path}.input` before the skip, and call `.skip(...)` once:\n\n"
            f"    {path}.input[:] = 0        # first\n"
            f"    {path}.skip(value)         # then"
        )

    def _raise_passed(self, kind: int, idx: int, it: int) -> None:
        il = self.interleaver
        assert il is not None
        filename, line = user_location()
        what = f"{il.path(idx)}.{KIND_NAME[kind]}"
        step = f" (call {it})" if it else ""
        raise OutOfOrderError(
            f"`{what}`{step} was requested at {filename}:{line}, but {il.path(idx)} has "
            "already run in this forward, so its value is gone. Within one invoke, access "
            "modules in the order the model runs them (inputs before outputs, earlier "
            "layers first). To use a later value earlier, split the work into two invokes "
            "or two traces:\n\n"
            "    with model.trace() as tracer:\n"
            "        with tracer.invoke(x):\n            late = model.layer_b.output.save()\n"
            "        with tracer.invoke():\n            early = model.layer_a.output.save()"
        )
