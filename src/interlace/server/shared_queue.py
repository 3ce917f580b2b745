"""The worker pool of an API replica that shares its queue (`--store postgresql://...`).

The same face as `workers.WorkerPool` (so `JobService` and the status page do not care), but
the queue is the database's `jobs` table (`store_queue.py`): each model's worker threads (as
many as `runner.concurrency(key)`, default 1) claim the next job by fairness, QUEUED ->
RUNNING in the claim's own commit, and hand it to `execute` already started (`QueuedJob.
claimed`). A replica's own submissions wake its workers at once; jobs other replicas accepted
are found by polling every `settings.poll_interval`.

Two more threads per replica:
- the lease keeper beats (`replicas` row, RUNNING jobs' `heartbeat`) every `lease_seconds / 5`
  and hands RUNNING jobs whose replica stopped beating for `lease_seconds` to `on_stale`
  (`JobService` requeues them, attempts counted, or ends them after `max_attempts`);
- the event relay reads the events other replicas stored and publishes those of jobs that
  someone watches here, so a WebSocket on any replica follows a job run on any other (the
  WebSocket de-duplicates by `seq`, so an event published twice is sent once). It also
  relays local blocks (`replica_proxy.LocalBlockBoard`): a block another replica's job started
  becomes a STREAM event for this replica's watchers of the job, and the block of a job whose
  client follows it here (`?local=1`) is marked seen, so the holder keeps waiting for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from ..execution.cobatch import BatchLimits
from .store import Event, JobRecord
from .store_queue import Claim, SharedQueueStore
from .workers import Execute, QueuedJob, RunningJobs

__all__ = ["SharedQueuePool", "SharedModelWorker", "RELAY_WINDOW", "MSG_LOCAL_ELSEWHERE"]

MSG_LOCAL_ELSEWHERE = (
    "Job {job_id} runs on another API replica ({url}), which serves its `with interlace.local():` "
    "blocks; this request could not be passed on to it (it was passed on once already, the job "
    "moved meanwhile, or that replica's URL is unknown). Retry in a moment, or send the job's "
    "requests to that replica's own URL: interlace.CONFIG.set_default_host({url!r}); operators: "
    "give every replica an --advertise-url the others can reach."
)

log = logging.getLogger("interlace.server")

#: Events are numbered when inserted but committed in any order: the relay reads this many
#: sequence numbers back each time so a late commit is still relayed.
RELAY_WINDOW = 500

Prepare = Callable[[Claim], "QueuedJob | None"]
OnStale = Callable[[JobRecord, "str | None"], None]


class SharedModelWorker(RunningJobs):
    """One model's claiming threads; `current`, `running` and `len()` as `workers.ModelWorker`."""

    def __init__(self, pool: "SharedQueuePool", model_key: str, threads: int) -> None:
        self.pool = pool
        self.model_key = model_key
        self._active: dict[str, tuple[str, ...]] = {}
        self._threads = [
            threading.Thread(target=self._loop, name=f"interlace-claim[{model_key}]#{i}", daemon=True)
            for i in range(max(1, int(threads)))
        ]


    def __len__(self) -> int:
        try:
            return self.pool.queue.queue_length(self.model_key)
        except Exception:  # a status read must not fail because the database blinked
            return 0

    def _loop(self) -> None:
        pool = self.pool
        me = threading.current_thread().name
        while not pool.stopping:
            try:
                claims = self._claim()
            except Exception:
                log.exception("claiming a job of %s failed; retrying", self.model_key)
                pool.wait(pool.poll_interval)
                continue
            if not claims:
                pool.wait(pool.poll_interval)
                continue
            self._active[me] = tuple(c.record.id for c in claims)
            try:
                jobs = [job for job in (pool.prepare(c) for c in claims) if job is not None]
                if jobs:
                    pool.execute(jobs)
            except Exception:  # execute handles job errors; this is a bug guard, keep serving
                log.exception("worker for %s crashed on job(s) %s; continuing", self.model_key,
                              ", ".join(self._active.get(me, ())))
            finally:
                self._active.pop(me, None)

    def _claim(self) -> list[Claim]:
        """The next job and, co-batching, its company (all claimed RUNNING, events published)."""
        pool = self.pool
        head = pool.queue.claim_next(self.model_key)
        if head is None:
            return []
        pool.publish(head.event)
        claims = [head]
        limits = pool.limits
        if limits is None or head.share_key is None:
            return claims
        deadline = time.monotonic() + limits.wait_seconds
        while True:
            room = limits.max_rows - sum(c.share_rows for c in claims)
            company = pool.queue.claim_company(self.model_key, head.share_key, room)
            for claim in company:
                pool.publish(claim.event)
            claims += company
            room -= sum(c.share_rows for c in company)
            left = deadline - time.monotonic()
            if room <= 0 or left <= 0 or pool.stopping:
                return claims
            pool.wait(min(left, pool.poll_interval))


