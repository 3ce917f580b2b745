"""What a non-blocking remote trace binds in place of the values it did not wait for.

`with model.trace(x, remote=True, blocking=False) as tracer:` returns as soon as the job is
submitted, so the names the body saves have no values yet. Leaving them unbound would give a
bare `NameError`/`UnboundLocalError` at a later line (or silently keep an older value of the
same name); instead each is bound to a `NotWaited` that raises `ResultNotReadyError`, saying
how to get the value, as soon as it is used. Its `repr` says the same without raising, so a
notebook or debugger can still show it.
"""

from __future__ import annotations


from ..errors import InterlaceError
from ..tracing.backend import CapturedTrace
from ..tracing.namespace import MISSING
from ..tracing.placeholder import Placeholder

__all__ = ["NotWaited", "ResultNotReadyError", "not_waited_values"]


class ResultNotReadyError(InterlaceError, RuntimeError):
    """A saved name of a `blocking=False` trace was used before its job's result was fetched."""


class NotWaited(Placeholder):
    error = ResultNotReadyError
    __slots__ = ("_name", "_job_id", "_tracer_name")

    def __init__(self, name: str, job_id: str, tracer_name: str | None) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_job_id", job_id)
        object.__setattr__(self, "_tracer_name", tracer_name)

    def _message(self) -> str:
        name, job_id, tracer = self._name, self._job_id, self._tracer_name
        if tracer:
            fetch = f"values = {tracer}.job.result()   # waits for the job\n{name} = values[{name!r}]"
        else:
            fetch = (f"values = interlace.attach({job_id!r}).result()   # waits for the job\n{name} = values[{name!r}]\n"
                     f"# or name the trace: `with model.trace(x, remote=True, blocking=False) as tracer:`")
        return (
            f"`{name}` has no value yet: the trace was submitted without waiting (blocking=False, "
            f"job {job_id!r}), so its saved values are still on the server. Get them with:\n\n{fetch}\n\n"
            "(Only saved values come back: the dict has no entry for a name the body did not save.)"
        )

    def __repr__(self) -> str:
        return f"<{self._name}: not fetched yet (blocking=False, job {self._job_id!r}); use .job.result()>"


def not_waited_values(trace: CapturedTrace, job_id: str) -> dict[str, NotWaited]:
    """Placeholders for the names a non-blocking trace would have bound: those the body
    visibly saves, and those it assigns that the caller does not have yet."""
    block = trace.block
    names = set(block.saved_names)
    names |= {n for n in block.stored_names if trace.lookup(n) is MISSING}
    names.discard(block.as_name)
    return {name: NotWaited(name, job_id, block.as_name) for name in sorted(names)}
