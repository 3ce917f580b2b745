"""The local job history's store: every `remote=True` and `remote='local'` run, one SQLite file.

The backends record a run through a `JobRun` (`simulation.py`, `remote.py`): made when the
request bytes exist, told each step, written once when the run ends (`finish`). A server job
that was not waited for (`blocking=False`) is written when submitted and again when its result
is fetched. `interlace.jobs` (`history.py`) reads, reruns, compares and prunes the records.

The file is `history.sqlite3` under `config.data_dir()` (`$INTERLACE_DATA_DIR`, else
`$XDG_DATA_HOME/interlace`, else `~/.local/share/interlace`), in WAL mode with a busy timeout,
so several processes and threads may record at once. `CONFIG.APP.HISTORY = False` records
nothing; `CONFIG.APP.HISTORY_RESULTS = True` keeps the result bytes too.

Recording never breaks or slows a run: a writer thread writes the rows (reads wait for the
rows handed in before them), and any failure to write warns once per process (naming the file
and the off switch) while the run goes on.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import sqlite3
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Iterator, Sequence

from ..config import CONFIG, data_dir
from ..tracing.backend import CapturedTrace

__all__ = [
    "HISTORY_FILE", "MSG_NOT_RECORDED", "JobRecord", "JobRun", "ModelNotFromFiles", "history_path",
    "model_load_spec", "record_run", "store",
]

HISTORY_FILE: Final = "history.sqlite3"

MSG_NOT_RECORDED: Final = (
    "Interlace could not record this run in the local job history ({path}): {error}. The run "
    "itself is unaffected; this warning is shown once. Point the history elsewhere with "
    "`export INTERLACE_DATA_DIR=/a/writable/dir`, or turn it off: `interlace.CONFIG.APP.HISTORY = False`."
)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    mode TEXT NOT NULL,
    kind TEXT NOT NULL,
    model_key TEXT NOT NULL,
    model_source TEXT,
    host TEXT,
    server_job_id TEXT,
    status TEXT NOT NULL,
    timeline TEXT NOT NULL,
    payload_size INTEGER NOT NULL,
    result_size INTEGER,
    source TEXT NOT NULL,
    filename TEXT NOT NULL,
    lineno INTEGER NOT NULL,
    error TEXT,
    error_category TEXT,
    dry_run INTEGER NOT NULL DEFAULT 0,
    mocked TEXT NOT NULL DEFAULT '[]',
    rerun_of TEXT,
    -- the bytes last: reading the columns above never touches their overflow pages
    payload BLOB,
    result BLOB
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
"""

#: Every column but the bytes, in `JobRecord`'s order.
SUMMARY_COLUMNS: Final = (
    "id", "created", "mode", "kind", "model_key", "model_source", "host", "server_job_id", "status",
    "timeline", "payload_size", "result_size", "source", "filename", "lineno", "error", "error_category",
    "dry_run", "mocked", "rerun_of",
)


def history_path() -> Path:
    """The history file: `history.sqlite3` under `config.data_dir()`."""
    global _path
    # Asked on every run: building the path anew costs more than the rest of a record.
    env = (os.environ.get("INTERLACE_DATA_DIR"), os.environ.get("XDG_DATA_HOME"), os.environ.get("HOME"))
    if _path is None or _path[0] != env:
        _path = (env, data_dir() / HISTORY_FILE)
    return _path[1]


_path: tuple[tuple[str | None, ...], Path] | None = None


@dataclass(frozen=True)
class JobRecord:
    """One recorded run. `payload` (the request bytes, what `jobs.rerun` replays) and `result`
    (the result bytes, kept when `CONFIG.APP.HISTORY_RESULTS` was on) are filled by
    `jobs.show`, and None in `jobs.list`."""

    id: str
    created: float
    #: "local" (`remote='local'`) or "server" (`remote=True`).
    mode: str
    #: "trace", "generate" or "session".
    kind: str
    #: The key the request named (a server's model key; `local:Class` for an in-memory model).
    model_key: str
    #: How to load the model again (`{"kind": "language_model", "path": ..., "load_kwargs": ...}`),
    #: or None when it was not loaded from a path or hub id.
    model_source: dict[str, Any] | None
    host: str | None
    server_job_id: str | None
    #: The last status: COMPLETED, ERROR, or QUEUED/RUNNING for a server job not waited for.
    status: str
    #: (status, time) in order; a server job's times are the server's.
    timeline: tuple[tuple[str, float], ...]
    payload_size: int
    result_size: int | None
    #: The shipped body's source, and where it starts in the user's file.
    source: str
    filename: str
    lineno: int
    error: str | None
    error_category: str | None
    dry_run: bool
    #: The module paths a mock stood in for.
    mocked: tuple[str, ...]
    #: The record this run replayed (`jobs.rerun`), or None.
    rerun_of: str | None
    payload: bytes | None = field(default=None, repr=False)
    result: bytes | None = field(default=None, repr=False)

    @property
    def when(self) -> datetime:
        return datetime.fromtimestamp(self.created)

    @property
    def duration(self) -> float | None:
        """Seconds from the first status to the last."""
        return self.timeline[-1][1] - self.timeline[0][1] if len(self.timeline) > 1 else None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> JobRecord:
        values = dict(zip(SUMMARY_COLUMNS, row))
        values["model_source"] = json.loads(values["model_source"]) if values["model_source"] else None
        values["timeline"] = tuple((str(s), float(t)) for s, t in json.loads(values["timeline"]))
        values["dry_run"] = bool(values["dry_run"])
        values["mocked"] = tuple(json.loads(values["mocked"]))
        extra = list(row[len(SUMMARY_COLUMNS):]) + [None, None]
        return cls(**values, payload=extra[0], result=extra[1])


