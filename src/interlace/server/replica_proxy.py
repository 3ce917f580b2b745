"""Several API replicas on one PostgreSQL job store behave as one server: shared limits and
local blocks served through any replica.

A client behind a load balancer reaches any replica, while a job runs on the one that claimed
it. What the embedded server keeps in memory is therefore kept, or reached, across replicas:

- Per-key limits: the in-flight check and the job's insert are one transaction serialized per
  key (`lock_key`, an advisory transaction lock on the key id), and the requests-per-minute
  bucket is a row of `key_buckets` (`limits.SharedRateLimiter`), so N replicas never give a
  key N times its limits.
- Local blocks (`with interlace.local():`): the replica running the job (the holder) writes the
  block it waits for to `local_blocks` (`LocalBlockBoard`), so every replica's status JSON and
  WebSockets show it (the event relay of `shared_queue.py` turns new rows into STREAM events
  for its watchers, and marks the rows of jobs a client follows here as seen, which keeps the
  holder waiting). The client's requests for a block (GET/POST `JOB_LOCAL`, a WebSocket's final
  frame) reaching another replica are forwarded to the holder's advertised URL with the client's
  own key (`forward_local`, `forward_frame`): the holder checks ownership again and answers as
  it would directly; the answer is relayed unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx

from ..contract.http import JOB_LOCAL, KEY_HEADER, LOCAL_HEADER, VERSION_HEADER, parse_local_frame
from .local_exchange import ExchangeError, make_stream_event
from .store import Event

__all__ = [
    "FORWARDED_HEADER",
    "LocalBlockBoard",
    "LocalElsewhere",
    "PendingBlock",
    "SHARED_SCHEMA",
    "ensure_shared_tables",
    "forward_frame",
    "forward_frame_soon",
    "forward_local",
    "lock_key",
    "SEEN_WINDOW_S",
]

log = logging.getLogger("interlace.server")

#: Marks a request one replica forwarded to another: it is never forwarded again (a job that
#: moved meanwhile gets the 409 that names where it runs, not a loop).
FORWARDED_HEADER: Final = "X-Interlace-Forwarded"
#: Headers of the client's request that travel with it to the holder.
_PASSED_HEADERS = (KEY_HEADER, VERSION_HEADER, LOCAL_HEADER, "content-type", "content-length")
#: A client seen through another replica within this many seconds keeps the holder waiting.
SEEN_WINDOW_S: Final = 3.0
# Any constant works; it only has to be the same for every replica (not db_postgres's).
_TABLES_LOCK: Final = 0x1A7E_5CE1
_KEY_LOCK_CLASS: Final = 0x1A7E

MSG_HOLDER_UNREACHABLE: Final = (
    "Job {job_id} runs on another API replica ({url}), and this replica could not reach it to pass on "
    "your local block's request: {error}. Check that every replica's --advertise-url is reachable from "
    "the others (`curl {url}/v1/info`), or send the job's requests to that replica's own URL: "
    "interlace.CONFIG.set_default_host({url!r})."
)

SHARED_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS key_buckets (
    key_id TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    ok BOOLEAN NOT NULL DEFAULT TRUE
);
CREATE TABLE IF NOT EXISTS local_blocks (
    job_id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    exchange INTEGER NOT NULL,
    line INTEGER NOT NULL,
    data BYTEA,
    started DOUBLE PRECISION NOT NULL,
    seen DOUBLE PRECISION
);
"""


def ensure_shared_tables(db: Any) -> None:
    """Create this module's tables (once, whichever replica starts first)."""
    with db.transaction() as conn:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_TABLES_LOCK,))
        for statement in SHARED_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)


def lock_key(conn: Any, key_id: str) -> None:
    """Serialize, until the transaction ends, every replica's accept for this API key: the
    in-flight count and the insert it allows happen as one step."""
    conn.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_KEY_LOCK_CLASS, key_id))


class LocalElsewhere(ExchangeError):
    """The job's local block is served by another replica, at `url` (409 when not forwarded)."""

    def __init__(self, text: str, url: str | None) -> None:
        super().__init__(409, text)
        self.url = url


@dataclass(frozen=True)
class PendingBlock:
    """The local block a job waits for, as the holder stored it."""

    job_id: str
    exchange: int
    line: int
    values: bytes | None  # inline values (small ones), as in the STREAM event

    def event(self) -> Event:
        return make_stream_event(self.job_id, self.exchange, self.line, self.values)


