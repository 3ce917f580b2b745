"""The seam between the server and the engine.

The server never looks inside payloads or results: a `JobRunner` decodes and validates a
payload on receipt (`prepare`) and executes it later (`run`). The server persists the raw
payload bytes, so after a restart it simply calls `prepare` again. The job states the server
speaks in are the protocol's: `interlace.contract.http.JobStatus`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..contract.local_block import LocalPeer
    from ..execution.cobatch import BatchLimits, JobOutcome, ShareKey

__all__ = ["BatchingJobRunner", "PreparedJob", "JobRunner", "LogFn"]


@runtime_checkable
class PreparedJob(Protocol):
    """What `JobRunner.prepare` returns; the server only reads `model_key`."""

    model_key: str


@runtime_checkable
class JobRunner(Protocol):
    def prepare(self, payload: bytes) -> PreparedJob:
        """Decode and validate; raise `errors.BadRequest` (400/404/413/422) if unacceptable."""
        ...

    def run(self, job: PreparedJob, log: Callable[[str], None], local: "LocalPeer | None" = None) -> bytes:
        """Execute; return the encoded result bytes (opaque to the server).

        `log(line)` streams the user's print output as LOG statuses. `local` is the job's side
        of `with interlace.local():` blocks (`server/local_exchange.py`: it waits for the
        client over HTTP); pass it down to the execution layer. Raise
        `errors.JobFailed(traceback_text, category)` when the job fails.
        """
        ...

    def model_keys(self) -> list[str]:
        """Keys of the hosted models; one worker thread serves each."""
        ...

    def policy(self) -> dict[str, Any]:
        """JSON-able server policy (limits, allowed modules), served at GET /v1/policy."""
        ...


# Optional on a runner (read with getattr; absent means the embedded default):
#   concurrency(model_key) -> int: how many of the model's jobs (or co-batches) may run at
#       once: its replicas (`--ray --replicas N`); the pool runs that many worker threads for
#       the model. Default 1.
#   model_states() -> dict[model_key, dict]: where each model is and whether it is loaded:
#       {"state": "hot" | "loading" | "cold", "replicas": [{"id", "node", "busy"}...]};
#       merged into GET /v1/status. Default: every model hot, in this process.


@runtime_checkable
class BatchingJobRunner(JobRunner, Protocol):
    """A runner that can run several queued jobs of one model as one batched forward
    (co-batching; the rule for which jobs may share is `execution/cobatch.py`)."""

    def share_key(self, job: PreparedJob) -> "ShareKey | None":
        """Jobs with equal keys may be run together by `run_batch`; None: the job runs alone."""
        ...

    def rows(self, job: PreparedJob) -> int:
        """How many batch rows the job's input takes (an estimate before tokenizing)."""
        ...

    def run_batch(self, jobs: list[PreparedJob], limits: "BatchLimits") -> "list[JobOutcome]":
        """Run `jobs` (equal `share_key`s, one model); one outcome per job, in order. A job's
        failure is its outcome's `failure`, never an exception; its printed lines come in
        its outcome's `logs`. No local blocks: jobs that have them never share."""
        ...


LogFn = Callable[[str], None]
