"""Worker processes, the parent's side: one per hosted model, fed jobs, replaced when it dies.

`WorkerProcess` (`worker_process.py`, re-exported here) is one confined worker: how it is
started, the limits it is killed at, how its death is named. `WorkerSupervisor` (here) keeps
one worker alive for a model: it starts a fresh one when the last died or asked to be
recycled, retries a job once when its worker was already gone before the job reached it,
and turns a death during a job into `JobFailed` with the reason. No job is lost: each one
returns result bytes or raises `JobFailed`.

Co-batches (`run_batch`, `cobatch.py`) go to the worker as one message. A worker that dies
or is killed during a batch takes no job's result with it: the supervisor replaces it and
runs every job of the batch again alone, through the single-job path, each with its own
limits, so a job that kills its worker alone gets the usual reason and the others complete.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

from ..contract.local_block import LocalPeer
from ..contract.policy import Policy
from .cobatch import BatchLimits, JobOutcome
from .errors import JobFailed
from .worker_process import (
    ENTRY_MODULE,
    KEPT_ENV,
    WorkerDied,
    WorkerProcess,
    WorkerSpec,
    WorkerStartError,
    describe_death,
)

__all__ = [
    "ENTRY_MODULE", "KEPT_ENV", "WorkerDied", "WorkerProcess", "WorkerSpec", "WorkerStartError", "WorkerSupervisor",
    "describe_death",
]

log = logging.getLogger("interlace.worker")

MSG_WORKER_START = ("WorkerError: {error}\nThis is a server problem, not your code; report it to the server's "
                    "operator.")


class WorkerSupervisor:
    """Keeps one worker for a model; runs its jobs (alone or co-batched) one at a time;
    replaces it when it dies."""

    def __init__(self, spec: WorkerSpec, policy: Policy, *, sandbox: bool | None = None,
                 start_timeout: float = 600.0) -> None:
        self.spec = spec
        self.policy = policy
        self.sandbox = sandbox
        self.start_timeout = start_timeout
        self.worker: WorkerProcess | None = None
        self.meta: Any = None
        self.layers: dict[str, bool] = {}
        self.restarts = 0
        self._lock = threading.Lock()

    def start(self) -> "WorkerSupervisor":
        with self._lock:
            self._ensure()
        return self

    def _ensure(self) -> WorkerProcess:
        if self.worker is None or not self.worker.alive:
            if self.worker is not None:
                self.worker.close()
                self.restarts += 1
            self.worker = None
            worker = WorkerProcess(self.spec, self.policy, sandbox=self.sandbox).start(self.start_timeout)
            self.worker, self.meta, self.layers = worker, worker.meta, worker.layers
        return self.worker

    def run(self, payload: bytes, log_line: Callable[[str], None], local: LocalPeer | None = None) -> bytes:
        """Run one job on the worker (`WorkerProcess.run`); result bytes, or JobFailed."""
        with self._lock:
            return self._run_alone(payload, log_line, local)

    def _run_alone(self, payload: bytes, log_line: Callable[[str], None], local: LocalPeer | None) -> bytes:
        for attempt in (1, 2):
            try:
                worker = self._ensure()
            except WorkerStartError as exc:
                raise JobFailed(MSG_WORKER_START.format(error=exc), "internal") from None
            try:
                result, recycle = worker.run(payload, log_line, local)
            except WorkerDied as died:
                self._drop()
                if not died.started and attempt == 1:
                    continue  # it never reached the job: run it on a fresh worker, once
                raise JobFailed(f"WorkerDied: {died.reason}", died.category) from None
            except JobFailed as failed:
                if getattr(failed, "recycle", False):
                    self._drop()
                raise
            if recycle:
                self._drop()
            return result
        raise AssertionError("unreachable")

    def run_batch(self, payloads: Sequence[bytes], limits: BatchLimits) -> list[JobOutcome]:
        """Run several jobs' payloads as one co-batch on the worker (`WorkerProcess.run_batch`);
        one `JobOutcome` per payload, in order, each job's printed lines in its `logs`. Never
        raises for a job: a failure is that job's outcome."""
        if not payloads:
            return []
        with self._lock:
            for attempt in (1, 2):
                try:
                    worker = self._ensure()
                except WorkerStartError as exc:
                    # Every job would meet the same broken start: one try, the same answer.
                    text = MSG_WORKER_START.format(error=exc)
                    return [JobOutcome(failure=JobFailed(text, "internal")) for _ in payloads]
                try:
                    outcomes, recycle = worker.run_batch(payloads, limits)
                except WorkerDied as died:
                    self._drop()
                    if not died.started and attempt == 1:
                        continue  # it never reached the batch: run it on a fresh worker, once
                    log.warning("worker[%s] ended during a batch of %d jobs (%s); running each alone",
                                self.spec.key, len(payloads), died.reason)
                    return [self._outcome_alone(payload) for payload in payloads]
                if recycle:
                    self._drop()
                return outcomes
        raise AssertionError("unreachable")

    def _outcome_alone(self, payload: bytes) -> JobOutcome:
        """One job of a lost batch, run again alone (its own worker, wall clock and limits):
        a job that kills its worker fails with the reason, as it would have outside a batch."""
        outcome = JobOutcome()
        try:
            outcome.result = self._run_alone(payload, outcome.logs.append, None)
        except JobFailed as failed:
            outcome.failure = failed
        return outcome

    def _drop(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
            self.restarts += 1

    def close(self) -> None:
        with self._lock:
            if self.worker is not None:
                self.worker.close()
                self.worker = None
