"""Running a body as inline statements, with no greenlet (the model side; the static check
and its limits are in `reads.py`, the design note there and in `interleaver.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .batching import narrow
from .mediator import _DONE, _WAIT, OUTPUT, Mediator, _Slot
from .reads import READ_NAME

__all__ = ["InlineBodies"]


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

    def run_inline(self, mediator: Mediator, plan: list[tuple[Any, tuple[int, ...]]], block: Any) -> None:
        """Run `mediator`'s body as inline statements (`reads.body_segments`; `plan` from
        `reads.inline_plan`): each statement runs on the model's side, in the wrapper that
        serves the last value it reads, with no greenlet; values it reads before that (a
        comprehension over layers) are kept by observers as they are served, in order. If a
        value cannot come in order, the rest of the body goes on a greenlet as usual
        (`_start_body`), so errors are raised by the same code at the same line.

        Called before `NNsight._begin_run`, which then wraps only the modules the statements
        read (`needed`): their counters are exact, so no call-order table is involved."""
        mediator.plan = plan
        mediator.block = block
        mediator.deferred = True
        self.needed = tuple({i for _, reads in plan for i in reads})
        if not plan:  # nothing but `pass`
            mediator.done = True
            return
        self._await_inline(mediator, plan[0][1])

    def _await_inline(self, mediator: Mediator, reads: tuple[int, ...]) -> None:
        """Wait for a statement's last read; keep the values of the reads before it if they
        are served in order (a `kept` list that `_go_on_inline` checks)."""
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
        mediator.want = (OUTPUT, idx, 0)
        queue = self.output_waiters.get(idx)
        if queue is None:
            self.output_waiters[idx] = [mediator]
        else:
            queue.append(mediator)

    def _go_on_inline(self, mediator: Mediator, slot: _Slot) -> Any:
        """Run the statements of an inline body that the value in `slot` completes, then wait
        for the next one's reads; returns the signal, as a greenlet would."""
        plan: list[tuple[Any, tuple[int, ...]]] = mediator.plan  # type: ignore[assignment]
        ns = mediator.namespace
        while True:
            segment, reads = plan[mediator.seg]
            if len(reads) == 1:
                ns[READ_NAME] = slot.view
            else:
                kept = mediator.kept
                if len(kept) != len(reads) - 1:  # a value came out of order (or not at all)
                    mediator.prefetched = dict(zip(reads, kept))
                    return self._start_body(mediator)
                ns[READ_NAME] = [*kept, slot.view]
                mediator.kept = None
            main = self.main
            outer = getattr(main, "mediator", None)  # (a trace run from a body's greenlet)
            main.mediator = mediator  # what a value's own `.save()` would find
            mediator.inline = True
            try:
                exec(segment.code, ns)
            finally:
                mediator.inline = False
                main.mediator = outer
                del ns[READ_NAME]
            seg = mediator.seg = mediator.seg + 1
            if seg == len(plan):
                mediator.done = True
                mediator.plan = None
                return _DONE
            reads = plan[seg][1]
            if len(reads) == 1 and reads[0] == slot.idx and slot.kind == OUTPUT and slot.n == 0:
                continue  # the value being served, read again
            finished = self.finished
            for idx in reads:
                if finished[idx]:  # already gone: the greenlet body raises at its line
                    return self._start_body(mediator)
            self._await_inline(mediator, reads)
            return _WAIT