class HistoryStore:
    """The SQLite file, and the thread that writes it.

    A run hands its row to `enqueue` and goes on: one writer thread per process writes the rows
    in order (a commit costs a few hundred microseconds on a busy machine; the run does not wait
    for it). Every read first waits for the rows handed in before it (`flush`), so a record is
    there as soon as its run has returned; the rows still queued at exit are written then.
    One connection per process and path, guarded by a lock; WAL, so other processes read and
    write meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: tuple[int, Path, sqlite3.Connection] | None = None
        self._queue: queue.Queue[tuple[Path, dict[str, Any]]] = queue.Queue()
        self._writer: tuple[int, threading.Thread] | None = None
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        # The parent's writer thread is not in the child, and may have held the lock or had
        # rows queued when it forked: the child starts afresh (and opens its own connection).
        self._lock = threading.Lock()
        self._queue = queue.Queue()
        self._writer = None

    @contextmanager
    def connection(self, path: Path | None = None) -> Iterator[sqlite3.Connection]:
        path = history_path() if path is None else path
        with self._lock:
            current = self._open
            # A new path (the environment changed) or a forked child: open afresh.
            if current is None or current[0] != os.getpid() or current[1] != path:
                if current is not None and current[0] == os.getpid():
                    current[2].close()
                self._open = None
                current = (os.getpid(), path, _connect(path))
                self._open = current
            yield current[2]

    def enqueue(self, row: dict[str, Any]) -> None:
        """Write `row` soon, in the writer thread (the path is the one in force now)."""
        writer = self._writer
        if writer is None or writer[0] != os.getpid() or not writer[1].is_alive():
            with self._lock:
                writer = self._writer
                if writer is None or writer[0] != os.getpid() or not writer[1].is_alive():
                    thread = threading.Thread(target=self._write_queued, name="interlace-job-history", daemon=True)
                    thread.start()
                    self._writer = (os.getpid(), thread)
        self._queue.put((history_path(), row))

    def flush(self) -> None:
        """Wait until every row handed in so far is written (or has failed, and warned)."""
        writer = self._writer
        if writer is not None and writer[0] == os.getpid() and writer[1].is_alive():
            self._queue.join()

    def _write_queued(self) -> None:
        rows = self._queue
        while True:
            path, row = rows.get()
            try:
                self.write(row, path)
            except Exception as exc:  # recording must never break a run
                _warn_once(exc, path)
            finally:
                rows.task_done()

    def write(self, row: dict[str, Any], path: Path | None = None) -> None:
        columns = ", ".join(row)
        marks = ", ".join("?" * len(row))
        with self.connection(path) as db:
            # A non-blocking server job is written at submission and again when it ends.
            db.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({marks})", tuple(row.values()))
            db.commit()

    def select(self, where: str = "", params: Sequence[Any] = (), *, limit: int | None = None,
               full: bool = False) -> list[JobRecord]:
        self.flush()
        columns = ", ".join(SUMMARY_COLUMNS + (("payload", "result") if full else ()))
        sql = f"SELECT {columns} FROM runs {where} ORDER BY created DESC, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self.connection() as db:
            rows = db.execute(sql, tuple(params)).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def ids(self, prefix: str) -> list[str]:
        self.flush()
        with self.connection() as db:
            # GLOB, not LIKE: `_` in a prefix is a character, not a wildcard.
            escaped = "".join(f"[{c}]" if c in "*?[" else c for c in prefix)
            return [r[0] for r in db.execute("SELECT id FROM runs WHERE id GLOB ? LIMIT 2", (escaped + "*",))]

    def delete(self, ids: Sequence[str]) -> None:
        self.flush()
        with self.connection() as db:
            db.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in ids])
            db.commit()


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level="DEFERRED")
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA journal_mode = WAL")
    # WAL with NORMAL syncs at checkpoints, not on every commit: a record costs no fsync, and a
    # power cut can lose at most the last few records, never corrupt the file.
    db.execute("PRAGMA synchronous = NORMAL")
    db.executescript(SCHEMA)
    try:
        os.chmod(path, 0o600)  # payloads hold the user's inputs
    except OSError:
        pass
    return db


#: The process's store (`history.py` reads through it too).
store = HistoryStore()
# Rows still queued when the interpreter exits are written first.
atexit.register(store.flush)
_warned = False


def _warn_once(error: BaseException, path: Path) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(MSG_NOT_RECORDED.format(path=path, error=f"{type(error).__name__}: {error}"),
                      RuntimeWarning, stacklevel=2)


class ModelNotFromFiles(ValueError):
    """The model cannot be loaded again from files: `option` is the (name, value) of a load
    option that is not a plain value, or None when it was not loaded from a path or hub id."""

    def __init__(self, kind: str, option: tuple[str, Any] | None = None) -> None:
        self.kind = kind
        self.option = option
        super().__init__(f"this {kind} was not loaded from a path or hub id" if option is None
                         else f"its load option {option[0]}={option[1]!r} is not a plain value")


def model_load_spec(model: Any) -> dict[str, Any]:
    """How a process loads `model` from its files (its path or hub id, its load options): what a
    worker process takes (`simulation.py`, `isolate=True`) and what `jobs.rerun` loads. Raises
    ModelNotFromFiles when there is nothing to load from."""
    state = getattr(model, "__dict__", {})
    path = state.get("repo_id")
    module_name = type(getattr(model, "_module", None)).__name__
    # A LanguageModel built from a module in memory without a config path has its class name here.
    if not isinstance(path, str) or not path or (path == module_name and not os.path.exists(path)):
        raise ModelNotFromFiles(type(model).__name__)
    options: dict[str, Any] = {}
    for name, value in (state.get("_load_kwargs") or {}).items():
        if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
            value = str(value).removeprefix("torch.")  # from_pretrained takes the name
        try:
            json.dumps(value)
        except TypeError:
            raise ModelNotFromFiles(type(model).__name__, (name, value)) from None
        options[name] = value
    return {"kind": "language_model", "path": path, "load_kwargs": options}


def record_run(
    *,
    mode: str,
    model_key: str,
    payload: bytes,
    timeline: Sequence[tuple[str, float]],
    kind: str = "trace",
    source: tuple[str, str, int] = ("", "<unknown>", 1),
    model_source: dict[str, Any] | None = None,
    result: bytes | None = None,
    result_size: int | None = None,
    error: BaseException | None = None,
    error_category: str | None = None,
    host: str | None = None,
    server_job_id: str | None = None,
    rerun_of: str | None = None,
    dry_run: bool = False,
    mocked: Sequence[str] = (),
    run_id: str | None = None,
) -> str | None:
    """Record one run in the history; its id, or None when `CONFIG.APP.HISTORY` is off. The
    row is written by the store's writer thread, so the caller never waits for the disk; a
    write that fails warns once and never raises. `timeline`'s last status is the run's.
    `result` (bytes) is kept only when `CONFIG.APP.HISTORY_RESULTS` is on; its size always."""
    if not CONFIG.APP.HISTORY:
        return None
    run_id = run_id or uuid.uuid4().hex
    try:
        text, category = _error_fields(error, error_category)
        store.enqueue({
            "id": run_id, "created": timeline[0][1] if timeline else time.time(), "mode": mode, "kind": kind,
            "model_key": model_key, "model_source": json.dumps(model_source) if model_source else None,
            "host": host, "server_job_id": server_job_id,
            "status": timeline[-1][0] if timeline else "RECEIVED",
            "timeline": json.dumps([[s, t] for s, t in timeline]),
            "payload_size": len(payload), "result_size": len(result) if result is not None else result_size,
            "source": source[0], "filename": source[1], "lineno": source[2],
            "error": text, "error_category": category, "dry_run": int(bool(dry_run)),
            "mocked": json.dumps(sorted(mocked)), "rerun_of": rerun_of,
            "payload": payload, "result": result if CONFIG.APP.HISTORY_RESULTS else None,
        })
    except Exception as exc:  # recording must never break the run
        _warn_once(exc, history_path())
        return None
    return run_id


def _error_fields(error: BaseException | None, category: str | None) -> tuple[str | None, str | None]:
    if error is None:
        return None, category
    # A job's RemoteException carries the job's own category (the exception's class name, or
    # "timeout", "local-block..."); a refused request, its problems' first category.
    found = category or getattr(error, "category", None)
    problems = getattr(error, "problems", None)
    if not found and problems:
        found = getattr(problems[0], "category", None)
    text = str(error) if str(error) else type(error).__name__
    return text, found or type(error).__name__


class JobRun:
    """A run being recorded. The backend makes one when the request bytes exist, notes the
    statuses it sees (`status`), and calls `finish` once; nothing is written before that (a
    server job not waited for: `submitted`). Cheap when the history is off.

    `dry_run` and `mocked` mark runs on fake tensors or with modules mocked (the records of a
    mocked run are never rerun on a server)."""

    def __init__(self, mode: str, model_key: str, *, model: Any = None, kind: str = "trace",
                 source: tuple[str, str, int] = ("", "<unknown>", 1), host: str | None = None,
                 rerun_of: str | None = None, model_source: dict[str, Any] | None = None,
                 dry_run: bool = False, mocked: Sequence[str] = ()) -> None:
        self.on = CONFIG.APP.HISTORY
        self.id = uuid.uuid4().hex
        self.mode = mode
        self.model_key = model_key
        self.model = model
        self.kind = kind
        self.source = source
        self.host = host
        self.rerun_of = rerun_of
        self.model_source = model_source
        self.dry_run = dry_run
        self.mocked = list(mocked)
        self.server_job_id: str | None = None
        self.timeline: list[tuple[str, float]] = [("RECEIVED", time.time())]
        self.finished = False

    @classmethod
    def for_trace(cls, mode: str, trace: CapturedTrace, model_key: str, *, host: str | None = None,
                  dry_run: bool = False, mocked: Sequence[str] = ()) -> JobRun:
        block = trace.block
        return cls(mode, model_key, model=trace.model, kind=trace.kind, host=host, dry_run=dry_run, mocked=mocked,
                   source=(block.shipped_source, block.filename, block.first_lineno))

    def status(self, name: str, at: float | None = None) -> None:
        self.timeline.append((name, time.time() if at is None else at))

    def submitted(self, payload: bytes, job_id: str, server_status: dict[str, Any] | None = None) -> None:
        """A server job that runs on without being waited for: write it as it stands."""
        self.server_job_id = job_id
        if server_status:
            self._server_timeline(server_status)
        self._write(payload, None, None, None)

    def finish(self, payload: bytes, *, result: bytes | None = None, error: BaseException | None = None,
               server_status: dict[str, Any] | None = None,
               server_timeline: Sequence[tuple[str, float]] = ()) -> str | None:
        """Write the run: its result bytes, or the error it ended with. A server run's timeline
        is the server's: the states its events reported (`server_timeline`, from
        `client.Job.timeline`), else its final status JSON (`server_status`)."""
        if not self.on or self.finished:
            return None
        self.finished = True
        if server_timeline:
            self.timeline = list(server_timeline)
        elif server_status:
            self._server_timeline(server_status)
        else:
            self.status("COMPLETED" if error is None else "ERROR")
        result_size = (server_status or {}).get("result_size")
        category = (server_status or {}).get("error_category") if error is not None else None
        return self._write(payload, result, error, category, result_size)

    def _server_timeline(self, status: dict[str, Any]) -> None:
        steps = [("RECEIVED", status.get("created")), ("RUNNING", status.get("started"))]
        if status.get("status") not in (None, "RECEIVED", "QUEUED", "RUNNING"):
            steps.append((status["status"], status.get("finished") or status.get("time")))
        elif status.get("status") == "QUEUED":
            steps.insert(1, ("QUEUED", status.get("time")))
        timeline = [(name, float(at)) for name, at in steps if isinstance(at, (int, float))]
        if timeline:
            self.timeline = timeline

    def _write(self, payload: bytes, result: bytes | None, error: BaseException | None,
               category: str | None, result_size: int | None = None) -> str | None:
        if not self.on:
            return None
        model_source = self.model_source
        if model_source is None and self.model is not None:
            try:
                model_source = model_load_spec(self.model)
            except ModelNotFromFiles:
                model_source = None  # rerun then needs `model=`
        return record_run(
            mode=self.mode, model_key=self.model_key, payload=payload, timeline=self.timeline, kind=self.kind,
            source=self.source, model_source=model_source, result=result, result_size=result_size, error=error,
            error_category=category, host=self.host, server_job_id=self.server_job_id, rerun_of=self.rerun_of,
            dry_run=self.dry_run, mocked=self.mocked, run_id=self.id,
        )
