"""The seam between the server and the engine, and the shapes the server speaks in.

The server never looks inside payloads or results: a `JobRunner` decodes and validates a
payload on receipt (`prepare`) and executes it later (`run`). The server persists the raw
payload bytes, so after a restart it simply calls `prepare` again.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class PreparedJob(Protocol):
    """What `JobRunner.prepare` returns; the server only reads `model_key`."""

    model_key: str


@runtime_checkable
class JobRunner(Protocol):
    def prepare(self, payload: bytes) -> PreparedJob:
        """Decode and validate; raise `errors.BadRequest` (400/404/413/422) if unacceptable."""
        ...

    def run(self, job: PreparedJob, log: Callable[[str], None]) -> bytes:
        """Execute; return the encoded result bytes (opaque to the server).

        `log(line)` streams the user's print output as LOG statuses. Raise
        `errors.JobFailed(traceback_text, category)` when the job fails.
        """
        ...

    def model_keys(self) -> list[str]:
        """Keys of the hosted models; one worker thread serves each."""
        ...

    def policy(self) -> dict[str, Any]:
        """JSON-able server policy (limits, allowed modules), served at GET /v1/policy."""
        ...


class JobStatus(str, enum.Enum):
    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    LOG = "LOG"  # an event, never a stored job state
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


# A job in one of these states will not change again except by expiry.
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED, JobStatus.EXPIRED})
# States the worker pool still owes work for; requeued after a restart.
PENDING = frozenset({JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING})

LogFn = Callable[[str], None]
