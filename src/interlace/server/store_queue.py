"""The shared queue's side of the job store (PostgreSQL, `--store postgresql://...`).

With several API replicas on one database the queue is the `jobs` table itself: a replica
claims a job by locking its row (`FOR UPDATE SKIP LOCKED`: two replicas never wait for, nor
take, the same row) and moving it QUEUED -> RUNNING in the same transaction, recording its own
id and a heartbeat. So no job runs twice (a claim is one commit) and none is lost (a job is
QUEUED until a commit says who runs it, and a RUNNING job whose replica stopped beating is
requeued by any other replica: `stale_running`, `requeue_stale`).

Fairness across API keys: `queue_turns` keeps, per model and key, when the key was last
served (a counter); the next job is the oldest job of the key served longest ago (a key never
served first), so one user's hundred queued jobs do not hold back another user's one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..contract.http import JobStatus
from .store import Event, JobRecord, event_from_row, insert_event

__all__ = ["Claim", "SharedQueueStore", "RUNNING_TEXT"]

RUNNING_TEXT = "Running."
_QUEUED = JobStatus.QUEUED.value
_RUNNING = JobStatus.RUNNING.value


@dataclass(frozen=True)
class Claim:
    """A job this replica claimed (already RUNNING in the store): the record, its RUNNING
    event (to publish after the commit) and the payload bytes to prepare."""

    record: JobRecord
    event: Event
    payload: bytes | None
    share_key: str | None
    share_rows: int


class SharedQueueStore:
    def __init__(self, db: Any, replica_id: str) -> None:
        self.db = db
        self.replica_id = replica_id

    # -- claims ---------------------------------------------------------------------------

    def claim_next(self, model_key: str) -> Claim | None:
        """The next job of `model_key` by fairness, claimed for this replica; None if none waits."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT j.id FROM jobs j LEFT JOIN queue_turns t"
                " ON t.model_key = j.model_key AND t.fair_key = COALESCE(j.key_id, '')"
                " WHERE j.model_key = ? AND j.status = ?"
                " ORDER BY COALESCE(t.served, 0), j.created, j.rowid LIMIT 1" + self._skip_locked("j"),
                (model_key, _QUEUED),
            ).fetchone()
            if row is None:
                return None
            claim = self._claim(conn, row[0])
            fair_key = claim.record.key_id or ""
            conn.execute(
                "INSERT INTO queue_turns (model_key, fair_key, served) VALUES (?, ?,"
                " (SELECT COALESCE(MAX(served), 0) + 1 FROM queue_turns WHERE model_key = ?))"
                " ON CONFLICT (model_key, fair_key) DO UPDATE SET served = excluded.served",
                (model_key, fair_key, model_key),
            )
            return claim

    def claim_company(self, model_key: str, share_key: str, room: int) -> list[Claim]:
        """Co-batching: queued jobs of `model_key` with this share key, oldest first, while their
        rows fit in `room`; claimed for this replica."""
        if room <= 0:
            return []
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, share_rows FROM jobs WHERE model_key = ? AND status = ? AND share_key = ?"
                " ORDER BY created, rowid LIMIT ?" + self._skip_locked(),
                (model_key, _QUEUED, share_key, room),
            ).fetchall()
            claims = []
            for job_id, rows_taken in rows:
                if rows_taken > room:
                    continue
                room -= rows_taken
                claims.append(self._claim(conn, job_id))
            return claims

    def _skip_locked(self, table: str | None = None) -> str:
        if self.db.dialect != "postgresql":
            return ""  # SQLite's BEGIN IMMEDIATE holds the whole file: nothing to skip
        return f" FOR UPDATE{' OF ' + table if table else ''} SKIP LOCKED"

    def _claim(self, conn: Any, job_id: str) -> Claim:
        now = time.time()
        row = conn.execute(
            "UPDATE jobs SET status = ?, description = ?, updated = ?, started = ?, attempts = attempts + 1,"
            " replica = ?, heartbeat = ? WHERE id = ? RETURNING *",
            (_RUNNING, RUNNING_TEXT, now, now, self.replica_id, now, job_id),
        ).fetchone()
        event = insert_event(conn, job_id, _RUNNING, RUNNING_TEXT, None, now)
        payload = conn.execute("SELECT data FROM payloads WHERE job_id = ?", (job_id,)).fetchone()
        return Claim(JobRecord.from_row(row), event, bytes(payload[0]) if payload else None,
                     row["share_key"], int(row["share_rows"] or 1))

    # -- reads ----------------------------------------------------------------------------

    def queue_length(self, model_key: str) -> int:
        row = self.db.query_one("SELECT COUNT(*) FROM jobs WHERE model_key = ? AND status = ?", (model_key, _QUEUED))
        return int(row[0]) if row else 0

    def queue_position(self, job_id: str) -> int | None:
        """1 + the QUEUED jobs of the same model committed before it (arrival order: the fair
        order may serve it sooner); None unless it is QUEUED."""
        row = self.db.query_one(
            "SELECT (SELECT COUNT(*) FROM jobs o WHERE o.model_key = j.model_key AND o.status = ?"
            " AND (o.created < j.created OR (o.created = j.created AND o.rowid < j.rowid))) + 1"
            " FROM jobs j WHERE j.id = ? AND j.status = ?",
            (_QUEUED, job_id, _QUEUED),
        )
        return int(row[0]) if row else None

    def running(self, model_key: str) -> list[str]:
        """This replica's RUNNING jobs of `model_key`."""
        rows = self.db.query("SELECT id FROM jobs WHERE model_key = ? AND status = ? AND replica = ?",
                             (model_key, _RUNNING, self.replica_id))
        return [r[0] for r in rows]

    def holder(self, job_id: str) -> tuple[str, str | None] | None:
        """(replica id, its advertised URL) of the replica running `job_id`, if any."""
        row = self.db.query_one(
            "SELECT j.replica, r.url FROM jobs j LEFT JOIN replicas r ON r.id = j.replica"
            " WHERE j.id = ? AND j.status = ? AND j.replica IS NOT NULL",
            (job_id, _RUNNING),
        )
        return (row[0], row[1]) if row else None

    def events_after_seq(self, after: int, limit: int = 1000) -> list[Event]:
        """Every job's stored events after `after` (the relay to other replicas' watchers)."""
        rows = self.db.query("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
        return [event_from_row(r) for r in rows]

    def last_seq(self) -> int:
        row = self.db.query_one("SELECT COALESCE(MAX(seq), 0) FROM events")
        return int(row[0]) if row else 0

    # -- payloads -------------------------------------------------------------------------

    def payload(self, job_id: str) -> bytes | None:
        row = self.db.query_one("SELECT data FROM payloads WHERE job_id = ?", (job_id,))
        return bytes(row[0]) if row else None

    def delete_payload(self, job_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM payloads WHERE job_id = ?", (job_id,))

    # -- leases ---------------------------------------------------------------------------

    def beat(self, url: str, now: float | None = None) -> None:
        """This replica is alive: its row in `replicas` and its RUNNING jobs' heartbeats."""
        now = time.time() if now is None else now
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO replicas (id, url, started, heartbeat) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat, url = excluded.url",
                (self.replica_id, url, now, now),
            )
            conn.execute("UPDATE jobs SET heartbeat = ? WHERE replica = ? AND status = ?",
                         (now, self.replica_id, _RUNNING))

    def leave(self) -> None:
        """A replica that stops cleanly: its row goes (its jobs, if any, expire as usual)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM replicas WHERE id = ?", (self.replica_id,))

    def stale_running(self, cutoff: float) -> list[tuple[JobRecord, str]]:
        """RUNNING jobs whose replica has not beaten since `cutoff`: (record, that replica)."""
        rows = self.db.query(
            "SELECT * FROM jobs WHERE status = ? AND (heartbeat IS NULL OR heartbeat < ?)", (_RUNNING, cutoff)
        )
        return [(JobRecord.from_row(r), r["replica"]) for r in rows]

    def requeue_stale(self, job_id: str, replica: str | None, description: str) -> Event | None:
        """RUNNING -> QUEUED, only if `replica` still holds it (another replica may have
        requeued and a third claimed it meanwhile)."""
        now = time.time()
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = ?, description = ?, updated = ?, started = NULL, replica = NULL,"
                " heartbeat = NULL WHERE id = ? AND status = ? AND replica IS NOT DISTINCT FROM ?",
                (_QUEUED, description, now, job_id, _RUNNING, replica),
            )
            if cur.rowcount == 0:
                return None
            return insert_event(conn, job_id, _QUEUED, description, None, now)
