"""The engine's seam: a backend takes a captured trace and gives back the values to bind.

As httpx's transport takes a request and returns a response, a backend is typed by data: a
tracer captures its `with` block into a `CapturedTrace` (a frozen value) and hands it to its
backend; the backend returns the saved values (a dict), or a `TraceOutcome` when it has more
to say (the remote job a run was submitted as). Backends never write into the tracer.

Three backends exist. `LocalBackend` (here, because the engine runs traces without any other
package) runs the body in this process; `backends/` holds the two that serialize the trace,
for the local simulation and for a server; `backends.select_backend` is the one place that
chooses between them. A user may pass any object with this `__call__` as `backend=`.

`forced_local()` says whether a shipped body is running (the execution layer sets it): a
trace nested inside a shipped session then runs on the hosted model, whatever its options say.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Protocol

from .capture import Block
from .namespace import MISSING, FrameNames, body_namespace, new_namespace

if TYPE_CHECKING:
    from .host import Host


class BodyContext(Protocol):
    """The context a captured body runs in (a `Tracer`), as `LocalBackend` uses it."""

    def run(self, ns: dict[str, Any]) -> dict[str, Any]:
        """Run the body in `ns` (and, for a trace, the model beside it); the names to bind
        in the caller. A failure carries the values saved before it."""


__all__ = [
    "Backend", "BodyContext", "CapturedTrace", "LocalBackend", "TraceOutcome", "caller_namespace", "forced_local",
    "running_shipped_body",
]


class CapturedTrace(NamedTuple):
    """What a `with model.trace(...)` (or `generate`, `session`, ...) block captured.

    A NamedTuple: immutable, typed, and cheap enough to build on every local trace.
    """

    #: "trace", "generate", "session" (the request kinds), or an engine-only kind ("scan", "edit").
    kind: str
    #: The body: source, compiled code, the names it reads, stores and saves.
    block: Block
    #: The traced call's positional inputs and options, as the user wrote them.
    args: tuple
    kwargs: Mapping[str, Any]
    #: A name's value in the caller (its locals, then its globals), or `namespace.MISSING`.
    lookup: Callable[[str], Any]
    #: The model the block traces (None for a model-less session).
    model: "Host | None"
    #: The context the body runs in: what `LocalBackend` runs (`tracer.run`), and what the
    #: body's `as` name is bound to.
    tracer: BodyContext


class TraceOutcome(NamedTuple):
    """A backend's answer when it carries more than the values: `job` is the server job the
    trace ran as (`tracer.job` afterwards), or None; `pending` says the values are
    placeholders for results still on the server (a run that did not wait for them)."""

    values: dict[str, Any]
    job: Any = None
    pending: bool = False


class Backend(Protocol):
    """Runs a captured trace; returns the names to bind in the caller (saved values)."""

    def __call__(self, trace: CapturedTrace) -> "dict[str, Any] | TraceOutcome": ...


class LocalBackend:
    """`remote=False`: no serialization; the body reads the caller's variables directly.

    (A tracer given this backend runs itself without building the captured value first,
    `Tracer._run_backend`: the same steps, one object fewer on every local trace.)"""

    def __call__(self, trace: CapturedTrace) -> dict[str, Any]:
        tracer, block = trace.tracer, trace.block
        ns = caller_namespace(block, trace.lookup)
        if block.as_name:
            ns[block.as_name] = tracer
        return tracer.run(ns)


def caller_namespace(block: Block, lookup: Callable[[str], Any]) -> dict[str, Any]:
    """The body's namespace: the helpers, and the names it reads that the caller has."""
    if type(lookup) is FrameNames:  # a frame: read it in one pass
        return new_namespace(block, lookup.frame)
    name = lookup("__name__")
    ns = body_namespace(name=name if type(name) is str else "__main__")
    missing = MISSING
    for name in block.loaded_names:
        value = lookup(name)
        if value is not missing:
            ns[name] = value
    return ns


class _ShippedDepth(threading.local):
    depth = 0


_shipped = _ShippedDepth()


def forced_local() -> bool:
    """True while a shipped body runs in this thread (its nested traces run locally)."""
    return _shipped.depth > 0


class running_shipped_body:
    """`with running_shipped_body():` marks this thread as running a shipped body."""

    def __enter__(self) -> None:
        _shipped.depth += 1

    def __exit__(self, *exc: Any) -> None:
        _shipped.depth -= 1
