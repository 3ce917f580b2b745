"""The in-process worker pool: one thread per hosted model, FIFO per model.

Jobs for one model run one at a time, in order, because they share the model's module tree
(hooks, weights); different models run in parallel. The queue lives in memory; the job store
holds the truth, and a restarted server rebuilds these queues from it.

Co-batching (`execution/cobatch.py` says which jobs may share a forward): with `limits`, a
worker that takes the head job with a `share_key` also takes every queued job with an equal
key, oldest first, up to `limits.max_rows` rows, and waits at most `limits.wait_seconds` in
all for more; it hands them to `execute` as one batch. The jobs left keep their order, and a
job without a key runs alone, as without co-batching. Token counts are not known here
(rows are the runner's estimate before tokenizing); `run_batch` keeps `max_tokens`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable

from ..execution.cobatch import BatchLimits
from .types import PreparedJob

__all__ = ["Execute", "QueuedJob", "ModelWorker", "WorkerPool"]

log = logging.getLogger("interlace.server")


@dataclass
class QueuedJob:
    job_id: str
    prepared: PreparedJob
    attempts: int = 0  # times the job already started (and was interrupted by a crash)
    # Co-batching (computed once, by the runner, when the job is queued): jobs with equal keys
    # may share a forward; None runs alone. `rows`: the batch rows its input takes.
    share_key: Hashable | None = None
    rows: int = 1


# Called by a worker with the jobs it took: one job, or several with equal share keys.
Execute = Callable[[list[QueuedJob]], None]
# Called by a worker after it took a job: (model key, ids still waiting, in order).
OnMoved = Callable[[str, list[str]], None]


class ModelWorker:
    """One model's queue and the thread that runs it. `limits`: co-batch (see the module
    docstring); None or `enabled=False`: every job runs alone."""

    def __init__(self, model_key: str, execute: Execute, on_moved: OnMoved, limits: BatchLimits | None = None) -> None:
        self.model_key = model_key
        self._execute = execute
        self._on_moved = on_moved
        self._limits = limits if limits is not None and limits.enabled else None
        self._queue: deque[QueuedJob] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        # The jobs taken for the next batch while the worker waits for more (under `_cond`):
        # still QUEUED in the store, so a cancel may take one out (`remove`).
        self._gathering: list[QueuedJob] = []
        self.current: str | None = None  # the first job of what runs now
        self.running: tuple[str, ...] = ()  # every job of what runs now
        self._thread = threading.Thread(target=self._loop, name=f"interlace-worker[{model_key}]", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def enqueue(self, job: QueuedJob, before: Callable[[int], None] | None = None) -> int:
        """Append `job`; `before(position)` runs first, under the queue lock, so the job's
        QUEUED state is committed (with its exact position) before a worker can take it.
        If `before` raises, the job is not queued."""
        with self._cond:
            position = len(self._queue) + 1
            if before is not None:
                before(position)
            self._queue.append(job)
            self._cond.notify()
            return position

    def remove(self, job_id: str) -> bool:
        """Take a waiting job out of the queue (or out of the batch being gathered); False if
        a worker already started it."""
        with self._cond:
            for waiting in (self._queue, self._gathering):
                for job in waiting:
                    if job.job_id == job_id:
                        waiting.remove(job)
                        self._cond.notify_all()  # a gathering left empty stops waiting
                        return True
            return False

    def position(self, job_id: str) -> int | None:
        with self._cond:
            for index, job in enumerate(self._queue):
                if job.job_id == job_id:
                    return index + 1
            return None

    def __len__(self) -> int:
        return len(self._queue)

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
                if batch is None:
                    return
                waiting = [j.job_id for j in self._queue]
                self.running = tuple(j.job_id for j in batch)
                self.current = self.running[0] if batch else None
            if not batch:  # every job gathered was cancelled meanwhile
                continue
            try:
                if waiting:
                    self._on_moved(self.model_key, waiting)
                self._execute(batch)
            except Exception:  # execute handles job errors; this is a bug guard, keep serving
                log.exception("worker for %s crashed on job(s) %s; continuing", self.model_key,
                              ", ".join(self.running))
            finally:
                self.current = None
                self.running = ()

    def _take(self) -> list[QueuedJob] | None:
        """Under `_cond`: the next jobs to run (the head job and, co-batching, its company);
        None when the worker stops."""
        while not self._queue and not self._stopping:
            self._cond.wait()
        if self._stopping:
            return None
        head = self._queue.popleft()
        self.current = head.job_id
        limits = self._limits
        if limits is None or head.share_key is None:
            return [head]
        self._gathering = [head]
        try:
            deadline = time.monotonic() + limits.wait_seconds
            while True:
                self._gather(head.share_key, limits.max_rows)
                room = limits.max_rows - sum(job.rows for job in self._gathering)
                left = deadline - time.monotonic()
                if room <= 0 or left <= 0 or self._stopping or not self._gathering:
                    break
                self._cond.wait(left)  # an enqueue or a stop wakes it early
            if self._stopping:
                # Not started: back to the front, still QUEUED, for a restart to requeue.
                self._queue.extendleft(reversed(self._gathering))
                self.current = None
                return None
            return self._gathering
        finally:
            self._gathering = []

    def _gather(self, key: Hashable, max_rows: int) -> None:
        """Move each queued job whose key equals `key` into `_gathering`, oldest first, while
        its rows fit under `max_rows`; the jobs left keep their order."""
        room = max_rows - sum(job.rows for job in self._gathering)
        if room <= 0:
            return
        kept: deque[QueuedJob] = deque()
        for job in self._queue:
            if room > 0 and job.share_key == key and job.rows <= room:
                self._gathering.append(job)
                room -= job.rows
            else:
                kept.append(job)
        self._queue = kept


class WorkerPool:
    def __init__(self, model_keys: list[str], execute: Execute, on_moved: OnMoved,
                 limits: BatchLimits | None = None) -> None:
        self.workers = {key: ModelWorker(key, execute, on_moved, limits) for key in model_keys}

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()

    def stop(self, timeout: float = 2.0) -> None:
        for worker in self.workers.values():
            worker.stop(timeout)

    def hosts(self, model_key: str) -> bool:
        return model_key in self.workers

    def enqueue(self, model_key: str, job: QueuedJob, before: Callable[[int], None] | None = None) -> int:
        return self.workers[model_key].enqueue(job, before)

    def remove(self, model_key: str, job_id: str) -> bool:
        worker = self.workers.get(model_key)
        return worker.remove(job_id) if worker else False

    def position(self, model_key: str, job_id: str) -> int | None:
        worker = self.workers.get(model_key)
        return worker.position(job_id) if worker else None