class SharedQueuePool:
    def __init__(
        self,
        model_keys: list[str],
        execute: Execute,
        queue: SharedQueueStore,
        *,
        prepare: Prepare,
        publish: Callable[[Event], None],
        watched: Callable[[str], bool],
        on_stale: OnStale,
        url: str,
        limits: BatchLimits | None = None,
        concurrency: Callable[[str], int] | None = None,
        poll_interval: float = 0.2,
        lease_seconds: float = 30.0,
        board: Any = None,
        local_watched: Callable[[str], bool] | None = None,
    ) -> None:
        self.execute = execute
        self.queue = queue
        self.prepare = prepare
        self.publish = publish
        self._watched = watched
        self._on_stale = on_stale
        self.board = board  # replica_proxy.LocalBlockBoard, or None: no local blocks relayed
        self._local_watched = local_watched or (lambda job_id: False)
        self.url = url
        self.limits = limits if limits is not None and limits.enabled else None
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.stopping = False
        self._wake = threading.Condition()  # work for the claiming threads (or a stop)
        self._stopped = threading.Event()  # the lease keeper and the relay sleep on this
        threads = concurrency or (lambda key: 1)
        self.workers = {key: SharedModelWorker(self, key, threads(key)) for key in model_keys}
        self._extra = [
            threading.Thread(target=self._keep_lease, name="interlace-lease", daemon=True),
            threading.Thread(target=self._relay, name="interlace-relay", daemon=True),
        ]

    # -- the WorkerPool face --------------------------------------------------------------

    def start(self) -> None:
        self.queue.beat(self.url)  # before claiming: a claimed job's replica is known at once
        for thread in self._extra:
            thread.start()
        for worker in self.workers.values():
            for thread in worker._threads:
                thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._wake:
            self.stopping = True
            self._wake.notify_all()
        self._stopped.set()
        for thread in [*self._extra, *(t for w in self.workers.values() for t in w._threads)]:
            if thread.is_alive():
                thread.join(timeout)
        try:
            self.queue.leave()
        except Exception:
            log.warning("could not remove this replica's row from the job store", exc_info=True)

    def hosts(self, model_key: str) -> bool:
        return model_key in self.workers

    def enqueue(self, model_key: str, job: QueuedJob, before: Callable[[int], None] | None = None) -> int:
        """Commit the job (`before(position)` inserts it QUEUED) and wake this replica's
        workers; any replica may claim it."""
        position = self.queue.queue_length(model_key) + 1
        if before is not None:
            before(position)
        self.wake()
        return position

    def remove(self, model_key: str, job_id: str) -> bool:
        """Always True: the store decides, the cancel's transition expects QUEUED (a claim
        that won meanwhile makes it fail, and the cancel answers 409)."""
        return model_key in self.workers

    def position(self, model_key: str, job_id: str) -> int | None:
        try:
            return self.queue.queue_position(job_id)
        except Exception:
            return None

    def wake(self) -> None:
        """Work is there (a submission or a requeue here): the claiming threads look now."""
        with self._wake:
            self._wake.notify_all()

    def wait(self, seconds: float) -> None:
        with self._wake:
            if not self.stopping:
                self._wake.wait(seconds)

    # -- leases and the event relay -------------------------------------------------------

    def _keep_lease(self) -> None:
        interval = self.lease_seconds / 5.0
        while not self.stopping:
            try:
                self.queue.beat(self.url)
                for record, replica in self.queue.stale_running(time.time() - self.lease_seconds):
                    self._on_stale(record, replica)
            except Exception:
                log.exception("the shared queue's lease keeper failed; retrying")
            self._stopped.wait(interval)

    def _relay_blocks(self, streamed: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """One look at the other replicas' pending local blocks (see the module docstring);
        returns the blocks pending now, those already announced here."""
        pending = self.board.pending(exclude=self.queue.replica_id)
        now = set()
        for block in pending:
            mark = (block.job_id, block.exchange)
            now.add(mark)
            if mark not in streamed and self._watched(block.job_id):
                self.publish(block.event())
        self.board.touch([b.job_id for b in pending if self._local_watched(b.job_id)])
        return {mark for mark in now if mark in streamed or self._watched(mark[0])}

    def _relay(self) -> None:
        try:
            last = self.queue.last_seq()
        except Exception:
            last = 0
        relayed: OrderedDict[int, None] = OrderedDict()
        streamed: set[tuple[str, int]] = set()  # (job, exchange) STREAM events relayed
        while not self.stopping:
            if self.board is not None:
                try:
                    streamed = self._relay_blocks(streamed)
                except Exception:
                    log.exception("the local-block relay failed; retrying")
            try:
                events = self.queue.events_after_seq(max(0, last - RELAY_WINDOW))
            except Exception:
                log.exception("the event relay could not read events; retrying")
                events = []
            for event in events:
                seq = event.seq or 0
                last = max(last, seq)
                if seq in relayed:
                    continue
                relayed[seq] = None
                if self._watched(event.job_id):
                    self.publish(event)
            while len(relayed) > 4 * RELAY_WINDOW:
                relayed.popitem(last=False)
            if len(events) < 1000:  # caught up: wait for more
                self._stopped.wait(self.poll_interval)

