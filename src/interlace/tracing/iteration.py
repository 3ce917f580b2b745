"""Step loops: `tracer.iter[...]` and `tracer.all()`.

Step k of a module is its k-th call in this run (during generation, the forward for token k).
Inside a loop every module access of the invoke addresses the current step. Open-ended
slices stop at the run's known number of steps (`max_new_tokens` for generation, 1 for a
trace), so a loop can never wait past the end and lose what was saved.

Both nnsight spellings work: `for step in tracer.iter[0:3]:` and the block form
`with tracer.iter[0:3] as step:` (also `with tracer.all():`), whose body runs once per
selected step. The block form captures its body like an invoke does (`capture.py`), runs it
for each step from `__enter__`, and then skips it (`BodySkipper`).
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Protocol

from ..errors import TracingError
from .capture import BodySkipper, SkipBody, capture_block
from .frames import is_namespace
from .mediator import current_mediator
from .namespace import new_namespace

__all__ = ["IterProxy", "StepLoop", "StepSource", "run_steps", "MSG_ALL_OUTSIDE_RUN"]

MSG_ALL_OUTSIDE_RUN = (
    "model.all() can only be used inside a traced body while the model runs:\n\n"
    "    with model.generate(prompt, max_new_tokens=5):\n"
    "        model.all()\n"
    "        tokens.append(model.lm_head.output.argmax(-1))"
)


class StepSource(Protocol):
    """The tracer whose steps a loop walks (`tracer.InterleavingTracer`)."""

    def _steps(self) -> int | None:
        """The run's number of steps (None: not known)."""
        ...


class IterProxy:
    """`tracer.iter[0:3]`, `tracer.iter[[0, 2]]`, `tracer.iter[1]`: loop over generation steps."""

    def __init__(self, tracer: StepSource) -> None:
        self.tracer = tracer

    def __getitem__(self, key: int | slice | list[int]) -> "StepLoop":
        limit = self.tracer._steps() or 1
        if isinstance(key, int):
            if key < 0:
                raise TracingError("Generation steps cannot be negative: use tracer.iter[0], tracer.iter[1], ...")
            steps = [key]
        elif isinstance(key, slice):
            if (key.start or 0) < 0 or (key.stop is not None and key.stop < 0):
                raise TracingError("Generation steps cannot be negative: use tracer.iter[a:b] with 0 <= a <= b.")
            # An open slice (`iter[:]`, `iter[2:]`) ends with the run; an explicit stop is kept:
            # a module called 3 times in one forward has steps 0-2 (`iter[:3]`), and a step
            # past the end of generation warns that it was not provided.
            steps = list(range(*key.indices(limit))) if key.stop is None else list(range(key.start or 0, key.stop, key.step or 1))
        elif isinstance(key, (list, tuple)):
            steps = sorted(set(int(k) for k in key))
            if steps and steps[0] < 0:
                raise TracingError("Generation steps cannot be negative.")
        else:
            raise TracingError(f"tracer.iter[...] takes an int, a slice or a list of ints, not {type(key).__name__}.")
        return StepLoop(steps, limit)


class StepLoop:
    _skipper: Any = None

    def __init__(self, steps: list[int], limit: int) -> None:
        self.steps = steps
        self.limit = limit

    # -- `with tracer.iter[...]:` --------------------------------------------------------------

    def __enter__(self) -> Any:
        frame = sys._getframe(1)
        if current_mediator() is None:
            raise TracingError("`with tracer.iter[...]:` can only be used inside the traced body while the model runs.")
        block = capture_block(frame, "tracer.iter[...]")
        if is_namespace(frame.f_globals):  # the body's own namespace: it sees the loop's names
            ns = frame.f_globals
        else:  # a helper function: its variables go in and come back out
            ns = new_namespace(block, frame)
        step = None
        for step in self:
            if block.as_name:
                ns[block.as_name] = step
            exec(block.code, ns)
        values = None
        if ns is not frame.f_globals:
            values = {name: ns[name] for name in block.stored_names if name in ns}
        if block.as_name:
            values = {**(values or {}), block.as_name: step}
        self._skipper = BodySkipper(frame, values)
        return step

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        skipper, self._skipper = self._skipper, None
        if skipper is not None:
            skipper.restore()
        return exc_type is SkipBody

    def __iter__(self) -> Iterator[int]:
        mediator = current_mediator()
        if mediator is None:
            raise TracingError("tracer.iter[...] can only be looped over inside the traced body while the model runs.")
        previous = mediator.step
        mediator.iter_depth += 1
        try:
            for step in self.steps:
                mediator.step = step
                yield step
        finally:
            mediator.step = previous
            mediator.iter_depth -= 1


class _RunSteps:
    """The running interleaver's number of steps, as a `StepSource`."""

    __slots__ = ("steps",)

    def __init__(self, steps: int | None) -> None:
        self.steps = steps

    def _steps(self) -> int | None:
        return self.steps


def run_steps() -> StepLoop:
    """Every step of the run the calling body is part of: `model.all()` (where the tracer is
    not at hand, as with a model-level `llama.all()` in a shipped body)."""
    mediator = current_mediator()
    if mediator is None:
        raise TracingError(MSG_ALL_OUTSIDE_RUN)
    return IterProxy(_RunSteps(getattr(mediator.interleaver, "steps", None)))[:]
