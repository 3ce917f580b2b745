"""`remote=True`: send the trace to an Interlace server, follow its status, fetch the result."""

from __future__ import annotations

from typing import Any

from ..contract.http import TERMINAL
from ..contract.local_block import LocalPeer
from ..contract.policy import DEFAULT_POLICY, Policy
from ..contract.problems import RemoteValidationError
from ..contract.result import decode_result
from ..tracing.backend import CapturedTrace, TraceOutcome
from .history_store import JobRun
from .pending import not_waited_values
from .outbound import encode_for_remote, model_key_of, warn_if_large

__all__ = ["RemoteBackend", "RemoteJob", "attach"]


class RemoteJob:
    """A submitted job: `.id`, `.status()`, `.result()` (the saved values as a dict),
    `await .async_result()`.

    The RemoteJob a trace returned (`blocking=False`) holds the trace's local-block runner, so
    waiting on it runs the trace's `with interlace.local():` blocks here as the job reaches
    them. One re-attached by id (`attach`) has none: it cannot run them (their code never left
    the submitting process), says so when the job waits for one, and the job then fails after
    the server's grace period (`interlace serve --local-grace`)."""

    def __init__(self, job: Any, local: LocalPeer | None = None, run: JobRun | None = None,
                 payload: bytes = b"") -> None:
        self._job = job
        self._local = local
        # The job history's record, finished when the job's result or failure is seen here.
        self._run = run
        self._payload = payload
        self.id: str = job.id

    def __repr__(self) -> str:
        return f"RemoteJob(id={self.id!r})"

    def status(self) -> dict[str, Any]:
        return self._job.status()

    def result(self, timeout: float | None = None, display: Any = None) -> dict[str, Any]:
        return decode_result(self._result_bytes(timeout, display))

    async def async_result(self, display: Any = None) -> dict[str, Any]:
        try:
            data = await self._job.await_result(display=display, local=self._local)
        except BaseException as error:
            self._record(error=error)
            raise
        self._record(result=data)
        return decode_result(data)

    def _result_bytes(self, timeout: float | None, display: Any) -> bytes:
        try:
            data = self._job.wait(display=display, timeout=timeout, local=self._local)
        except BaseException as error:
            self._record(error=error)
            raise
        self._record(result=data)
        return data

    def _record(self, *, result: bytes | None = None, error: BaseException | None = None) -> None:
        run = self._run
        if run is None or run.finished:
            return
        final = getattr(self._job, "last_status", None) or {}
        if error is not None and final.get("status") not in TERMINAL:
            # Not the job's end (a timeout, a lost connection, Ctrl-C): it runs on, so the
            # record says where it stands, and is finished when a later wait sees its end.
            run.submitted(self._payload, self.id, final)
            return
        run.finish(self._payload, result=result, error=error, server_status=final,
                   server_timeline=getattr(self._job, "timeline", ()))

    def cancel(self) -> dict[str, Any]:
        return self._job.cancel()


def attach(job_id: str, *, host: str | None = None, api_key: str | None = None) -> RemoteJob:
    """Re-attach to a job by id (from another process, or after a disconnect)."""
    from .client import shared_client

    return RemoteJob(shared_client(host, api_key).job(job_id))


class RemoteBackend:
    """`model.trace(x, backend=RemoteBackend(model_key="org/name"))`, or chosen by `remote=True`.

    The job runs on the server's model named `model_key` (default: the traced model's key);
    nnsight's spelling `RemoteBackend("org/name")` works too.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        model_key: str | None = None,
        blocking: bool = True,
        callback: str | None = None,
        host: str | None = None,
        api_key: str | None = None,
        strict_remote: bool = False,
        verbose: bool = False,
        max_upload_mb: float = 10.0,
    ) -> None:
        if isinstance(model, str) and model_key is None:  # nnsight: RemoteBackend(model_key, ...)
            model, model_key = None, model
        if model_key is not None and (not isinstance(model_key, str) or not model_key):
            raise TypeError(f"model_key must be the non-empty key of a hosted model, got {model_key!r}.")
        self.model = model
        self.model_key = model_key
        self.blocking = blocking
        self.callback = callback
        self.host = host
        self.api_key = api_key
        self.strict_remote = strict_remote
        self.verbose = verbose
        self.max_upload_mb = max_upload_mb
        self.job_id: str | None = None  # as nnsight's: the id of the last job submitted

    def __call__(self, trace: CapturedTrace) -> TraceOutcome:
        from .client import RemoteRequestError, shared_client
        from .local_runner import runner_for

        client = shared_client(self.host, self.api_key)
        try:
            policy = Policy.model_validate(client.policy(cached=True))
        except RemoteRequestError:
            policy = DEFAULT_POLICY
        key = self.model_key or model_key_of(self.model if self.model is not None else trace.model)
        payload, _ = encode_for_remote(trace, key, policy, strict_remote=self.strict_remote)
        warn_if_large(payload, self.max_upload_mb)
        # The body's `with interlace.local():` blocks run here, served while the job is followed
        # (made before sending: a block that cannot run here must not leave a job behind).
        local = runner_for(trace, policy)
        return self.send(payload, trace=trace, local=local, run=JobRun.for_trace("server", trace, key, host=client.host))

    def send(self, payload: bytes, *, trace: CapturedTrace | None = None, local: LocalPeer | None = None,
             run: JobRun | None = None) -> TraceOutcome:
        """Submit request bytes and follow the job to its result (unless `blocking=False`, which
        needs the `trace` for its placeholders). `local`: the runner of the body's local blocks;
        `run`: the job history's record. `interlace.jobs.rerun` replays a payload through here."""
        from .client import RemoteRequestError, shared_client

        client = shared_client(self.host, self.api_key)
        try:
            job = client.submit(payload, callback=self.callback)
        except RemoteRequestError as e:
            if e.problems:
                raise RemoteValidationError(e.problems) from None
            raise
        if run is not None:
            run.server_job_id = job.id
        remote_job = RemoteJob(job, local, run, payload)
        self.job_id = remote_job.id
        if not self.blocking and trace is not None:
            if run is not None:
                run.submitted(payload, job.id, job.last_status)
            # Nothing to bind yet; each saved name says how to fetch its value when used.
            return TraceOutcome(not_waited_values(trace, remote_job.id), remote_job, pending=True)
        data = remote_job._result_bytes(None, True if self.verbose else None)
        return TraceOutcome(decode_result(data), remote_job)
