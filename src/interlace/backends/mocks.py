"""`mocks=` on the client side: the backend that runs a trace with stand-ins, and the modes
that refuse them.

The engine applies stand-ins (`tracing/mock.py`); this file decides where they may apply.
`remote=False` runs the body here; `remote='local'` runs the server's whole path in this
process against the same model object, so the stand-ins are in place on its simulated
server side too. Never on a server: `contract/options.py` refuses `mocks=` with
`remote=True` before anything is built or sent, and a trace inside a shipped session (which
runs on the server, or in its simulation, as the server would) refuses it too
(`MSG_MOCKS_IN_SHIPPED`). `isolate=True` is refused: its worker process cannot run the
caller's stand-ins (`MSG_MOCKS_ISOLATE`).

The job history records which modules a simulated run mocked (`LocalSimulationBackend.mocked`,
`history_store.JobRun`), and never reruns such a record on a server.
"""

from __future__ import annotations

from typing import Any

from ..contract.options import TraceOptionError
from ..tracing.backend import CapturedTrace, TraceOutcome
from ..tracing import Mock, mocks_applied, resolve_mocks

__all__ = ["MSG_MOCKS_IN_SHIPPED", "MSG_MOCKS_ISOLATE", "MockedBackend", "with_mocks"]

MSG_MOCKS_ISOLATE = (
    "`mocks=` cannot be used with `isolate=True`: the isolated job runs in a worker process that "
    "loads the model from its files, and your stand-ins are code in this process, which the "
    "worker cannot run. Trace with `remote='local'` without `isolate=True` (the stand-ins then "
    "apply on the simulated server side, in this process), or drop `mocks=`."
)

MSG_MOCKS_IN_SHIPPED = (
    "`mocks=` on a trace inside a session that runs on a server (or its simulation): the trace "
    "runs there, where your stand-ins cannot, and a mocked run never goes to a server. Put "
    "`mocks=` on the session and run it in this process; it then applies to every trace in it:\n\n"
    "    with model.session(remote='local', mocks={\"transformer.h.0.mlp\": stand_in}):\n"
    "        with model.trace(prompt):\n            ..."
)


class MockedBackend:
    """Runs `inner` (the local backend or the simulation) with `mocks` applied to `model`."""

    def __init__(self, model: Any, mocks: tuple[Mock, ...], inner: Any, *, load: bool = True) -> None:
        self.model = model
        self.mocks = mocks
        self.inner = inner
        self.load = load

    @property
    def mocked(self) -> tuple[str, ...]:
        """The mocked paths, as the user wrote them."""
        return tuple(m.key for m in self.mocks)

    def __call__(self, trace: CapturedTrace) -> "dict[str, Any] | TraceOutcome":
        with mocks_applied(self.model, self.mocks, load=self.load):
            return self.inner(trace)

    def __getattr__(self, name: str) -> Any:
        # The inner backend's own attributes (`last_payload_size`, `get_last_payload`, ...).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


def with_mocks(model: Any, mocks: Any, backend: Any, *, load: bool = True) -> Any:
    """`backend` with `mocks=` applied around each run, once the mocks are checked against the
    model (an unknown path or a stand-in that cannot run fails here, at `model.trace(...)`).
    `load=False` for a dry run: the stand-ins go on the modules as they are, without weights,
    and run on fake tensors like the rest of the forward."""
    resolved = resolve_mocks(model, mocks)
    if not resolved:
        return backend
    if getattr(backend, "isolate", False):
        raise TraceOptionError(MSG_MOCKS_ISOLATE)
    if hasattr(backend, "mocked"):  # the simulation records them in the job history
        backend.mocked = tuple(m.key for m in resolved)
    return MockedBackend(model, resolved, backend, load=load)
