"""The durable job store: job rows and their status events, in SQLite or PostgreSQL (`db.py`).

Every state change is one transaction that updates the job row and appends an event; the
caller announces the returned event only after the commit, which is how "the server never
loses a job" holds: anything a client was told is already on disk. The SQL is written once
for both databases (`?` placeholders; `db.lock_rows` where a row must not change under a
read-then-write); the shared queue's claims are `store_queue.py`.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

from ..contract.http import PENDING, TERMINAL, JobStatus
from .db import Database

__all__ = ["Event", "JobRecord", "JobStore", "queued_text", "insert_event", "event_from_row"]


@dataclass(frozen=True)
class Event:
    """One status message, as sent on the WebSocket. `seq` is None for transient updates
    (queue position changes, STREAM), which are not stored."""

    job_id: str
    status: str
    description: str
    queue_position: int | None
    time: float
    seq: int | None = None
    category: str | None = None  # ERROR events: the error category
    # STREAM events (transient, never stored): the local block the job waits for, numbered
    # per job from 1, and its `with` line in the user's code.
    exchange: int | None = None
    line: int | None = None
    # ... and, when small, the values sent down to it (saves the client a GET per block).
    values: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.job_id,
            "seq": self.seq,
            "status": self.status,
            "description": self.description,
            "queue_position": self.queue_position,
            "time": self.time,
        }
        if self.category is not None:
            data["error_category"] = self.category
        if self.exchange is not None:
            data["exchange"] = self.exchange
            data["line"] = self.line
            if self.values is not None:
                data["values"] = base64.b64encode(self.values).decode("ascii")
        return data

    @property
    def terminal(self) -> bool:
        return self.status in _TERMINAL_NAMES


_TERMINAL_NAMES = frozenset(s.value for s in TERMINAL)


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    key_id: str | None
    model_key: str
    status: str
    description: str
    error_category: str | None
    callback: str | None
    client_version: str | None
    payload_size: int
    result_size: int | None
    attempts: int
    log_count: int
    created: float
    updated: float
    started: float | None
    finished: float | None
    expires_at: float | None
    # Co-batching: the rows of the shared forward the job ran in; None when it ran alone.
    batch_rows: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> "JobRecord":
        # Only the record's fields: PostgreSQL's jobs table has the shared queue's columns too.
        return cls(**{k: row[k] for k in row.keys() if k in _RECORD_FIELDS})

    @property
    def terminal(self) -> bool:
        return self.status in _TERMINAL_NAMES

    def to_json(self, queue_position: int | None = None) -> dict[str, Any]:
        data = asdict(self)
        # Internal bookkeeping that users need not see.
        for private in ("key_id", "log_count", "callback", "client_version"):
            data.pop(private)
        data["queue_position"] = queue_position
        data["time"] = self.updated
        return data


_RECORD_FIELDS = frozenset(f.name for f in fields(JobRecord))


def event_from_row(row: Any) -> Event:
    return Event(
        job_id=row["job_id"],
        status=row["status"],
        description=row["description"],
        queue_position=row["queue_position"],
        time=row["time"],
        seq=row["seq"],
        category=row["category"],
    )


def insert_event(
    conn: Any,
    job_id: str,
    status: str,
    description: str,
    position: int | None,
    now: float,
    category: str | None = None,
) -> Event:
    # RETURNING (SQLite 3.35+, PostgreSQL): PostgreSQL has no lastrowid.
    row = conn.execute(
        "INSERT INTO events (job_id, status, description, queue_position, time, category)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
        (job_id, status, description, position, now, category),
    ).fetchone()
    return Event(job_id, status, description, position, now, int(row[0]), category)


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- creation -------------------------------------------------------------------------

    def create(
        self,
        job_id: str,
        *,
        owner: str,
        key_id: str | None,
        model_key: str,
        payload_size: int,
        callback: str | None,
        client_version: str | None,
        queue_position: int,
        payload: bytes | None = None,
        share_key: str | None = None,
        share_rows: int = 1,
    ) -> list[Event]:
        """Insert a job already QUEUED, with its RECEIVED and QUEUED events, in one commit.

        With a shared queue (`db.shared_queue`), `payload` goes in the same commit (every
        replica reads it from there) with the co-batching key and rows its claim needs."""
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, owner, key_id, model_key, status, callback, client_version,"
                " payload_size, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, owner, key_id, model_key, JobStatus.QUEUED.value, callback, client_version,
                 payload_size, now, now),
            )
            if self.db.shared_queue:
                conn.execute("UPDATE jobs SET share_key = ?, share_rows = ? WHERE id = ?",
                             (share_key, share_rows, job_id))
                if payload is not None:
                    conn.execute("INSERT INTO payloads (job_id, data) VALUES (?, ?)", (job_id, payload))
            received = insert_event(conn, job_id, "RECEIVED", "Payload received and validated.", None, now)
            queued = insert_event(conn, job_id, "QUEUED", queued_text(queue_position), queue_position, now)
        return [received, queued]

    # -- reads ----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_row(row) if row else None

    def count_in_flight(self, key_id: str) -> int:
        """Jobs of this API key not finished yet (queued or running): the per-key limit's count."""
        row = self.db.query_one(
            "SELECT COUNT(*) FROM jobs WHERE key_id = ? AND status IN (?, ?, ?)",
            (key_id, JobStatus.RECEIVED.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value),
        )
        return int(row[0]) if row else 0

    def get_owned(self, job_id: str, owner: str) -> JobRecord | None:
        """The job if `owner` owns it; None otherwise, so callers answer 404 either way and
        never reveal that another user's job exists."""
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner))
        return JobRecord.from_row(row) if row else None

    def list_jobs(self, owner: str | None = None, *, status: str | None = None, limit: int = 100) -> list[JobRecord]:
        clauses, params = [], []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.query(f"SELECT * FROM jobs {where} ORDER BY created DESC LIMIT ?", (*params, limit))
        return [JobRecord.from_row(r) for r in rows]

    def pending(self) -> list[JobRecord]:
        """Jobs a restarted server still owes work for, oldest first (keeps FIFO order)."""
        names = tuple(s.value for s in PENDING)
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(names))}) ORDER BY created, rowid", names
        )
        return [JobRecord.from_row(r) for r in rows]

    def events_after(self, job_id: str, after: int = 0) -> list[Event]:
        rows = self.db.query("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after))
        return [event_from_row(r) for r in rows]

    def latest_event(self, job_id: str) -> Event | None:
        # The latest *state* event: a LOG line is not the job's state.
        row = self.db.query_one(
            "SELECT * FROM events WHERE job_id = ? AND status != 'LOG' ORDER BY seq DESC LIMIT 1", (job_id,)
        )
        return event_from_row(row) if row else None

    def timelines(self, job_ids: list[str]) -> dict[str, list[Event]]:
        """Each job's stored state events, oldest first, without its LOG lines (up to
        `max_log_events` a job, which a timeline does not need): one query for all the jobs."""
        found: dict[str, list[Event]] = {job_id: [] for job_id in job_ids}
        if found:
            marks = ",".join("?" * len(found))
            rows = self.db.query(
                f"SELECT * FROM events WHERE job_id IN ({marks}) AND status != 'LOG' ORDER BY seq", tuple(found)
            )
            for row in rows:
                found[row["job_id"]].append(event_from_row(row))
        return found

    def expired(self, now: float) -> list[JobRecord]:
        names = tuple(s.value for s in TERMINAL if s is not JobStatus.EXPIRED)
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(names))})"
            " AND expires_at IS NOT NULL AND expires_at <= ?",
            (*names, now),
        )
        return [JobRecord.from_row(r) for r in rows]

    # -- state changes --------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        status: JobStatus,
        description: str = "",
        *,
        expect: Iterable[JobStatus] | None = None,
        queue_position: int | None = None,
        **fields: Any,
    ) -> Event | None:
        """Move a job to `status` and record the event, atomically.

        With `expect`, nothing happens (None is returned) unless the job is currently in one of
        those states: this is how a cancel and a worker racing for the same job agree.
        `fields` are extra job columns to set (started, finished, result_size, ...).
        """
        now = time.time()
        columns = {"status": status.value, "description": description, "updated": now, **fields}
        assignments = ", ".join(f"{name} = ?" for name in columns)
        sql = f"UPDATE jobs SET {assignments} WHERE id = ?"
        params: list[Any] = [*columns.values(), job_id]
        if expect is not None:
            allowed = [s.value for s in expect]
            sql += f" AND status IN ({','.join('?' * len(allowed))})"
            params.extend(allowed)
        with self.db.transaction() as conn:
            if conn.execute(sql, params).rowcount == 0:
                return None
            return insert_event(conn, job_id, status.value, description, queue_position, now,
                                 fields.get("error_category"))

    def add_log(self, job_id: str, line: str, *, limit: int) -> Event | None:
        """Record one LOG line; past `limit` lines per job, one notice and then nothing."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT log_count FROM jobs WHERE id = ?{self.db.lock_rows}", (job_id,)).fetchone()
            if row is None or row[0] > limit:
                return None
            conn.execute("UPDATE jobs SET log_count = log_count + 1 WHERE id = ?", (job_id,))
            if row[0] == limit:
                line = f"[interlace] more than {limit} log lines; further output of this job is dropped."
            return insert_event(conn, job_id, "LOG", line, None, now)

    def expire(self, job_id: str) -> Event | None:
        """Mark a finished job EXPIRED and drop its event history (its LOG lines can be large)."""
        now = time.time()
        names = [s.value for s in TERMINAL if s is not JobStatus.EXPIRED]
        with self.db.transaction() as conn:
            cur = conn.execute(
                f"UPDATE jobs SET status = 'EXPIRED', updated = ?, description = ?"
                f" WHERE id = ? AND status IN ({','.join('?' * len(names))})",
                (now, _EXPIRED_TEXT, job_id, *names),
            )
            if cur.rowcount == 0:
                return None
            conn.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            return insert_event(conn, job_id, "EXPIRED", _EXPIRED_TEXT, None, now)


_EXPIRED_TEXT = "The result expired and was deleted; submit the job again."


def queued_text(position: int) -> str:
    return f"Position {position} in the queue." if position > 1 else "Next in the queue."
