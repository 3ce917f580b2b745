"""The in-process worker pool: one thread per hosted model, FIFO per model.

Jobs for one model run one at a time, in order, because they share the model's module tree
(hooks, weights); different models run in parallel. The queue lives in memory; the job store
holds the truth, and a restarted server rebuilds these queues from it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .types import PreparedJob

__all__ = ["QueuedJob", "ModelWorker", "WorkerPool"]

log = logging.getLogger("interlace.server")


@dataclass
class QueuedJob:
    job_id: str
    prepared: PreparedJob
    attempts: int = 0  # times the job already started (and was interrupted by a crash)


Execute = Callable[[QueuedJob], None]
# Called by a worker after it took a job: (model key, ids still waiting, in order).
OnMoved = Callable[[str, list[str]], None]


class ModelWorker:
    def __init__(self, model_key: str, execute: Execute, on_moved: OnMoved) -> None:
        self.model_key = model_key
        self._execute = execute
        self._on_moved = on_moved
        self._queue: deque[QueuedJob] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.current: str | None = None
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
        """Take a waiting job out of the queue; False if a worker already took it."""
        with self._cond:
            for job in self._queue:
                if job.job_id == job_id:
                    self._queue.remove(job)
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
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                waiting = [j.job_id for j in self._queue]
                self.current = job.job_id
            try:
                if waiting:
                    self._on_moved(self.model_key, waiting)
                self._execute(job)
            except Exception:  # execute handles job errors; this is a bug guard, keep serving
                log.exception("worker for %s crashed on job %s; continuing", self.model_key, job.job_id)
            finally:
                self.current = None


class WorkerPool:
    def __init__(self, model_keys: list[str], execute: Execute, on_moved: OnMoved) -> None:
        self.workers = {key: ModelWorker(key, execute, on_moved) for key in model_keys}

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
