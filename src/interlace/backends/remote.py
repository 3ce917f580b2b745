"""`remote=True`: send the trace to an Interlace server, follow its status, fetch the result."""

from __future__ import annotations

from typing import Any

from ..contract.local_block import LocalPeer
from ..contract.policy import DEFAULT_POLICY, Policy
from ..contract.problems import RemoteValidationError
from ..contract.result import decode_result
from ..tracing.backend import CapturedTrace, TraceOutcome
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

    def __init__(self, job: Any, local: LocalPeer | None = None) -> None:
        self._job = job
        self._local = local
        self.id: str = job.id

    def __repr__(self) -> str:
        return f"RemoteJob(id={self.id!r})"

    def status(self) -> dict[str, Any]:
        return self._job.status()

    def result(self, timeout: float | None = None, display: Any = None) -> dict[str, Any]:
        return decode_result(self._job.wait(display=display, timeout=timeout, local=self._local))

    async def async_result(self, display: Any = None) -> dict[str, Any]:
        return decode_result(await self._job.await_result(display=display, local=self._local))

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
        try:
            job = client.submit(payload, callback=self.callback)
        except RemoteRequestError as e:
            if e.problems:
                raise RemoteValidationError(e.problems) from None
            raise
        remote_job = RemoteJob(job, local)
        self.job_id = remote_job.id
        if not self.blocking:
            # Nothing to bind yet; each saved name says how to fetch its value when used.
            return TraceOutcome(not_waited_values(trace, remote_job.id), remote_job, pending=True)
        data = job.wait(display=True if self.verbose else None, local=local)
        return TraceOutcome(decode_result(data), remote_job)
