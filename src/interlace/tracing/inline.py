"""Running a body as inline statements, with no greenlet (the model side; the static check
and its limits are in `reads.py`, the design note there and in `interleaver.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from greenlet import getcurrent

from .batching import narrow
from .mediator import DONE, OUTPUT, WAIT, Mediator, Slot

__all__ = ["READ_NAME", "InlineBodies", "run_one_read"]

#: The name under which an inline statement finds the value it reads (`exec_inline` binds it;
#: `reads.body_segments` compiles statements that load it).
READ_NAME = "__interlace_read__"


def exec_inline(main: Any, mediator: Mediator, code: Any, value: Any) -> None:
    """Run one statement of `mediator`'s body on `main` (the run's greenlet) with `value` as
    what it reads."""
    ns = mediator.namespace
    outer = getattr(main, "mediator", None)  # (a trace run from a body's greenlet)
    main.mediator = mediator  # what a value's own `.save()` would find (`Mediator.request`)
    mediator.inline = True
    ns[READ_NAME] = value
    try:
        exec(code, ns)
    finally:
        mediator.inline = False
        main.mediator = outer
        del ns[READ_NAME]


def run_one_read(
    mediator: Mediator, code: Any, module: Any, paths: Any, call: Callable[[], Any]
) -> tuple[bool, Any] | None:
    """Run the model (`call`) with `mediator`'s body, one inline statement that reads one
    module's output (`code`), run in a wrapper on that module right after its first call:
    what `Interleaver.run_inline` does for such a body, without the interleaver.

    Design note: an interleaver, its mediator bookkeeping and its serving path cost about
    40 % of a one-read trace's fixed cost, almost all of it cache misses after the forward
    (`bench/JOURNAL.md`, "Fifth pass"); with one value to serve, one closure does the same.
    Calls from another greenlet go straight through and are not counted, as in the general
    wrapper (`wrapping._wrapper`). Returns (whether the module ran, the model's output), or
    None without running anything if the module has its own instance `forward` (the general
    path wraps that one).
    """
    d = module.__dict__
    if "forward" in d:
        return None
    inner = type(module).forward.__get__(module)
    mediator.paths = paths  # (for `Mediator.request`'s error if code the statement calls reads)
    main = getcurrent()
    calls = 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if getcurrent() is not main:
            return inner(*args, **kwargs)
        n = calls
        calls = n + 1
        out = inner(*args, **kwargs)
        if n == 0:
            exec_inline(main, mediator, code, out)
        return out

    forward.__wrapped__ = inner  # type: ignore[attr-defined]  # (`inspect.signature`, as for every wrapper)
    d["forward"] = forward
    try:
        output = call()
    finally:
        del d["forward"]
    return calls > 0, output


class InlineBodies:
    """The part of `Interleaver` that runs inline bodies (a mixin: it uses the interleaver's
    counters, waiter tables, observers and `_start_body`)."""

    if TYPE_CHECKING:
        main: Any
        batch_size: int
        finished: list[int]
        needed: tuple[int, ...] | None
        output_waiters: dict[int, list[Mediator]]
        observers: dict[int, list[Callable[..., None]]]

        def _start_body(self, mediator: Mediator, value: Any = None) -> Any: ...

    def run_inline(self, mediator: Mediator, plan: list[tuple[Any, tuple[int, ...], list[int] | None]], block: Any) -> None:
        """Run `mediator`'s body as inline statements (`reads.body_segments`; `plan` from
        `reads.inline_plan`): each statement runs on the model's side, in the wrapper that
        serves the last value it reads, with no greenlet; values it reads before that (a
        comprehension over layers) are kept by observers as they are served, in order, and a
        step loop runs its statement once per step, each in the wrapper serving that step's
        value. If a value cannot come in order, the rest of the body goes on a greenlet as
        usual (`_start_body`), so errors are raised by the same code at the same line.

        Called before `NNsight._begin_run`, which then wraps only the modules the statements
        read (`needed`): their counters are exact, so no call-order table is involved.
        Statements that read nothing before the first read (`logits = list().save()`) run in
        `Interleaver.start`, where a greenlet body would start."""
        mediator.plan = plan
        mediator.block = block
        mediator.deferred = True
        if not plan:  # nothing but `pass`
            mediator.done = True
            self.needed = ()
            return
        if len(plan) == 1 and plan[0][2] is None and plan[0][1]:  # one read statement (written out)
            self.needed = plan[0][1]
            self._await_inline(mediator, plan[0][1])
            return
        needed = {i for _, reads, _ in plan for i in reads}
        for _, _, steps in plan:
            if steps:
                needed.add(0)  # the root too: its calls count the steps a loop's warning reports
                break
        self.needed = tuple(needed)
        if plan[0][1]:
            if plan[0][2] is None:
                self._await_inline(mediator, plan[0][1])
            elif plan[0][2]:
                self._go_on_inline(mediator, None)  # a loop: registers its first step's wait

    def _await_inline(self, mediator: Mediator, reads: tuple[int, ...], call: int = 0) -> None:
        """Wait for a statement's last read (at `call`: a loop's step); keep the values of the
        reads before it if they are served in order (a `kept` list that `_go_on_inline`
        checks; only statements outside loops read more than one value)."""
        last = len(reads) - 1
        if last:
            kept: list[Any] = []
            mediator.kept = kept
            group, batch_size = mediator.group, self.batch_size  # (not `self`: no reference cycle)
            observers = self.observers
            for position, idx in enumerate(reads[:last]):

                def keep(idx: int, n: int, args: tuple, kwargs: dict, out: Any, position: int = position) -> None:
                    if n == 0 and len(kept) == position:  # its first call, after the ones before it
                        kept.append(out if group is None else narrow(out, group, batch_size))

                observers.setdefault(idx, []).append(keep)
        idx = reads[last]
        mediator.want = (OUTPUT, idx, call)
        queue = self.output_waiters.get(idx)
        if queue is None:
            self.output_waiters[idx] = [mediator]
        else:
            queue.append(mediator)

    def _go_on_inline(self, mediator: Mediator, slot: Slot | None) -> Any:
        """Run the statement of an inline body that the value in `slot` completes (none when
        `slot` is None), the statements after it that read nothing, then wait for the next
        read; returns the signal, as a greenlet would."""
        plan: list[tuple[Any, tuple[int, ...], list[int] | None]] = mediator.plan  # type: ignore[assignment]
        ns = mediator.namespace
        ready = slot is not None  # `slot` holds the value the current statement waits for
        while True:
            if ready:
                ready = False
                segment, reads, steps = plan[mediator.seg]
                if len(reads) == 1:
                    value = slot.view
                else:
                    kept = mediator.kept
                    if len(kept) != len(reads) - 1:  # a value came out of order (or not at all)
                        mediator.prefetched = dict(zip(reads, kept))
                        return self._start_body(mediator)
                    value = [*kept, slot.view]
                    mediator.kept = None
                exec_inline(self.main, mediator, segment.code, value)
                if steps is not None:
                    position = mediator.loop_pos + 1
                    if position < len(steps):  # the loop's next step
                        call = steps[position]
                        mediator.loop_pos = position
                        ns[segment.loop[2]] = call
                        self._await_inline(mediator, reads, call)
                        return WAIT
                    mediator.iter_depth = 0
                mediator.seg += 1
            seg = mediator.seg
            if seg == len(plan):
                mediator.done = True
                mediator.plan = None
                return DONE
            segment, reads, steps = plan[seg]
            if not reads:  # reads nothing (an empty accumulator): runs now
                exec_inline(self.main, mediator, segment.code, None)
                mediator.seg = seg + 1
                continue
            call = 0
            if steps is not None:
                if not steps:  # a loop over no steps: its statement never runs
                    mediator.seg = seg + 1
                    continue
                call = steps[0]
                mediator.loop_pos = 0
                mediator.iter_depth = 1  # (so `finish` treats a step that never comes as a loop's)
            if slot is not None and len(reads) == 1 and reads[0] == slot.idx and slot.kind == OUTPUT and slot.n == call:
                if steps is not None:
                    ns[segment.loop[2]] = call
                ready = True  # the value being served, read again
                continue
            finished = self.finished
            for idx in reads:
                if finished[idx] > call:  # already gone: the greenlet body raises at its line
                    return self._start_body(mediator)
            if steps is not None:
                ns[segment.loop[2]] = call
            self._await_inline(mediator, reads, call)
            return WAIT
