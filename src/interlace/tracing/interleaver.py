"""Running intervention bodies beside a model's forward: the model side (`Interleaver`).
The body side (`Mediator`, its pooled greenlet and signals) is in `mediator.py`, wrappers and
the call-order table in `wrapping.py`.

Design note
-----------
Each invoke body (a "mediator") runs in its own greenlet; the model runs in the caller's.
Exactly one of them runs at any moment, and a switch costs about a microsecond (the peer uses
one OS thread per invoke with lock-step mailboxes).

For the duration of one run a module's `forward` is wrapped (an instance attribute, put
back afterwards). The wrapper counts calls per module, which gives two things cheaply:
- order checks at the access: asking for `h[0].output` after h[0] has finished raises
  `OutOfOrderError` right there, in the user's line, instead of after the run;
- step addressing for generation: step k of a module is its k-th call.

Which modules are wrapped: a model's first run (and any run without a valid `OrderTable`)
wraps every module and records the call order of one forward of the root module. If every
module ran at most once per root forward (and only inside it), later runs wrap only the root
(its calls are the steps) and extra modules like `generator`; a body's request for module M
wraps M and the modules that called it (so a module that is running is always one that was
wrapped before its call began) and sets M's counters from the table: at root step s, served
at X's input (output), M has started s + 1 times if it starts before X's start (end) in the
table, else s times; likewise for ends. `tracer.cache` wraps the observed modules the same
way; `.source` and models with shared or recurrent modules always wrap everything.

The modules a call site's run wrapped mid-run are remembered (`OrderTable.ahead`, keyed by
the bodies' code); the site's next runs wrap them before the forward starts, with exact
counters from zero, so a steady loop of traces neither wraps mid-run nor relies on the table.

Every lazy run checks afterwards that its wrapped modules started in table order, once per
root step, inside the root's forward; if not, the table is dropped and the next run wraps
all and records a new one. Residual risk: a model whose call order changes between runs
(data-dependent branches or reordering) can, in the first run after the change, raise a
wrong `OutOfOrderError` or `ModuleNotCalledError` (or miss one) for modules wrapped mid-run
that the table places wrongly, before the check sees it; a module wrapped mid-run is counted
as if it ran in every earlier root step. Modules wrapped before the forward count exactly.

Cost note: a trace's own Python runs with cold caches, between or inside forwards that evict
them, at roughly 50 ns per distinct bytecode instruction (measured on the tiny GPT-2), many
times its hot cost. So the per-run and per-served-value paths keep few functions and lines:
class defaults instead of per-run initialisation, the common cases written out inline.

A lone body made only of statements that read module outputs and then only compute and save
runs with no greenlet at all: each statement runs inside the wrapper that serves its last
value (`run_inline`; the static check and its limits are in `reads.py`).

Waiting mediators are kept per module; when a module starts (inputs) or ends (output) the
mediators waiting on that call are resumed in invoke order with their rows of the value.
A mediator that asks again for the value it is being served gets it without any switch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from greenlet import getcurrent

from ..errors import GenerationEndedWarning, ModuleNotCalledError, TracingError, warn
from .batching import narrow, whole
from .inline import InlineBodies
from .mock import not_run_message
from .mediator import (  # noqa: F401 - INPUT, OUTPUT, Mediator, StopForward, current_mediator re-exported
    BARRIER,
    CALL,
    DONE,
    ERROR,
    INPUT,
    KIND_NAME,
    NOTHING,
    OUTPUT,
    STOP,
    WAIT,
    GenerationEnded,
    Mediator,
    Slot,
    StopForward,
    by_index,
    current_mediator,
)
from .mediator import take_worker as _take_worker  # (tests count the workers taken through this name)
from .wrapping import ModuleHooks, OrderTable  # noqa: F401 - re-exported

__all__ = ["Interleaver", "ModuleHooks", "Mediator", "OrderTable", "StopForward", "current_mediator", "INPUT", "OUTPUT"]


class Interleaver(InlineBodies):
    """One run of a model with a set of mediators.

    Wrapping only what is needed (see OrderTable): `n_core` modules belong to the root's
    forward (the rest, like `generator`, are always wrapped); `lazy` is the table of a lazy
    run, `wrapped` its wrapped indices. While recording the call order (a full run) or in a
    lazy run, `tap` is `events.append`: wrappers add each call's start (`idx`) and end
    (`~idx`), read after the run (`OrderTable.from_events` / `OrderTable.agrees`).
    """

    tap: Callable[[int], None] | None = None
    events: list[int] | None = None
    recording = False
    lazy: "OrderTable | None" = None
    wrapped: "set[int] | range" = range(1 << 62)  # every index, unless a lazy run
    upfront = 0  # how many modules a lazy run wrapped before the forward
    site: Any = None  # a lazy run's call site (its bodies' code), the key of OrderTable.ahead
    ops: dict[Any, int] | None = None  # `.source` op call sites -> their counter index
    completed = False
    stopped = False
    needed: tuple[int, ...] | None = None  # all this run's bodies can read (an inline body)

    def __init__(
        self,
        modules: Sequence[Any],
        paths: Sequence[str],
        mediators: list[Mediator],
        batch_size: int,
        steps: int | None = None,
        hooks: "ModuleHooks | None" = None,
        n_core: int | None = None,
    ) -> None:
        self.modules = modules
        self.paths = paths
        self.mediators = mediators
        self.batch_size = batch_size
        self.steps = steps
        n = len(modules)
        self.started = [0] * n
        self.finished = [0] * n
        self.input_waiters: dict[int, list[Mediator]] = {}
        self.output_waiters: dict[int, list[Mediator]] = {}
        self.observers: dict[int, list[Callable[..., None]]] = {}
        self.main = getcurrent()
        self.n_core = n if n_core is None else n_core
        # Wrappers are made once per model (NNsight keeps its ModuleHooks) and only put in
        # place for the run, so a run costs two dict writes per module, not a new closure.
        self.hooks = hooks if hooks is not None and hooks.modules is modules else ModuleHooks(modules)

    def path(self, idx: int) -> str:
        return self.paths[idx]

    # -- module wrapping ---------------------------------------------------------------------

    def install(self) -> None:
        self.hooks.install(self)

    def install_recording(self) -> None:
        """Wrap everything and record the call order (for an OrderTable after the run)."""
        self.recording = True
        self.events = []
        self.tap = self.events.append
        self.hooks.install(self)

    def install_lazy(self, table: "OrderTable", ahead: Sequence[int] = ()) -> None:
        """Wrap only the root, the extra modules and `ahead` (what this call site needed last
        time, see `OrderTable.ahead`); bodies' requests wrap the rest."""
        self.lazy = table
        only = [0, *ahead, *range(self.n_core, len(self.modules))]
        self.wrapped = set(only)
        self.upfront = len(self.wrapped)
        self.events = []
        self.tap = self.events.append
        self.hooks.install(self, only)

    def install_only(self, needed: Sequence[int]) -> None:
        """Wrap only `needed`, from zero (exact counters, no call-order table): every module
        the run's bodies can read, known before the forward (`run_inline`)."""
        self.wrapped = set(needed)
        self.hooks.install(self, needed)

    def _cursor(self, slot: "Slot | None") -> tuple[int, int] | None:
        """(root step, table position now); position -1 between root forwards; None if unknown."""
        s0 = self.started[0]
        if s0 == self.finished[0]:
            return (s0, -1)
        if slot is None or slot.idx >= self.n_core:
            return None
        table = self.lazy
        assert table is not None
        pos = table.start[slot.idx] if slot.kind == INPUT else table.end[slot.idx]
        return (s0 - 1, pos) if pos >= 0 else None

    def _set_counts(self, idx: int, cursor: tuple[int, int]) -> None:
        """Counters of a module wrapped mid-run, as if it had been wrapped from the start."""
        step, pos = cursor
        table = self.lazy
        assert table is not None
        if pos < 0:
            self.started[idx] = self.finished[idx] = step
        else:
            self.started[idx] = step + (0 <= table.start[idx] <= pos)
            self.finished[idx] = step + (0 <= table.end[idx] <= pos)

    def wrap_lazily(self, idx: int, slot: "Slot | None") -> None:
        """Wrap module `idx` (and the modules that call it, so a module that is running is
        always wrapped) for the rest of this lazy run."""
        table = self.lazy
        assert table is not None and self.wrapped is not None
        cursor = self._cursor(slot)
        if table.start[idx] < 0 or cursor is None:  # not in the table, or no known position
            self.wrap_all(slot)
            return
        wrapped, parent = self.wrapped, table.parent
        chain = []
        while idx >= 0 and idx not in wrapped:
            chain.append(idx)
            idx = parent[idx]
        step, pos = cursor
        started, finished, start, end = self.started, self.finished, table.start, table.end
        for i in reversed(chain):  # callers first; counters as in _set_counts
            if pos < 0:
                started[i] = finished[i] = step
            else:
                started[i] = step + (0 <= start[i] <= pos)
                finished[i] = step + (0 <= end[i] <= pos)
            wrapped.add(i)
            self.hooks.wrap(i)

    def wrap_all(self, slot: "Slot | None" = None) -> None:
        """Leave the lazy mode for the rest of this run (every module wrapped)."""
        table = self.lazy
        if table is None:
            return
        assert self.wrapped is not None
        cursor = self._cursor(slot)
        if cursor is None:  # should not happen; counts are then a best guess
            table.valid = False
            s0 = self.started[0]
            cursor = (s0 - 1 if s0 > self.finished[0] else s0, -1)
        for i in range(self.n_core):
            if i not in self.wrapped:  # type: ignore[operator]
                self._set_counts(i, cursor) if table.start[i] >= 0 else self._set_counts(i, (cursor[0], -1))
                self.hooks.wrap(i)
        self.wrapped = Interleaver.wrapped  # every index from now on
        self.lazy = None
        self.tap = None

    def _call(self, idx: int, inner: Callable[..., Any], args: tuple, kwargs: dict, n: int) -> Any:
        """A module call that has mediators waiting for its inputs (the wrapper's slow path)."""
        args, kwargs, skipped = self._serve_input(idx, n, args, kwargs)
        out = inner(*args, **kwargs) if skipped is NOTHING else skipped
        self.finished[idx] += 1
        if self.tap is not None:
            self.tap(~idx)
        if idx in self.output_waiters or idx in self.observers:
            out = self._after(idx, n, args, kwargs, out)
        return out

    def _after(self, idx: int, n: int, args: tuple, kwargs: dict, out: Any) -> Any:
        """Serve module `idx`'s output to waiting mediators, then run observers.

        One body waiting for this very call (the common case) is served from here, without
        `_serve`: this runs with cold caches right after the module's forward, where every
        extra function costs more than its work (see `bench/JOURNAL.md`).
        """
        waiters = self.output_waiters.get(idx)
        if waiters is not None:
            mediator = waiters[0]
            want = mediator.want
            if len(waiters) == 1 and want is not None and want[2] == n:
                del self.output_waiters[idx]
                mediator.want = None
                slot = Slot(OUTPUT, idx, n, out)
                if mediator.plan is not None and mediator.group is None:  # `_serve_one`, inline
                    slot.view = out
                    mediator.current = slot  # (for a greenlet that takes over: `request`)
                    try:
                        signal = self._go_on_inline(mediator, slot)
                    finally:
                        mediator.current = None
                    if signal is not WAIT and signal is not DONE:
                        self._handle_signal(mediator, signal, slot)
                else:
                    self._serve_one(mediator, slot)
                out = slot.value
            else:
                out = self._serve(self.output_waiters, OUTPUT, idx, n, out)
        if self.observers:
            observers = self.observers.get(idx)
            if observers:
                for observe in observers:
                    observe(idx, n, args, kwargs, out)
        return out

    # -- serving values ----------------------------------------------------------------------

    def _serve_input(self, idx: int, n: int, args: tuple, kwargs: dict) -> tuple[tuple, dict, Any]:
        slot_value, skips = self._serve(self.input_waiters, INPUT, idx, n, (args, kwargs), collect_skips=True)
        new_args, new_kwargs = slot_value
        skipped = NOTHING
        if skips:
            skipped = self._combine_skips(idx, skips)
        return tuple(new_args), dict(new_kwargs), skipped

    def _serve(
        self,
        table: dict[int, list[Mediator]],
        kind: int,
        idx: int,
        n: int,
        value: Any,
        collect_skips: bool = False,
    ) -> Any:
        waiters = table[idx]
        skips: tuple[tuple[Mediator, Any], ...] = ()
        if len(waiters) == 1:  # the common case, without the list building and sorting below
            mediator = waiters[0]
            want = mediator.want
            if want is None or want[2] != n:
                return (value, skips) if collect_skips else value
            del table[idx]
            slot = Slot(kind, idx, n, value)
            mediator.want = None
            self._serve_one(mediator, slot)
            return (slot.value, slot.skips) if collect_skips else slot.value
        else:
            ready = [m for m in waiters if m.want is not None and m.want[2] == n]
            if ready:
                rest = [m for m in waiters if m not in ready]
                if rest:
                    table[idx] = rest
                else:
                    del table[idx]
                ready.sort(key=by_index)
        if ready:
            slot = Slot(kind, idx, n, value)
            for mediator in ready:
                mediator.want = None
                self._serve_one(mediator, slot)
                value = slot.value
            skips = slot.skips
        return (value, skips) if collect_skips else value

    def _serve_one(self, mediator: Mediator, slot: Slot) -> None:
        """Hand `slot`'s value (this invoke's rows of it) to a waiting `mediator` until it
        waits again, parks at a barrier, ends or stops."""
        mediator.current = slot
        try:
            # Views differ per invoke (their rows), so they are made per resume.
            group = mediator.group
            slot.view = slot.value if group is None else narrow(slot.value, group, self.batch_size)
            if mediator.greenlet is None:  # a deferred body starts with this value
                signal = self._start_body(mediator) if mediator.plan is None else self._go_on_inline(mediator, slot)
            else:
                signal = mediator.greenlet.switch(slot.view)
        finally:
            mediator.current = None
        if signal is not WAIT and signal is not DONE:
            self._handle_signal(mediator, signal, slot)

    def _resume(self, mediator: Mediator, slot: Slot | None) -> None:
        """Start or continue `mediator` (not serving it a value) until it waits, parks at a
        barrier, ends or stops."""
        mediator.current = slot
        if slot is not None:
            # The slot's view is the rows of the invoke it was last made for (the one whose
            # barrier call released the others): this invoke reads its own rows (`request`).
            slot.view = NOTHING
        try:
            if mediator.greenlet is None:  # its body has ended
                return
            signal = mediator.greenlet.switch()
        finally:
            mediator.current = None
        if signal is not WAIT and signal is not DONE:
            self._handle_signal(mediator, signal, slot)

    @staticmethod
    def _raise_error(mediator: Mediator) -> None:
        error, mediator.error = mediator.error, None
        assert error is not None
        try:
            raise error
        finally:
            del error

    def _handle_signal(self, mediator: Mediator, signal: str, slot: Slot | None) -> None:
        while signal == CALL:  # `envoy(..., hook=True)`: run the call here, then go on
            fn, mediator.call = mediator.call, None
            try:
                reply: tuple[Any, BaseException | None] = (fn(), None)  # type: ignore[misc]
            except BaseException as error:  # handed to the body, raised at its line
                reply = (None, error)
            mediator.current = slot
            try:
                signal = mediator.greenlet.switch(reply)  # type: ignore[union-attr]
            finally:
                mediator.current = None
                reply = None  # type: ignore[assignment]
            if signal is WAIT or signal is DONE:
                return
        if signal == ERROR:
            self._raise_error(mediator)
        if signal == STOP:
            self.stopped = True
            raise StopForward()
        if signal == BARRIER:
            barrier = mediator.barrier
            barrier.arrived.append(mediator)
            if len(barrier.arrived) >= barrier.parties:
                arrived, barrier.arrived = barrier.arrived, []
                for m in sorted(arrived, key=lambda m: m.index):
                    m.barrier = None
                    self._resume(m, slot)

    def _combine_skips(self, idx: int, skips: list[tuple[Mediator, Any]]) -> Any:
        import torch

        if len(skips) == 1 and whole(skips[0][0].group, self.batch_size):
            return skips[0][1]
        groups = sorted(skips, key=lambda s: s[0].group[0] if s[0].group else 0)
        covered = sum(m.group[1] if m.group else self.batch_size for m, _ in groups)
        if covered != self.batch_size or any(m.group is None for m, _ in groups):
            raise TracingError(
                f"{self.path(idx)} was skipped by some invokes but not all. A skipped module does "
                "not run at all, so every invoke in the batch must give it a value: call "
                f"`{self.path(idx)}.skip(value)` in each invoke, or in one empty invoke for the "
                "whole batch."
            )
        values = [v for _, v in groups]
        if all(isinstance(v, torch.Tensor) for v in values):
            return torch.cat(values, dim=0)
        if all(isinstance(v, tuple) for v in values):
            return tuple(torch.cat(parts, dim=0) if isinstance(parts[0], torch.Tensor) else parts[0] for parts in zip(*values))
        raise TracingError(f"Cannot combine per-invoke skip values for {self.path(idx)}; pass tensors.")

    # -- the run -----------------------------------------------------------------------------

    def defer_start(self, mediator: Mediator, idx: int) -> None:
        """Let `mediator`'s body start when module `idx`'s first output is served, instead of
        before the forward: the body's first act is known to be reading that value and
        nothing before it can be observed (`reads.first_output_read`), so this saves the
        start's greenlet round trip. If the module never runs, `finish` starts the body so
        the error surfaces at its line as usual."""
        if idx not in self.wrapped:
            self.wrap_lazily(idx, None)
        mediator.want = (OUTPUT, idx, 0)
        self.output_waiters[idx] = [mediator]
        mediator.deferred = True

    def _start_body(self, mediator: Mediator, value: Any = None) -> Any:
        """Put `mediator`'s body on a worker and run it until it waits; returns the signal.
        An inline body goes on from the statement it has reached (with what it read ahead)."""
        if mediator.plan is not None:
            mediator.code = mediator.block.rest_code(mediator.plan[mediator.seg][0].position)
            mediator.plan = None
            mediator.iter_depth = 0  # (a step loop starts over on the greenlet)
        worker = mediator.greenlet = _take_worker(self.main)
        worker.mediator = mediator
        return worker.switch(value)

    def start(self) -> bool:
        """Run each body, on a worker greenlet, until its first request; False if a body
        stopped the run."""
        mediators = self.mediators
        for mediator in mediators:
            mediator.interleaver = self
        try:
            for mediator in mediators:
                if mediator.deferred:
                    if mediator.plan is None or mediator.want is not None or mediator.done:
                        continue
                    signal = self._go_on_inline(mediator, None)  # statements that read nothing
                else:
                    signal = self._start_body(mediator)
                if signal is not WAIT and signal is not DONE:
                    self._handle_signal(mediator, signal, None)
        except StopForward:
            return False
        return True

    def finish(self, generation: bool = False) -> None:
        """After the forward: every body still waiting learns its module never came."""
        self.completed = True
        pending = sorted(
            {id(m): m for table in (self.input_waiters, self.output_waiters) for ms in table.values() for m in ms}.values(),
            key=by_index,
        ) if self.input_waiters or self.output_waiters else ()
        self.input_waiters.clear()
        self.output_waiters.clear()
        for mediator in pending:
            kind, idx, it = mediator.want  # type: ignore[misc]
            mediator.want = None
            if generation and mediator.iter_depth and it > 0:
                warn(
                    f"Generation ended after {self.finished[0]} step(s), before step {it} that "
                    f"the {mediator.label} was waiting for at `{self.path(idx)}.{KIND_NAME[kind]}`: "
                    "that step was not provided, so the rest of that loop body did not run. "
                    "Values saved so far are kept.",
                    GenerationEndedWarning,
                    stacklevel=2,
                )
                self._throw(mediator, GenerationEnded())
                continue
            step = f" at call {it}" if it else ""
            below_mock = not_run_message(self.modules[idx], self.path(idx), KIND_NAME[kind])
            self._throw(
                mediator,
                ModuleNotCalledError(below_mock) if below_mock is not None else ModuleNotCalledError(
                    f"`{self.path(idx)}.{KIND_NAME[kind]}`{step} was requested, but the forward "
                    f"ended without {self.path(idx)} running"
                    + (f" a {it + 1}th time" if it else "")
                    + ". Check that this module is used by the model's forward for this input "
                    "(a skipped parent, an early `tracer.stop()`, or a branch not taken "
                    "would explain it)."
                ),
            )
        for mediator in self.mediators:
            if mediator.barrier is not None:
                barrier = mediator.barrier
                mediator.barrier = None
                self._throw(
                    mediator,
                    TracingError(
                        f"tracer.barrier({barrier.parties}) was reached by only "
                        f"{len(barrier.arrived)} invoke(s); every participating invoke must call it."
                    ),
                )

    def _throw(self, mediator: Mediator, exc: BaseException) -> None:
        if mediator.plan is not None and mediator.greenlet is None and isinstance(exc, GenerationEnded):
            # An inline step loop waits for a step generation never made: the body ends
            # there, as a greenlet body does (`_worker_loop`), after the same warning.
            mediator.want = None
            mediator.plan = None
            mediator.done = True
            return
        if mediator.greenlet is None and mediator.deferred and not mediator.done:
            # Its value never came: run the body up to that read, so the error is raised there.
            mediator.want = None
            signal = self._start_body(mediator)
            if signal != WAIT:
                self._handle_signal(mediator, signal, None)
                return
            mediator.want = None
        g = mediator.greenlet
        if g is None or g.dead:
            return
        signal = g.throw(exc)
        if signal == WAIT:  # body caught the error and asked for more: nothing will come
            mediator.want = None
            signal = g.throw(ModuleNotCalledError("The forward has ended; no more module values will arrive."))
        if signal == ERROR:
            self._raise_error(mediator)

    def close(self) -> None:
        """Unwind any suspended body (after stop or an error) so its `finally` blocks run.

        Then break the run's reference cycles (interleaver <-> mediators, the bound tap), so
        a finished run, and the body namespaces it holds, are freed at once rather than at
        the next garbage collection.
        """
        for mediator in self.mediators:
            g = mediator.greenlet
            if g is not None and not g.dead:
                try:
                    g.throw()  # GreenletExit
                except BaseException:
                    pass
            mediator.error = None
            mediator.interleaver = None
        self.tap = None
