"""`remote='local'`: the full remote path, in-process, against the local model.

Serialize (`outbound.py`) → receive: decode and validate (`execution.receive`) → run beside
the model and encode the result (`execution.run`) → decode the result (`contract.result`).
Each step is the function the client and the server use, so what passes here passes remotely
and what fails remotely fails here, with the same message. It is to the server what httpx's
ASGITransport is to a web app: the real thing, in process.

A body's `with interlace.local():` blocks run on the caller's side of the same conversation a
server holds with its client: the trace's `LocalBlockRunner` (`local_runner.py`) is the job's
`LocalPeer`, so values cross as bytes in the wire's codec both ways. When a block raises, the
caller gets that very exception (their traceback and line), as from a server.

`isolate=True` (or `interlace.CONFIG.APP.ISOLATE_LOCAL`) adds the server's layer 3: the job
runs in a confined worker process (`execution/process.py`) that loaded the model from the
same files the caller's model came from (its path or hub id), one worker per model, kept for
the session. That worker's model is the one on disk: changes the caller made to its own
model in memory (weights set by hand) are not in it, as they would not be on a server.

Each run is recorded in the local job history (`history_store.JobRun`, finished in
`run_payload` however the run ends); `run_payload` is also how `interlace.jobs.rerun` replays
recorded request bytes here.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from typing import Any

from ..contract.problems import RemoteValidationError
from ..errors import RemoteException
from ..contract.code.decode import shipped_model_refs
from ..config import CONFIG
from ..contract.policy import Policy
from ..contract.result import decode_result
from ..execution.errors import BadRequest, JobFailed
from ..execution.process import WorkerSpec, WorkerSupervisor
from ..execution.receive import prepare_payload
from ..execution.run import run_prepared
from ..tracing.backend import CapturedTrace
from .history_store import JobRun, ModelNotFromFiles, model_load_spec
from .local_runner import runner_for
from .outbound import encode_for_remote, model_key_of, policy_for_simulation, warn_if_large

__all__ = ["LocalSimulationBackend", "MSG_NOT_FROM_FILES", "close_isolated_workers", "receive_as_server"]

MSG_NOT_FROM_FILES = (
    "`isolate=True` runs the job in a worker process that loads the model from its files, but "
    "this {kind} was not loaded from a path or hub id, so there is nothing to load. Load it with "
    "`interlace.LanguageModel(path_or_hub_id)`, or trace without `isolate=True`."
)


def receive_as_server(payload: bytes, policy: Policy, models: dict[str, Any]) -> Any:
    """`execution.receive.prepare_payload`, with a refusal raised as the user sees a server's:
    RemoteValidationError with the problems, else RemoteException with the HTTP status. Every
    in-process remote mode (this simulation, dry runs) receives a payload through here."""
    try:
        return prepare_payload(payload, policy, models)
    except BadRequest as e:
        if e.problems:
            raise RemoteValidationError(e.problems) from None
        raise RemoteException(e.message, category=f"HTTP {e.status}") from None


class LocalSimulationBackend:
    """Runs traces through serialize, validate, deserialize and execute, in-process.

    `last_payload_size` is the size in bytes of the last request; `get_last_payload()` returns
    its bytes.
    """

    def __init__(
        self,
        model: Any,
        verbose: bool = False,
        *,
        strict_remote: bool = False,
        max_upload_mb: float = 10.0,
        policy: Any = None,
        isolate: bool | None = None,
    ) -> None:
        self.model = model
        self.verbose = verbose
        self.strict_remote = strict_remote
        self.max_upload_mb = max_upload_mb
        self.policy = policy
        self.isolate = CONFIG.APP.ISOLATE_LOCAL if isolate is None else bool(isolate)
        self.last_payload_size = 0
        self._last_payload: bytes | None = None
        #: The modules `mocks=` replaced in this backend's runs (set by `mocks.with_mocks`,
        #: which applies them around each call), as the user wrote them: for the job history.
        self.mocked: tuple[str, ...] = ()

    def get_last_payload(self) -> bytes | None:
        return self._last_payload

    def __call__(self, trace: CapturedTrace) -> dict[str, Any]:
        policy = self.policy or policy_for_simulation()
        key = model_key_of(self.model, simulation=True)
        payload, built = encode_for_remote(trace, key, policy, strict_remote=self.strict_remote)
        self.last_payload_size = len(payload)
        self._last_payload = payload
        if self.verbose:
            request = built.request
            print(f"[LocalSimulation] Serialized payload: {len(payload)} bytes")
            print(f"[LocalSimulation] Variables: {sorted(request.variables)}")
            print(f"[LocalSimulation] Remote objects: {request.remote_objects}")
            print(f"[LocalSimulation] Model refs: {sorted(request.model_refs)}")
            shipped_refs = shipped_model_refs(request)
            if shipped_refs:
                print(f"[LocalSimulation] Model refs in shipped code: {shipped_refs}")
        warn_if_large(payload, self.max_upload_mb)
        run = JobRun.for_trace("local", trace, key, mocked=self.mocked)
        return decode_result(self.run_payload(payload, key, policy, trace=trace, run=run))

    def run_payload(self, payload: bytes, key: str, policy: Policy, *, trace: CapturedTrace | None = None,
                    run: JobRun | None = None) -> bytes:
        """Receive and run request bytes as a server would, against this backend's model under
        `key`; the result bytes. `trace`: whose `with interlace.local():` blocks run here.
        `run`: the job history's record of it (`history_store.py`), finished however it ends.
        `interlace.jobs.rerun` replays a recorded payload through here."""
        try:
            result = self._receive_and_run(payload, key, policy, trace, run)
        except BaseException as error:
            if run is not None:
                run.finish(payload, error=error)
            raise
        if run is not None:
            run.finish(payload, result=result)
        return result

    def _receive_and_run(self, payload: bytes, key: str, policy: Policy, trace: CapturedTrace | None,
                         run: JobRun | None) -> bytes:
        prepared = receive_as_server(payload, policy, {key: self.model})
        if run is not None:
            run.status("RUNNING")
        # The body's `with interlace.local():` blocks run here, on the caller's side of the
        # same conversation a server holds with its client (`contract/local_block.py`).
        runner = runner_for(trace, policy) if trace is not None else None
        try:
            if self.isolate:
                return _isolated_worker(self.model, key, policy).run(payload, _log, local=runner)
            return run_prepared(prepared, self.model, policy, log=_log, local=runner)
        except JobFailed as e:
            failed = e
        finally:
            if runner is not None:
                runner.close()  # a block left waiting for a read when the job ended
        if runner is not None and runner.failure is not None and failed.category.startswith("local-block"):
            # The block's own exception, with the user's traceback and line (raised outside
            # the `except` so that it does not chain the job's failure).
            raise runner.failure
        raise RemoteException(failed.traceback_text, category=failed.category)


def _log(line: str) -> None:
    print(line, file=sys.stdout)


# One worker per (model files, key, policy), kept for the session: starting one costs
# seconds (Python, torch and the weights), a job on a running one about a millisecond more
# than in-process.
_WORKERS: dict[tuple[str, str, str], WorkerSupervisor] = {}
_WORKERS_LOCK = threading.Lock()


def _isolated_worker(model: Any, key: str, policy: Policy) -> WorkerSupervisor:
    spec = _model_spec(model)
    cache_key = (json.dumps(spec, sort_keys=True), key, policy.model_dump_json())
    with _WORKERS_LOCK:
        supervisor = _WORKERS.get(cache_key)
        if supervisor is None:
            path = spec["path"]
            read = (os.path.realpath(path),) if os.path.exists(path) else ()
            supervisor = WorkerSupervisor(WorkerSpec(key, spec, read_paths=read), policy)
            _WORKERS[cache_key] = supervisor
    return supervisor


def _model_spec(model: Any) -> dict[str, Any]:
    """How a worker loads the caller's model: its path or hub id, with its load options."""
    try:
        return model_load_spec(model)
    except ModelNotFromFiles as e:
        if e.option is None:
            raise RemoteException(MSG_NOT_FROM_FILES.format(kind=e.kind), category="isolate") from None
        name, value = e.option
        raise RemoteException(
            f"`isolate=True` cannot pass the load option {name}={value!r} to the worker process "
            "(only plain values travel); load the model without it, or trace without `isolate=True`.",
            category="isolate",
        ) from None


def close_isolated_workers() -> None:
    """Stop the worker processes of `isolate=True` (also done at exit)."""
    with _WORKERS_LOCK:
        workers = list(_WORKERS.values())
        _WORKERS.clear()
    for supervisor in workers:
        supervisor.close()


atexit.register(close_isolated_workers)

