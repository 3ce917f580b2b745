"""The PostgreSQL database (`interlace serve --store postgresql://...`): one job store that
several API replicas share.

Same face as the SQLite `db.Database` (`transaction()`, `query()`, `query_one()`, `?`
placeholders, rows indexed by position or name), so the stores' SQL is written once. What
differs is said by attributes: `shared_queue` (the queue lives in the `jobs` table and every
replica claims from it with `FOR UPDATE SKIP LOCKED`, `store.JobStore.claim_next`) and
`lock_rows`.

Connections: a small pool (psycopg 3, autocommit; `transaction()` opens a real transaction on
one of them). A thread that is inside a transaction and queries again uses the same
connection, so it sees its own writes and never waits for a second connection it may not get.

The schema is this file's dialect of `db.SCHEMA` plus the tables a shared queue needs
(`payloads`, `results`, `queue_turns`, `replicas`); its version lives in a `schema_version`
table, written under an advisory lock so that replicas starting together create it once.
The `jobs.rowid` column (BIGSERIAL) stands in for SQLite's implicit rowid: the order jobs
were committed in, the tie-break of the queue's order.
"""

from __future__ import annotations

import queue
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

__all__ = ["PostgresDatabase", "PG_SCHEMA_VERSION", "PgRow", "redact_url", "translate"]

#: 1: the first PostgreSQL schema (SQLite schema 2's columns, plus the shared queue's).
PG_SCHEMA_VERSION = 1

# Connections per process: request handlers, worker threads, the lease keeper and the relay
# share them; a thread waits for a free one rather than opening more.
POOL_SIZE = 12
CONNECT_TIMEOUT_S = 10
# Any constant works; it only has to be the same for every replica.
_SCHEMA_LOCK = 0x1A7E_5CE0

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    rowid BIGSERIAL,
    owner TEXT NOT NULL,
    key_id TEXT,
    model_key TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    error_category TEXT,
    callback TEXT,
    client_version TEXT,
    payload_size BIGINT NOT NULL DEFAULT 0,
    result_size BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    log_count INTEGER NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    expires_at DOUBLE PRECISION,
    batch_rows INTEGER,
    share_key TEXT,
    share_rows INTEGER NOT NULL DEFAULT 1,
    replica TEXT,
    heartbeat DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(model_key, status, created, rowid);
CREATE TABLE IF NOT EXISTS events (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    queue_position INTEGER,
    time DOUBLE PRECISION NOT NULL,
    category TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BYTEA NOT NULL,
    hash BYTEA NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS payloads (job_id TEXT PRIMARY KEY, data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS results (job_id TEXT PRIMARY KEY, data BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS queue_turns (
    model_key TEXT NOT NULL,
    fair_key TEXT NOT NULL,
    served BIGINT NOT NULL,
    PRIMARY KEY (model_key, fair_key)
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    heartbeat DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""

MSG_NO_PSYCOPG = (
    "--store postgresql://... needs psycopg 3. Install it with: pip install 'interlace[postgres]' (or 'psycopg[binary]>=3.1')"
)
MSG_CONNECT = (
    "Cannot connect to the PostgreSQL job store {url}: {error}. Check that the server runs and the "
    "URL's user, host, port and database are right, e.g. "
    "`psql 'postgresql://interlace@db-host:5432/interlace' -c 'select 1'`."
)
MSG_NEWER = (
    "The PostgreSQL job store {url} was written by a newer Interlace (schema {found}, this one knows "
    "{known}). Upgrade Interlace on every API replica, or point --store at another database."
)

# A `?` outside quotes; the stores' SQL has no `%`, but escape any so psycopg never reads one.
_PLACEHOLDER = re.compile(r"'[^']*'|\?|%")


def redact_url(url: str) -> str:
    """`url` without its password, for logs and messages."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return url
    return f"{scheme}{sep}{auth.split(':', 1)[0]}:***@{host}"


def translate(sql: str) -> str:
    """SQLite-style `?` placeholders to psycopg's `%s` (string literals left alone)."""
    def swap(match: re.Match[str]) -> str:
        text = match.group(0)
        return "%s" if text == "?" else "%%" if text == "%" else text

    return _PLACEHOLDER.sub(swap, sql)


class PgRow(tuple):  # type: ignore[type-arg]
    """A row read by position (`row[0]`) or column name (`row["id"]`), like `sqlite3.Row`."""

    _names: tuple[str, ...]

    def __new__(cls, names: tuple[str, ...], values: Sequence[Any]) -> "PgRow":
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = tuple(column.name for column in (cursor.description or ()))

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(names, values)

    return make


class _Conn:
    """What `transaction()` yields: `execute(sql, params)` with `?` placeholders, returning a
    cursor (`rowcount`, `fetchone()`, `fetchall()`)."""

    def __init__(self, conn: Any) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        return self.raw.execute(translate(sql), tuple(params) if isinstance(params, list) else params)


class PostgresDatabase:
    dialect = "postgresql"
    shared_queue = True  # every API replica claims jobs from the `jobs` table
    lock_rows = " FOR UPDATE"

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        try:
            import psycopg
        except ImportError:
            raise RuntimeError(MSG_NO_PSYCOPG) from None
        self._psycopg = psycopg
        self.url = url
        self._shown = redact_url(url)
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._held = threading.local()  # the connection this thread's transaction uses
        self._all: list[Any] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._create_schema()

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                         row_factory=_row_factory)
        except self._psycopg.OperationalError as exc:
            raise RuntimeError(MSG_CONNECT.format(url=self._shown, error=str(exc).strip())) from None
        with self._all_lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        held = getattr(self._held, "conn", None)
        if held is not None:  # inside this thread's transaction: same connection
            yield held
            return
        self._slots.acquire()
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            if conn.closed or conn.broken:
                conn = self._connect()
            try:
                yield conn
            finally:
                if not (conn.closed or conn.broken):
                    self._idle.put(conn)
        finally:
            self._slots.release()

    # -- the Database face ----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[_Conn]:
        """Run statements atomically (READ COMMITTED; rows that must not change under the
        caller are locked with `lock_rows`); committed before the caller continues."""
        with self._connection() as conn:
            outer = getattr(self._held, "conn", None)
            self._held.conn = conn
            try:
                with conn.transaction():
                    yield _Conn(conn)
            finally:
                self._held.conn = outer

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[PgRow]:
        with self._connection() as conn:
            return conn.execute(translate(sql), params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> PgRow | None:
        with self._connection() as conn:
            return conn.execute(translate(sql), params).fetchone()

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # closing at shutdown: nothing left to do about it
                pass

    def describe(self) -> str:
        return self._shown

    # -- schema ---------------------------------------------------------------------------

    def _create_schema(self) -> None:
        with self.transaction() as conn:
            # Replicas starting at once: one creates the tables, the others wait, then see them.
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            for statement in PG_SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            found = row[0] if row is not None else None
            if found is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (PG_SCHEMA_VERSION,))
            elif found > PG_SCHEMA_VERSION:
                raise RuntimeError(MSG_NEWER.format(url=self._shown, found=found, known=PG_SCHEMA_VERSION))
            # Later versions migrate here, `found` -> PG_SCHEMA_VERSION, in this transaction.
