"""The in-process worker pool: per hosted model, a queue and its worker threads.

Jobs for one model run one at a time because they share the model's module tree (hooks,
weights), unless the runner says the model has more replicas (`runner.concurrency(key)`, the
Ray runner's replica count): then that many threads take from the one queue. Different models
run in parallel. The queue lives in memory; the job store holds the truth, and a restarted
server rebuilds these queues from it. (`shared_queue.py` is the same pool with the queue in a
database several API replicas share.)

Fair across API keys (`QueuedJob.fair_key`): the next job is the oldest job of the key that
was served longest ago (a key never served first; ties: the oldest job), so one user's
hundred queued jobs do not hold back another user's one. With one key this is FIFO.

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

__all__ = ["Execute", "QueuedJob", "ModelWorker", "RunningJobs", "WorkerPool"]

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
    # The API key the job came with: the queue takes turns between keys.
    fair_key: str | None = None
    # Shared queue (`shared_queue.py`): already RUNNING in the store, claimed by this replica.
    claimed: bool = False


# Called by a worker with the jobs it took: one job, or several with equal share keys.
Execute = Callable[[list[QueuedJob]], None]
# Called by a worker after it took a job: (model key, ids still waiting, in order).
OnMoved = Callable[[str, list[str]], None]


class RunningJobs:
    """What a model's worker threads run now: `_active` maps a thread's name to its jobs (set
    by each thread as it takes and ends them). Shared by the in-memory and the database queue."""

    _active: dict[str, tuple[str, ...]]

    @property
    def current(self) -> str | None:
        """The first job of what runs now (None: idle)."""
        for jobs in tuple(self._active.values()):
            if jobs:
                return jobs[0]
        return None

    @property
    def running(self) -> tuple[str, ...]:
        """Every job of what runs now, on every thread."""
        return tuple(job for jobs in tuple(self._active.values()) for job in jobs)


class ModelWorker(RunningJobs):
    """One model's queue and the `threads` threads that run it. `limits`: co-batch (see the
    module docstring); None or `enabled=False`: every job runs alone."""

    def __init__(self, model_key: str, execute: Execute, on_moved: OnMoved, limits: BatchLimits | None = None,
                 threads: int = 1) -> None:
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
        # Fairness: when each API key was last served (a counter; higher is later).
        self._served: dict[str | None, int] = {}
        self._turn = 0
        # What each thread runs now (or gathers for): thread name -> job ids.
        self._active: dict[str, tuple[str, ...]] = {}
        count = max(1, int(threads))
        self._threads = [
            threading.Thread(target=self._loop, name=f"interlace-worker[{model_key}]" + (f"#{i}" if count > 1 else ""),
                             daemon=True)
            for i in range(count)
        ]
        self._thread = self._threads[0]  # the only one, unless the model has several replicas


    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def enqueue(self, job: QueuedJob, before: Callable[[int], None] | None = None) -> int:
        """Append `job`; `before(position)` runs first, under the queue lock, so the job's
        QUEUED state is committed (with its exact position) before a worker can take it.
        If `before` raises, the job is not queued."""
        with self._cond:
            position = self._fair_order(extra=job).index(job) + 1
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
        """1 + the jobs that the fair order takes before this one."""
        with self._cond:
            for index, job in enumerate(self._fair_order()):
                if job.job_id == job_id:
                    return index + 1
            return None

    def __len__(self) -> int:
        return len(self._queue)

    def _fair_order(self, extra: QueuedJob | None = None) -> list[QueuedJob]:
        """Under `_cond`: the queue in the order the workers would take it (ignoring
        co-batching's company), with `extra` appended as if queued. O(jobs x keys)."""
        groups: dict[str | None, deque[tuple[int, QueuedJob]]] = {}
        for index, job in enumerate([*self._queue, *([extra] if extra is not None else [])]):
            groups.setdefault(job.fair_key, deque()).append((index, job))
        served = dict(self._served)
        turn = self._turn
        order: list[QueuedJob] = []
        while groups:
            key = min(groups, key=lambda k: (served.get(k, 0), groups[k][0][0]))
            order.append(groups[key].popleft()[1])
            if not groups[key]:
                del groups[key]
            turn += 1
            served[key] = turn
        return order

    def _pop_next(self) -> QueuedJob:
        """Under `_cond`, queue not empty: take the next job by fairness."""
        index = _next_index(self._queue, self._served)
        job = self._queue[index]
        del self._queue[index]
        self._turn += 1
        self._served[job.fair_key] = self._turn
        return job

    def _loop(self) -> None:
        me = threading.current_thread().name
        while True:
            with self._cond:
                batch = self._take(me)
                if batch is None:
                    self._active.pop(me, None)
                    return
                waiting = [j.job_id for j in self._fair_order()]
                self._active[me] = tuple(j.job_id for j in batch)
            if not batch:  # every job gathered was cancelled meanwhile
                self._active.pop(me, None)
                continue
            try:
                if waiting:
                    self._on_moved(self.model_key, waiting)
                self._execute(batch)
            except Exception:  # execute handles job errors; this is a bug guard, keep serving
                log.exception("worker for %s crashed on job(s) %s; continuing", self.model_key,
                              ", ".join(self._active.get(me, ())))
            finally:
                self._active.pop(me, None)

    def _take(self, me: str) -> list[QueuedJob] | None:
        """Under `_cond`: the next jobs to run (the head job and, co-batching, its company);
        None when the worker stops."""
        while not self._queue and not self._stopping:
            self._cond.wait()
        if self._stopping:
            return None
        head = self._pop_next()
        self._active[me] = (head.job_id,)
        limits = self._limits
        if limits is None or head.share_key is None:
            return [head]
        # Several threads may gather at once: each its own list (`_gathering` is the one a
        # cancel looks through, so it holds them all; this thread's are `mine`).
        mine = [head]
        self._gathering.append(head)
        try:
            deadline = time.monotonic() + limits.wait_seconds
            while True:
                mine = _still(mine, self._gathering)  # a cancel took some out
                self._gather(head.share_key, limits.max_rows, mine)
                room = limits.max_rows - sum(job.rows for job in mine)
                left = deadline - time.monotonic()
                if room <= 0 or left <= 0 or self._stopping or not mine:
                    break
                self._cond.wait(left)  # an enqueue or a stop wakes it early
            mine = _still(mine, self._gathering)
            if self._stopping:
                # Not started: back to the front, still QUEUED, for a restart to requeue.
                self._queue.extendleft(reversed(mine))
                self._active.pop(me, None)
                return None
            return mine
        finally:
            taken = {id(job) for job in mine}
            self._gathering = [job for job in self._gathering if id(job) not in taken]

    def _gather(self, key: Hashable, max_rows: int, mine: list[QueuedJob]) -> None:
        """Move each queued job whose key equals `key` into `mine` (and `_gathering`), oldest
        first, while its rows fit under `max_rows`; the jobs left keep their order."""
        room = max_rows - sum(job.rows for job in mine)
        if room <= 0:
            return
        kept: deque[QueuedJob] = deque()
        for job in self._queue:
            if room > 0 and job.share_key == key and job.rows <= room:
                mine.append(job)
                self._gathering.append(job)
                room -= job.rows
            else:
                kept.append(job)
        self._queue = kept


def _still(mine: list[QueuedJob], gathering: list[QueuedJob]) -> list[QueuedJob]:
    """The jobs of `mine` a cancel has not taken out of `gathering` (by identity)."""
    left = {id(job) for job in gathering}
    return [job for job in mine if id(job) in left]


def _next_index(jobs: "deque[QueuedJob] | list[QueuedJob]", served: dict[str | None, int]) -> int:
    """The index of the next job by fairness: the first (oldest) job of the key served longest
    ago; a key never served counts as served before every other."""
    best, best_turn = 0, None
    seen: set[str | None] = set()
    for index, job in enumerate(jobs):
        if job.fair_key in seen:
            continue
        seen.add(job.fair_key)
        turn = served.get(job.fair_key, 0)
        if best_turn is None or turn < best_turn:
            best, best_turn = index, turn
    return best


class WorkerPool:
    """`concurrency(model_key)`: the threads a model's queue gets (the runner's replicas)."""

    def __init__(self, model_keys: list[str], execute: Execute, on_moved: OnMoved,
                 limits: BatchLimits | None = None, concurrency: Callable[[str], int] | None = None) -> None:
        threads = concurrency or (lambda key: 1)
        self.workers = {key: ModelWorker(key, execute, on_moved, limits, threads(key)) for key in model_keys}

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