class LocalBlockBoard:
    """`local_blocks`: the pending local block of each job, written by its holder."""

    def __init__(self, db: Any, replica_id: str) -> None:
        self.db = db
        self.replica_id = replica_id

    def put(self, job_id: str, exchange: int, line: int, values: bytes | None) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO local_blocks (job_id, replica, exchange, line, data, started, seen)"
                " VALUES (?, ?, ?, ?, ?, ?, NULL) ON CONFLICT (job_id) DO UPDATE SET replica = excluded.replica,"
                " exchange = excluded.exchange, line = excluded.line, data = excluded.data,"
                " started = excluded.started, seen = NULL",
                (job_id, self.replica_id, exchange, line, values, now),
            )

    def clear(self, job_id: str, exchange: int | None = None) -> None:
        """The block is over (`exchange`), or the job (None)."""
        with self.db.transaction() as conn:
            if exchange is None:
                conn.execute("DELETE FROM local_blocks WHERE job_id = ?", (job_id,))
            else:
                conn.execute("DELETE FROM local_blocks WHERE job_id = ? AND exchange = ?", (job_id, exchange))

    def get(self, job_id: str) -> PendingBlock | None:
        """The block `job_id` waits for, if its holder still runs it."""
        row = self.db.query_one(
            "SELECT b.exchange, b.line, b.data FROM local_blocks b JOIN jobs j ON j.id = b.job_id"
            " AND j.replica = b.replica AND j.status = 'RUNNING' WHERE b.job_id = ?", (job_id,))
        return None if row is None else PendingBlock(job_id, int(row[0]), int(row[1]),
                                                     None if row[2] is None else bytes(row[2]))

    def pending(self, exclude: str | None = None) -> list[PendingBlock]:
        """Every job's pending block (a short list: blocks last seconds), for the relay;
        `exclude`: not those of this replica (it announces its own)."""
        rows = self.db.query(
            "SELECT b.job_id, b.exchange, b.line, b.data FROM local_blocks b JOIN jobs j ON j.id = b.job_id"
            " AND j.replica = b.replica AND j.status = 'RUNNING' WHERE b.replica <> ?", (exclude or "",))
        return [PendingBlock(r[0], int(r[1]), int(r[2]), None if r[3] is None else bytes(r[3])) for r in rows]

    def touch(self, job_ids: list[str]) -> None:
        """A client that runs these jobs' blocks follows them through this replica."""
        if not job_ids:
            return
        marks = ",".join("?" * len(job_ids))
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE local_blocks SET seen = ? WHERE job_id IN ({marks})", (time.time(), *job_ids))

    def seen_recently(self, job_id: str) -> bool:
        """Whether another replica saw the job's client within `SEEN_WINDOW_S`."""
        row = self.db.query_one("SELECT seen FROM local_blocks WHERE job_id = ?", (job_id,))
        return row is not None and row[0] is not None and row[0] >= time.time() - SEEN_WINDOW_S

    def sweep(self) -> None:
        """Rows of jobs no longer running (their replica died mid-block)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM local_blocks b WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = b.job_id"
                         " AND j.replica = b.replica AND j.status = 'RUNNING')")


def _holder_request(url: str, job_id: str, exchange: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    target = url.rstrip("/") + JOB_LOCAL.format(job_id=job_id, exchange=exchange)
    return target, {**headers, FORWARDED_HEADER: "1"}


async def forward_local(request: Any, away: LocalElsewhere, job_id: str, exchange: str,
                        timeout: float) -> Any:
    """Pass the client's GET/POST `JOB_LOCAL` to the holder and relay its answer (status, body,
    content type) unchanged. Raises `away` itself when the request was forwarded already."""
    from fastapi.responses import Response

    if away.url is None or request.headers.get(FORWARDED_HEADER):
        raise away
    headers = {name: request.headers[name] for name in _PASSED_HEADERS if name in request.headers}
    target, headers = _holder_request(away.url, job_id, exchange, headers)
    # Streamed, not read here: the holder applies its size limits (413) as to any client.
    body = request.stream() if request.method == "POST" else None
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            answer = await client.request(request.method, target, headers=headers, content=body)
    except httpx.HTTPError as exc:
        raise ExchangeError(502, MSG_HOLDER_UNREACHABLE.format(job_id=job_id, url=away.url,
                                                               error=f"{type(exc).__name__}: {exc}")) from None
    media = answer.headers.get("content-type")
    return Response(answer.content, status_code=answer.status_code, media_type=media)


async def forward_frame(away: LocalElsewhere, job_id: str, frame: bytes, key: str | None,
                        version: str | None, timeout: float) -> None:
    """A WebSocket's final local-block frame for a job another replica runs: POSTed to the
    holder as the same message. Like a frame the holder drops, a failure is only logged: the
    client learns what became of the block from the job's events."""
    if away.url is None or not key:
        return
    try:
        number, header, body = parse_local_frame(frame)
    except ValueError:
        return
    op = header.pop("op", None)
    if op == "failed":
        body = json.dumps(header).encode()
    elif op != "done":
        return  # a read needs its answer: the client POSTs it
    headers = {KEY_HEADER: key, LOCAL_HEADER: op, "content-type": "application/octet-stream"}
    if version:
        headers[VERSION_HEADER] = version
    target, headers = _holder_request(away.url, job_id, str(number), headers)
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            await client.post(target, headers=headers, content=body)
    except httpx.HTTPError as exc:
        log.warning("could not pass job %s's local block frame to its replica %s: %s", job_id, away.url, exc)


_FORWARDING: set[Any] = set()  # frames on their way (a task nobody holds may be collected)


def forward_frame_soon(away: LocalElsewhere, job_id: str, frame: bytes, key: str | None, version: str | None,
                       timeout: float) -> None:
    """`forward_frame` as a task of the running loop (the WebSocket reads on meanwhile)."""
    import asyncio

    task = asyncio.ensure_future(forward_frame(away, job_id, frame, key, version, timeout))
    _FORWARDING.add(task)
    task.add_done_callback(_FORWARDING.discard)
