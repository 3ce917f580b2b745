"""The job lifecycle, independent of HTTP: receive, queue, run, finish, cancel (recover and
expire: `service_recovery.py`; what several API replicas share: `replica_proxy.py`).

Rule followed everywhere here: commit to the store first, then publish the event, then act on
memory (queues) or the outside world (callbacks). A crash at any point leaves the database
describing something the server can resume from.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, Callable

import httpx

from .auth import KeyStore, User
from .db import open_database
from ..execution.cobatch import JobOutcome
from ..execution.errors import BadRequest, JobFailed
from .events import EventHub
from .local_exchange import ExchangeError, ServerLocalPeer
from .limits import MSG_LOG_TRUNCATED, MSG_QUEUE_FULL, RateLimiter, SharedRateLimiter, TooManyRequests, served_limits
from ..contract.model_meta import NotDescribable
from .replica_proxy import LocalBlockBoard, LocalElsewhere, ensure_shared_tables, lock_key
from .results import DatabaseResultStore, ResultStore
from .shared_queue import MSG_LOCAL_ELSEWHERE, SharedQueuePool
from .settings import ServerSettings
from .service_recovery import RecoveryMixin
from .store import Event, JobRecord, JobStore, queued_text
from .store_queue import SharedQueueStore
from ..contract.http import JOB, JobStatus
from .types import BatchingJobRunner, JobRunner, LogFn
from .workers import QueuedJob, WorkerPool

__all__ = ["JobService", "MSG_INTERNAL_ERROR", "NotFound", "Conflict", "TooManyRequests"]

log = logging.getLogger("interlace.server")

MSG_INTERNAL_ERROR = (
    "Internal server error while running the job: {error}\n"
    "This is a server problem, not your code; report it to the server operator."
)


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class JobService(RecoveryMixin):
    def __init__(self, settings: ServerSettings, runner: JobRunner) -> None:
        self.settings = settings
        self.runner = runner
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.payload_dir.mkdir(parents=True, exist_ok=True)
        # SQLite in the data dir (default) or the PostgreSQL `--store` several replicas share.
        self.db = open_database(settings.store, settings.data_dir, fsync=settings.fsync)
        self.store = JobStore(self.db)
        self.keys = KeyStore(self.db)
        # Shared queue: the queue, payloads and (without --result-store) results live in the
        # database, where every replica reads them.
        self.shared = bool(self.db.shared_queue)
        self.replica_id = uuid.uuid4().hex[:12]
        self.queue = SharedQueueStore(self.db, self.replica_id) if self.shared else None
        # Shared: limits counted in the database and local blocks visible to every replica.
        self.board = LocalBlockBoard(self.db, self.replica_id) if self.shared else None
        if self.shared:
            ensure_shared_tables(self.db)
        self.results: Any = DatabaseResultStore(self.db) if self.shared and not settings.result_store \
            else ResultStore(settings.result_url)
        self.hub = EventHub()
        self.model_keys = list(runner.model_keys())
        # Every limit the server enforces is the runner's served policy (one source, see limits.py).
        self.limits = served_limits(runner.policy())
        self.rate: Any = SharedRateLimiter(self.db, self.limits.requests_per_minute) if self.shared else \
            RateLimiter(self.limits.requests_per_minute)
        # How long a replica waits for the holder's answer to a forwarded local-block request.
        self.forward_timeout = self.limits.local_block_seconds + 30.0
        self._accepting = threading.Lock()  # the per-key queue check and the enqueue, together
        # Co-batching's limits when it is on and the runner batches; None: every job runs alone.
        self.batch_limits = settings.batch_limits if settings.cobatch and isinstance(runner, BatchingJobRunner) \
            else None
        # Threads per model: the runner's replicas of it (the Ray runner), else 1.
        concurrency = getattr(runner, "concurrency", None) or (lambda key: 1)
        self.pool: Any
        if self.queue is not None:
            self.pool = SharedQueuePool(
                self.model_keys, self._execute_jobs, self.queue, prepare=self._prepare_claim,
                publish=self.hub.publish, watched=self.hub.has_subscribers, on_stale=self._requeue_stale,
                board=self.board, local_watched=self.hub.has_local_watchers,
                url=settings.public_url, limits=self.batch_limits, concurrency=concurrency,
                poll_interval=settings.poll_interval, lease_seconds=settings.lease_seconds,
            )
        else:
            self.pool = WorkerPool(self.model_keys, self._execute_jobs, self._announce_positions, self.batch_limits,
                                   concurrency)
        # Callbacks go out on their own threads so a slow receiver never delays the next job.
        self._callbacks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="interlace-callback")
        self._started = False
        self._meta: dict[str, bytes] = {}  # model key -> its description (JSON bytes); never changes
        # The local-block peer of each running job (`local_exchange.py`), for the HTTP side.
        self._peers: dict[str, ServerLocalPeer] = {}
        self._peers_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Requeue unfinished jobs (before any new one, to keep FIFO), then start workers."""
        if self._started:
            return
        self._started = True
        if not self.shared:  # shared: other replicas run on; the lease keeper requeues the dead's
            self.recover()
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()
        self._callbacks.shutdown(wait=False, cancel_futures=True)

    # -- receipt --------------------------------------------------------------------------

    def accept(self, user: User, payload: bytes, *, callback: str | None, client_version: str | None) -> tuple[str, int]:
        """Validate, store the payload, commit the job, queue it. Returns (job id, position).

        Raises BadRequest with the runner's message for payloads that cannot run here, and
        TooManyRequests when the key has its limit of jobs in flight.
        """
        self._check_in_flight(user)  # before validating: an over-limit client costs no decoding
        prepared = self.runner.prepare(payload)
        model_key = prepared.model_key
        if not self.pool.hosts(model_key):
            raise BadRequest(self._unknown_model_text(model_key), status=404)
        job_id = uuid.uuid4().hex
        entry = self._queued(job_id, prepared, fair_key=user.key_id)  # outside the lock: asks the runner
        path = self._payload_path(job_id)
        if not self.shared:  # shared: the payload goes into the database with the job's row
            self._write_payload(path, payload)

        created: list[Event] = []

        def commit(position: int) -> None:
            created[:] = self.store.create(
                job_id,
                owner=user.name,
                key_id=user.key_id,
                model_key=model_key,
                payload_size=len(payload),
                callback=callback,
                client_version=client_version,
                queue_position=position,
                payload=payload if self.shared else None,
                share_key=None if entry.share_key is None else repr(entry.share_key),
                share_rows=entry.rows,
            )
            if not self.shared:  # committed already; shared: after the outer transaction below
                for event in created:
                    self.hub.publish(event)

        try:
            if self.shared:
                # Every replica's accepts for this key, one at a time: count and insert in
                # one transaction, so N replicas never let N jobs past the limit at once.
                with self.db.transaction() as conn:
                    lock_key(conn, user.key_id)
                    self._check_in_flight(user)
                    position = self.pool.enqueue(model_key, entry, before=commit)
                self.pool.wake()  # committed now: the claim its wake-up looked for is there
            else:
                with self._accepting:
                    self._check_in_flight(user)
                    position = self.pool.enqueue(model_key, entry, before=commit)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if self.shared:
            for event in created:  # after the outer transaction's commit
                self.hub.publish(event)
        return job_id, position

    def _queued(self, job_id: str, prepared: Any, attempts: int = 0, *, fair_key: str | None = None,
                claimed: bool = False) -> QueuedJob:
        """The queue's entry for a job, with its co-batching key and rows (asked of the runner
        once, here, not each time a worker looks through the queue) and its API key (the
        queue takes turns between keys)."""
        if self.batch_limits is None:
            return QueuedJob(job_id, prepared, attempts, fair_key=fair_key, claimed=claimed)
        runner: Any = self.runner
        try:
            key, rows = runner.share_key(prepared), max(1, int(runner.rows(prepared)))
        except Exception:  # a runner's bug must not refuse the job: it runs alone, as before
            log.exception("co-batching: could not key job %s; it runs alone", job_id)
            key, rows = None, 1
        return QueuedJob(job_id, prepared, attempts, share_key=key, rows=rows, fair_key=fair_key, claimed=claimed)

    def cobatch_summary(self) -> str:
        """One line for the start-up report: is co-batching on, and with which limits."""
        limits = self.settings.batch_limits
        if not limits.enabled:
            return "Co-batching: off (--no-cobatch); every job runs alone."
        if self.batch_limits is None:
            return "Co-batching: off (this job runner does not batch); every job runs alone."
        return (f"Co-batching: on: up to {limits.max_rows} rows and {limits.max_tokens} tokens a forward, "
                f"waiting up to {self.settings.batch_wait_ms:g} ms for more jobs "
                "(--batch-rows, --batch-tokens, --batch-wait-ms, --no-cobatch).")

    def _check_in_flight(self, user: User) -> None:
        limit = self.limits.max_queued_per_key
        count = self.store.count_in_flight(user.key_id)
        if count >= limit:
            raise TooManyRequests(MSG_QUEUE_FULL.format(count=count, limit=limit), limit=limit, count=count)

    def model_meta(self, model_key: str) -> bytes:
        """A hosted model's description (config and tokenizer files as JSON; see `contract/model_meta.py`),
        for clients that build it without weights. Made once per key: a model does not change."""
        cached = self._meta.get(model_key)
        if cached is not None:
            return cached
        if not self.pool.hosts(model_key):
            raise NotFound(self._unknown_model_text(model_key))
        # Optional on the runner seam: a runner without it (the test fake) hosts no real model.
        describe = getattr(self.runner, "model_meta", None)
        if describe is None:
            raise Conflict(
                f"This server's job runner cannot describe {model_key!r}, so it cannot be built "
                "without its weights; load the model locally and trace it with remote=True."
            )
        try:
            body = json.dumps(describe(model_key)).encode()
        except NotDescribable as exc:
            raise Conflict(str(exc)) from None
        self._meta[model_key] = body
        return body

    def _unknown_model_text(self, model_key: str) -> str:
        hosted = ", ".join(repr(k) for k in self.model_keys) or "none"
        return (
            f"Model {model_key!r} is not hosted on this server (hosted: {hosted}). Use one of those, "
            f"or start the server with `interlace serve --model {model_key}`."
        )

    def _payload_path(self, job_id: str) -> Path:
        return self.settings.payload_dir / f"{job_id}.bin"

    def _write_payload(self, path: Path, payload: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(payload)
            if self.settings.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)

    # -- execution (worker threads) -------------------------------------------------------

    def _execute_jobs(self, jobs: list[QueuedJob]) -> None:
        """What a worker took: one job (the path without co-batching), or jobs with equal
        share keys that may share a forward."""
        if len(jobs) == 1:
            if self._start(jobs[0]):
                self._run_one(jobs[0])
        else:
            self._execute_batch(jobs)

    def _start(self, job: QueuedJob) -> bool:
        """QUEUED -> RUNNING; False if the job was cancelled or finished meanwhile. A shared
        queue's claim already did it, in the claim's commit."""
        if job.claimed:
            return True
        event = self.store.transition(
            job.job_id, JobStatus.RUNNING, "Running.", expect=(JobStatus.QUEUED,),
            started=time.time(), attempts=job.attempts + 1,
        )
        if event is None:
            return False
        self.hub.publish(event)
        return True

    def _log_emitter(self, job_id: str) -> LogFn:
        """The job's `log(line)`: stores and announces each line, within the job's bounds."""
        limit = self.settings.max_log_events
        # Printed text kept per job (`--max-log-kb`): a print loop ends in one notice, never in
        # a full disk or memory. The worker bounds what it sends too; this is the last word.
        room = [self.limits.max_log_bytes]

        def emit_log(line: str) -> None:
            text = str(line).rstrip("\n")
            if room[0] <= 0:
                return
            size = len(text.encode("utf-8", "replace"))
            if size > room[0]:
                text = text.encode("utf-8", "replace")[:room[0]].decode("utf-8", "ignore") + "\n" + \
                    MSG_LOG_TRUNCATED.format(limit=self.limits.max_log_bytes)
                room[0] = 0
            else:
                room[0] -= size
            logged = self.store.add_log(job_id, text, limit=limit)
            if logged is not None:
                self.hub.publish(logged)

        return emit_log

    def _run_one(self, job: QueuedJob) -> None:
        """Run a RUNNING job alone (`JobRunner.run`) and finish it."""
        job_id = job.job_id
        emit_log = self._log_emitter(job_id)
        # Cheap, and most jobs never call it: the job's side of `with interlace.local():`.
        board = self.board
        peer = ServerLocalPeer(
            job_id, block_seconds=self.limits.local_block_seconds, grace_seconds=self.limits.local_grace_seconds,
            publish=self.hub.publish if board is None else partial(self._publish_block, board),
            watched=partial(self._local_watched, job_id),
            ended=None if board is None else partial(board.clear, job_id),
        )
        with self._peers_lock:
            self._peers[job_id] = peer
        try:
            self._settle(job_id, partial(self.runner.run, job.prepared, emit_log, local=peer))
        finally:
            # After `_finish`: a client's request about the job now finds it ended (409).
            peer.close()
            with self._peers_lock:
                self._peers.pop(job_id, None)
            if board is not None:
                with suppress(Exception):  # the row is ignored once the job is not RUNNING
                    board.clear(job_id)

    def _publish_block(self, board: LocalBlockBoard, event: Event) -> None:
        """A local block started here: stored for the other replicas (status JSON, their
        WebSockets), then announced to this replica's watchers."""
        if event.exchange is not None and event.line is not None:
            board.put(event.job_id, event.exchange, event.line, event.values)
        self.hub.publish(event)

    def _local_watched(self, job_id: str) -> bool:
        """A client runs the job's local blocks: it watches here, or (shared) through another
        replica, which marks the block seen."""
        if self.hub.has_local_watchers(job_id):
            return True
        return self.board is not None and self.board.seen_recently(job_id)

    def _execute_batch(self, jobs: list[QueuedJob]) -> None:
        """Co-batching: start every job (a cancelled one drops out), run them in one
        `run_batch`, then finish each in order with its own outcome, as if it ran alone."""
        started = [job for job in jobs if self._start(job)]
        if len(started) <= 1:
            for job in started:  # the others were cancelled: it has no one to share with
                self._run_one(job)
            return
        limits = self.batch_limits or self.settings.batch_limits
        try:
            outcomes = self.runner.run_batch([job.prepared for job in started], limits)  # type: ignore[attr-defined]
            if len(outcomes) != len(started):
                raise RuntimeError(f"JobRunner.run_batch returned {len(outcomes)} outcomes for {len(started)} jobs")
        except Exception as exc:
            # The batch's own failure (not a job's): every job of it gets the internal error.
            text = self._internal_error(", ".join(job.job_id for job in started), exc)
            for job in started:
                self._finish(job.job_id, JobStatus.ERROR, text, error_category="internal")
            return
        for job, outcome in zip(started, outcomes):
            emit_log = self._log_emitter(job.job_id)
            for line in outcome.logs:
                emit_log(line)
            self._settle(job.job_id, partial(_outcome_result, outcome), batch_rows=outcome.rows or None)

    def _settle(self, job_id: str, produce: Callable[[], Any], *, batch_rows: int | None = None) -> None:
        """Finish a RUNNING job with what `produce()` gives: result bytes (stored, then
        COMPLETED), `JobFailed` (ERROR with its traceback and category) or any other exception
        (ERROR, internal). `batch_rows`: the rows of the shared forward it ran in, if any."""
        try:
            result = produce()
            if not isinstance(result, (bytes, bytearray, memoryview)):
                raise TypeError(f"JobRunner.run returned {type(result).__name__}, expected bytes")
            data = bytes(result)
            self.results.put(job_id, data)
        except JobFailed as failed:
            self._finish(job_id, JobStatus.ERROR, failed.traceback_text, error_category=failed.category,
                         batch_rows=batch_rows)
        except Exception as exc:
            self._finish(job_id, JobStatus.ERROR, self._internal_error(job_id, exc), error_category="internal",
                         batch_rows=batch_rows)
        else:
            self._finish(job_id, JobStatus.COMPLETED, f"Result ready ({len(data)} bytes).", result_size=len(data),
                         batch_rows=batch_rows)

    @staticmethod
    def _internal_error(job_ids: str, exc: Exception) -> str:
        """Log a failure inside the server (called in its `except`); the text its jobs end with."""
        log.error("job(s) %s failed inside the server:\n%s", job_ids, traceback.format_exc())
        return MSG_INTERNAL_ERROR.format(error=f"{type(exc).__name__}: {exc}")

    def _finish(self, job_id: str, status: JobStatus, description: str, *,
                expect: tuple[JobStatus, ...] = (JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING),
                **fields: Any) -> Event | None:
        now = time.time()
        event = self.store.transition(
            job_id, status, description, expect=expect,
            finished=now, expires_at=now + self.settings.result_ttl, **fields,
        )
        if event is None:
            return None
        self.hub.publish(event)
        # The payload is only kept to re-run the job after a crash; a finished job needs none.
        self._drop_payload(job_id)
        record = self.store.get(job_id)
        if record is not None and record.callback:
            self._callbacks.submit(self._post_callback, record)
        return event

    def _drop_payload(self, job_id: str) -> None:
        if self.queue is not None:
            self.queue.delete_payload(job_id)
        else:
            self._payload_path(job_id).unlink(missing_ok=True)

    def _announce_positions(self, model_key: str, waiting: list[str]) -> None:
        # Positions are transient (not stored, seq=None): they are derived from the in-memory
        # queue and sent only to jobs someone is watching.
        now = time.time()
        for index, job_id in enumerate(waiting):
            if self.hub.has_subscribers(job_id):
                position = index + 1
                self.hub.publish(Event(job_id, "QUEUED", queued_text(position), position, now))

    def _post_callback(self, record: JobRecord) -> None:
        assert record.callback
        body = self.status_json(record)
        try:
            httpx.post(record.callback, json=body, timeout=self.settings.callback_timeout)
        except Exception as exc:  # best effort by contract
            log.warning("callback for job %s to %s failed: %s", record.id, record.callback, exc)

    # -- queries --------------------------------------------------------------------------

    def owned(self, user: User, job_id: str) -> JobRecord:
        record = self.store.get_owned(job_id, user.name)
        if record is None:
            raise NotFound(f"No job {job_id!r} for this API key's user.")
        return record

    def status_json(self, record: JobRecord) -> dict[str, Any]:
        """The job's status JSON; `local_block` is the local block it waits for, else None."""
        position = None
        if record.status == JobStatus.QUEUED.value:
            position = self.pool.position(record.model_key, record.id)
        data = record.to_json(queue_position=position)
        peer = self._peers.get(record.id)
        pending = peer.pending() if peer is not None else None
        if peer is None and self.board is not None and record.status == JobStatus.RUNNING.value:
            stored = self.board.get(record.id)  # run by another replica: what it stored
            pending = None if stored is None else (stored.exchange, stored.line)
        data["local_block"] = None if pending is None else {"exchange": pending[0], "line": pending[1]}
        return data

    def local_client_seen(self, job_id: str) -> None:
        """A client that runs the job's local blocks polled it (`?local=1`): it is still there."""
        peer = self._peers.get(job_id)
        if peer is not None:
            peer.touch()
        elif self.board is not None:
            self.board.touch([job_id])  # the holder (another replica) reads it

    def local_peer(self, user: User, job_id: str) -> ServerLocalPeer:
        """The local-block peer of `user`'s running job `job_id` (404 for another user's job,
        exactly like an unknown one; ExchangeError when the job is not running)."""
        record = self.owned(user, job_id)
        peer = self._peers.get(job_id)
        if peer is not None:
            return peer
        holder = self.queue.holder(job_id) if self.queue is not None else None
        if holder is not None and holder[0] != self.replica_id:
            # app.py forwards the request to the holder (replica_proxy.forward_local).
            raise LocalElsewhere(MSG_LOCAL_ELSEWHERE.format(job_id=job_id, url=holder[1] or "unknown"), holder[1])
        if record.terminal:
            raise ExchangeError(409, f"Job {job_id} already ended ({record.status}); it waits for no local "
                                     f"block. GET {JOB.format(job_id=job_id)} says how it ended.")
        raise ExchangeError(404, f"Job {job_id} is {record.status} and waits for no local block now; a job "
                                 "that reaches one says so with a STREAM event (follow its events).")

    def stream_event(self, job_id: str) -> Event | None:
        """The STREAM event of the local block job `job_id` waits for now, if any."""
        peer = self._peers.get(job_id)
        if peer is not None:
            return peer.stream_event()
        stored = self.board.get(job_id) if self.board is not None else None
        return None if stored is None else stored.event()

    def current_event(self, record: JobRecord) -> Event:
        """The job's state as one event (for a client reconnecting with nothing new to see)."""
        latest = self.store.latest_event(record.id)
        if latest is not None and latest.status == record.status:
            if record.status == JobStatus.QUEUED.value:
                position = self.pool.position(record.model_key, record.id)
                return Event(record.id, "QUEUED", queued_text(position or 1), position, latest.time, latest.seq)
            return latest
        return Event(record.id, record.status, record.description, None, record.updated, latest.seq if latest else 0)

    # -- cancel --------------------------------------------------------------------------

    def cancel(self, user: User, job_id: str) -> JobRecord:
        record = self.owned(user, job_id)
        if record.status == JobStatus.QUEUED.value and self.pool.remove(record.model_key, job_id):
            # Shared queue: only a job still QUEUED in the store (no replica claimed it).
            cancelled = self._finish(job_id, JobStatus.CANCELLED, "Cancelled by the user before it ran.",
                                     expect=(JobStatus.QUEUED,) if self.shared else
                                     (JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING))
            updated = self.store.get(job_id)
            assert updated is not None
            if cancelled is not None or not self.shared:
                return updated
            record = updated  # another replica claimed it first: say what it is now
        if record.status == JobStatus.RUNNING.value or record.status == JobStatus.QUEUED.value:
            raise Conflict(f"Job {job_id} is already running and cannot be cancelled; wait for it to finish.")
        raise Conflict(f"Job {job_id} already finished ({record.status}); there is nothing to cancel.")

def _outcome_result(outcome: JobOutcome) -> bytes:
    """A batch job's result bytes, or its failure raised (for `JobService._settle`)."""
    if outcome.failure is not None:
        raise outcome.failure
    if outcome.result is None:
        raise TypeError("JobRunner.run_batch gave an outcome with neither a result nor a failure")
    return outcome.result
