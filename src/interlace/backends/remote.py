"""`remote=True`: send the trace to an Interlace server, follow its status, fetch the result."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..remote.policy import DEFAULT_POLICY, Policy
from ..remote.problems import RemoteValidationError
from ..remote.result import decode_result
from .remote_common import encode_for_remote, model_key_of

if TYPE_CHECKING:
    from ..tracing.tracer import Tracer

__all__ = ["RemoteBackend", "RemoteJob", "attach"]


class RemoteJob:
    """A submitted job: `.id`, `.status()`, `.result()` (the saved values as a dict),
    `await .async_result()`."""

    def __init__(self, job: Any) -> None:
        self._job = job
        self.id: str = job.id

    def __repr__(self) -> str:
        return f"RemoteJob(id={self.id!r})"

    def status(self) -> dict[str, Any]:
        return self._job.status()

    def result(self, timeout: float | None = None, display: Any = None) -> dict[str, Any]:
        from .client import RemoteException

        try:
            return decode_result(self._job.wait(display=display, timeout=timeout))
        except RemoteException:
            raise

    async def async_result(self, display: Any = None) -> dict[str, Any]:
        return decode_result(await self._job.await_result(display=display))

    def cancel(self) -> dict[str, Any]:
        return self._job.cancel()


def attach(job_id: str, *, host: str | None = None, api_key: str | None = None) -> RemoteJob:
    """Re-attach to a job by id (from another process, or after a disconnect)."""
    from .client import shared_client

    return RemoteJob(shared_client(host, api_key).job(job_id))


class RemoteBackend:
    def __init__(
        self,
        model: Any,
        *,
        blocking: bool = True,
        callback: str | None = None,
        host: str | None = None,
        api_key: str | None = None,
        strict_remote: bool = False,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.blocking = blocking
        self.callback = callback
        self.host = host
        self.api_key = api_key
        self.strict_remote = strict_remote
        self.verbose = verbose

    def __call__(self, tracer: "Tracer") -> dict[str, Any]:
        from .client import RemoteRequestError, shared_client

        client = shared_client(self.host, self.api_key)
        try:
            policy = Policy.model_validate(client.policy(cached=True))
        except RemoteRequestError:
            policy = DEFAULT_POLICY
        payload, _ = encode_for_remote(tracer, model_key_of(self.model), policy, strict_remote=self.strict_remote)
        try:
            job = client.submit(payload, callback=self.callback)
        except RemoteRequestError as e:
            if e.problems:
                raise RemoteValidationError(e.problems) from None
            raise
        remote_job = RemoteJob(job)
        tracer.job = remote_job
        if not self.blocking:
            return {}
        return decode_result(job.wait(display=True if self.verbose else None))
