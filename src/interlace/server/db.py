"""The database shared by the job store and the key store: SQLite here, PostgreSQL beside.

`open_database(store, data_dir)` is the one place that picks: no `--store` is this file's
SQLite `Database` in the data directory (the embedded default); `--store postgresql://...` is
`db_postgres.PostgresDatabase`, which several API replicas share. Both have the same face
(`transaction()`, `query()`, `query_one()`, `close()`, `?` placeholders, rows indexed by
position or name) and say what differs in three attributes the stores read: `dialect`,
`shared_queue` (the queue lives in the database, so every replica claims from it) and
`lock_rows` (the suffix that locks selected rows for the transaction).

SQLite: one connection guarded by a lock: the server's writes are tiny (a row and an event),
so a lock is cheaper than a connection pool, and WAL lets the CLI (`interlace jobs`, `keys`)
read and write from another process while the server runs.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# (psycopg itself is imported only when a PostgreSQL store is opened.)
from .db_postgres import PostgresDatabase, redact_url

__all__ = ["Database", "SCHEMA_VERSION", "POSTGRES_SCHEMES", "is_postgres_url", "open_database",
           "redact_url"]

#: `--store` URL schemes that select PostgreSQL.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")

MSG_BAD_STORE = (
    "--store {store!r} is not a PostgreSQL URL. Leave --store out for the embedded SQLite store in "
    "the data directory, or give one like: --store postgresql://interlace@db-host:5432/interlace"
)

#: 1: the first schema; 2: `jobs.batch_rows` (co-batching: the rows of the forward a job ran
#: in, NULL when it ran alone), added to a version-1 file by `_migrate`.
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    key_id TEXT,
    model_key TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    error_category TEXT,
    callback TEXT,
    client_version TEXT,
    payload_size INTEGER NOT NULL DEFAULT 0,
    result_size INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    log_count INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    expires_at REAL,
    batch_rows INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    status TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    queue_position INTEGER,
    time REAL NOT NULL,
    category TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL
);
"""


class Database:
    """SQLite in one file (the embedded default): the queue stays in memory (`workers.py`)."""

    dialect = "sqlite"
    shared_queue = False  # one server per file: its queue is in memory
    lock_rows = ""  # BEGIN IMMEDIATE already holds the whole file for the transaction

    def __init__(self, path: Path | str, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so a transaction is exactly the
        # `with db.transaction()` block and nothing is left open between calls.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed; FULL also
            # survives power loss at the cost of an fsync per commit.
            self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._conn.execute("PRAGMA busy_timeout=10000")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"The database {self.path} was written by a newer Interlace (schema {version}, "
                    f"this one knows {SCHEMA_VERSION}). Upgrade Interlace or use another --data-dir."
                )
            self._conn.executescript(SCHEMA)
            if version < SCHEMA_VERSION:
                self._migrate()

    def _migrate(self) -> None:
        """Bring an older file up to SCHEMA_VERSION in place (a new file already has it all).

        In one write transaction that looks again at what the file has: a CLI command and the
        server opening the same old file at once must not both add a column."""
        with self.transaction() as conn:
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "batch_rows" not in columns:  # version 1 -> 2
                conn.execute("ALTER TABLE jobs ADD COLUMN batch_rows INTEGER")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run statements atomically; the commit happens before the block's caller continues."""
        with self._lock:
            # IMMEDIATE takes the write lock up front, so two processes never deadlock
            # upgrading read locks.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def describe(self) -> str:
        """Where the data lives, for messages."""
        return str(self.path)


def is_postgres_url(store: str | None) -> bool:
    return bool(store) and str(store).startswith(POSTGRES_SCHEMES)


def open_database(store: str | None, data_dir: Path | str, *, fsync: bool = False) -> Any:
    """The server's database: `store` None is SQLite at `data_dir/interlace.db` (unchanged
    default); a `postgresql://` URL is a PostgreSQL database that several API replicas share."""
    if not store:
        return Database(Path(data_dir) / "interlace.db", fsync=fsync)
    if not is_postgres_url(store):
        raise ValueError(MSG_BAD_STORE.format(store=store))
    return PostgresDatabase(store)
