"""`JobService`'s recovery side: what a job needs when no request is in progress for it.

Split from `service.py` (which keeps receipt, execution and queries) by concept: a restarted
embedded server requeues what it left unfinished (`recover`), a replica of a shared queue
prepares the jobs it claimed and requeues those of a replica that stopped beating
(`_prepare_claim`, `_requeue_stale`), and every server deletes expired results (`sweep`).
`RecoveryMixin` is a base of `JobService`: the methods keep the service's face and use its
state (`settings`, `store`, `pool`, `queue`, `results`, `hub`, `runner`) and its helpers
(`_finish`, `_queued`, `_payload_path`, `_drop_payload`, `_unknown_model_text`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..contract.http import JobStatus
from ..execution.errors import BadRequest
from .store import JobRecord, queued_text
from .store_queue import Claim
from .workers import QueuedJob

__all__ = ["RecoveryMixin", "interrupted_text"]

log = logging.getLogger("interlace.server")


class RecoveryMixin:
    """Recover, requeue and expire jobs (see the module docstring); a base of `JobService`."""

    settings: Any
    store: Any
    runner: Any
    pool: Any
    queue: Any
    results: Any
    hub: Any
    board: Any
    _finish: Any
    _queued: Any
    _payload_path: Any
    _drop_payload: Any
    _unknown_model_text: Any

    # -- the shared queue (--store postgresql://...) --------------------------------------

    def _prepare_claim(self, claim: Claim) -> QueuedJob | None:
        """A job this replica claimed (RUNNING already): prepared from its stored payload, or
        ended with a clear ERROR when it cannot run here (None)."""
        job_id = claim.record.id
        try:
            if claim.payload is None:
                raise BadRequest("its payload is missing from the job store; submit it again", 500)
            prepared = self.runner.prepare(claim.payload)
            if not self.pool.hosts(prepared.model_key):
                raise BadRequest(self._unknown_model_text(prepared.model_key), 404)
        except BadRequest as exc:
            self._finish(job_id, JobStatus.ERROR, f"This API replica cannot run the job: {exc.message}",
                         error_category="requeue")
            return None
        return self._queued(job_id, prepared, claim.record.attempts - 1, fair_key=claim.record.key_id, claimed=True)

    def _requeue_stale(self, record: JobRecord, replica: str | None) -> None:
        """A RUNNING job whose replica stopped beating: requeued (attempts counted, a claim
        adds one) or, after `max_attempts`, ended with the same ERROR as after a restart."""
        if record.attempts >= self.settings.max_attempts:
            self._finish(record.id, JobStatus.ERROR, interrupted_text(record.attempts),
                         expect=(JobStatus.RUNNING,), error_category="interrupted")
            return
        event = self.queue.requeue_stale(  # type: ignore[union-attr]
            record.id, replica, f"Requeued: the API replica running it stopped answering. {queued_text(1)}")
        if event is not None:
            self.hub.publish(event)
            self.pool.wake()

    # -- recover and expire (a restarted embedded server; every server's sweep) ------------

    def recover(self) -> None:
        """Requeue what a previous server process left unfinished, or end it with a clear ERROR."""
        pending = self.store.pending()
        self._remove_orphan_payloads({record.id for record in pending})
        for record in pending:
            try:
                self._requeue(record)
            except Exception as exc:
                log.exception("could not requeue job %s", record.id)
                self._finish(
                    record.id, JobStatus.ERROR,
                    f"The server restarted and could not requeue this job: {type(exc).__name__}: {exc}",
                    error_category="requeue",
                )

    def _remove_orphan_payloads(self, keep: set[str]) -> None:
        # A crash between writing a payload and committing its job (or while writing it)
        # leaves a file no job refers to; the client got no 202 for it, so it can go.
        for path in self.settings.payload_dir.iterdir():
            if path.stem not in keep or path.suffix != ".bin":
                path.unlink(missing_ok=True)

    def _requeue(self, record: JobRecord) -> None:
        interrupted = record.status == JobStatus.RUNNING.value
        if record.attempts >= self.settings.max_attempts:
            self._finish(record.id, JobStatus.ERROR, interrupted_text(record.attempts), error_category="interrupted")
            return
        path = self._payload_path(record.id)
        if not path.is_file():
            self._finish(record.id, JobStatus.ERROR,
                         "The server restarted and this job's payload file is missing; submit it again.",
                         error_category="requeue")
            return
        try:
            prepared = self.runner.prepare(path.read_bytes())
        except BadRequest as exc:
            self._finish(record.id, JobStatus.ERROR,
                         f"The server restarted and can no longer run this job: {exc.message}",
                         error_category="requeue")
            return
        if not self.pool.hosts(prepared.model_key):
            self._finish(record.id, JobStatus.ERROR,
                         "The server restarted and can no longer run this job: "
                         + self._unknown_model_text(prepared.model_key),
                         error_category="requeue")
            return
        note = "Requeued after the server was interrupted while it ran." if interrupted else \
            "Requeued after a server restart."

        def commit(position: int) -> None:
            event = self.store.transition(
                record.id, JobStatus.QUEUED, f"{note} {queued_text(position)}",
                queue_position=position, started=None,
            )
            if event is not None:
                self.hub.publish(event)

        self.pool.enqueue(prepared.model_key, self._queued(record.id, prepared, record.attempts,
                                                           fair_key=record.key_id), before=commit)

    def sweep(self, now: float | None = None) -> int:
        """Delete expired results; returns how many jobs expired."""
        count = 0
        if self.board is not None:  # pending blocks of jobs whose replica died mid-block
            self.board.sweep()
        for record in self.store.expired(time.time() if now is None else now):
            # Delete the bytes first: a crash in between leaves a COMPLETED record without a
            # file, which the result endpoint already answers with 410.
            self.results.delete(record.id)
            self._drop_payload(record.id)
            event = self.store.expire(record.id)
            if event is not None:
                self.hub.publish(event)
                count += 1
        return count



def interrupted_text(attempts: int) -> str:
    return (f"The server stopped {attempts} times while this job ran; it is not retried again in case the "
            "job itself brings the server down. Check its memory and time use, then submit it again.")
