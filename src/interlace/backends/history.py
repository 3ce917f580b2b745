"""`interlace.jobs`: the local job history, read, rerun, compared and pruned.

Every `remote=True` and `remote='local'` run is recorded by its backend (`history_store.py`);
this is what a user does with the records, in Python (`interlace.jobs.list()`, `.show(id)`,
`.rerun(id, remote=...)`, `.diff(a, b)`, `.prune(...)`) and through `interlace jobs ...`
(`cli.py`). Ids may be given as any unique prefix.

`rerun` replays the recorded request bytes, in either mode: a `remote='local'` job on the
server (`remote=True`) and a server job here (`remote='local'`), with the request's model key
rewritten for the target. Locally it runs against `model=`, else the model loaded again from
the path or hub id the record names (the loader is given by the face, `interlace/__init__.py`,
since loading a model is the layer above this one's work).
"""

from __future__ import annotations

import builtins
import json
import time
from datetime import timedelta
from typing import Any, Callable, Final

from ..contract.request import (
    BuiltRequest,
    TraceRequest,
    decode_request,
    encode_request,
)
from ..contract.result import decode_result
from ..errors import InterlaceError
from .history_diff import JobDiff, diff_records, replay_policy
from .history_store import JobRecord, JobRun, history_path, store
from .outbound import model_key_of, policy_for_simulation
from .remote import RemoteBackend
from .simulation import LocalSimulationBackend

__all__ = [
    "JobDiff", "JobHistory", "JobHistoryError", "JobRecord", "MSG_AMBIGUOUS", "MSG_LOCAL_BLOCKS", "MSG_MOCKED",
    "MSG_NO_MODEL", "MSG_NO_SERVER_KEY", "MSG_PRUNE_ALL", "MSG_UNKNOWN",
]

MSG_UNKNOWN: Final = (
    "No recorded job has an id starting with {prefix!r} in {path}. List the recorded jobs with "
    "`interlace.jobs.list()` (or `interlace jobs list`)."
)
MSG_AMBIGUOUS: Final = (
    "More than one recorded job has an id starting with {prefix!r}; give more of it, e.g. "
    "`interlace.jobs.show({example!r})`."
)
MSG_MOCKED: Final = (
    "Job {id} ran with mocked modules ({mocked}): its results came from the mocks, so it is never "
    "sent to a server. Run the trace again without `mocks=` and with `remote=True`; or rerun it "
    "here, on the real modules (the mocks are not recorded), with "
    "`interlace.jobs.rerun({id!r}, remote='local')`."
)
MSG_LOCAL_BLOCKS: Final = (
    "Job {id}'s body has `with interlace.local():` blocks, whose code ran in the process that "
    "made the job and was never recorded, so the job cannot be replayed. Run the trace again instead."
)
MSG_NO_MODEL: Final = (
    "Job {id} ran on {key!r}, which was not loaded from a path or hub id, so there is nothing to "
    "load it from here. Pass the model: `interlace.jobs.rerun({id!r}, remote='local', model=model)`."
)
MSG_NO_SERVER_KEY: Final = (
    "Job {id} ran on an in-memory model ({key!r}), which no server hosts under that name. Name "
    "the server's model: `interlace.jobs.rerun({id!r}, remote=True, model_key=\"org/name\")`."
)
MSG_PRUNE_ALL: Final = (
    "prune() needs `older_than=` or `keep=` (or both): it would remove every record otherwise. "
    "E.g. `interlace.jobs.prune(older_than=timedelta(days=30), keep=100)`; to remove everything, "
    "`interlace.jobs.prune(keep=0)`."
)

_MODES: Final = {"local": "local", "server": "server", True: "server"}


class JobHistoryError(InterlaceError, LookupError):
    """A job history request that cannot be done: an unknown or ambiguous id, or a rerun that
    is not possible (the message says why and what to do)."""


class JobHistory:
    """The local job history (`interlace.jobs`). `load_model(spec)` loads a model again from
    its recorded source (`{"kind": "language_model", "path": ..., "load_kwargs": ...}`), for a
    local rerun without `model=`."""

    def __init__(self, load_model: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self._load_model = load_model
        self._loaded: tuple[str, Any] | None = None  # the last model loaded for a rerun

    def __repr__(self) -> str:
        return f"<interlace.jobs: the job history in {self.path}>"

    @property
    def path(self) -> str:
        """The history's SQLite file (under `interlace.config.data_dir()`)."""
        return str(history_path())

    def list(self, limit: int | None = 20, *, mode: str | None = None, status: str | None = None) -> builtins.list[JobRecord]:
        """The newest records first (without their bytes); `mode`: "local" or "server";
        `status`: "COMPLETED", "ERROR", ... `limit=None` lists them all."""
        where, params = [], []
        if mode is not None:
            where.append("mode = ?")
            params.append(_mode(mode))
        if status is not None:
            where.append("status = ?")
            params.append(status.upper())
        return store.select(("WHERE " + " AND ".join(where)) if where else "", params, limit=limit)

    def show(self, job_id: str) -> JobRecord:
        """The record whose id is or starts with `job_id`, with its request (and, when recorded,
        result) bytes."""
        full = self._resolve(job_id)
        return store.select("WHERE id = ?", (full,), full=True)[0]

    def values(self, job_id: str) -> dict[str, Any]:
        """A recorded job's saved values, from its recorded result bytes (recorded when
        `CONFIG.APP.HISTORY_RESULTS` was on)."""
        record = self.show(job_id)
        if record.result is None:
            raise JobHistoryError(f"Job {record.id} has no recorded result (status {record.status}; "
                                  "results are recorded with `interlace.CONFIG.APP.HISTORY_RESULTS = True`).")
        return decode_result(record.result)

    def rerun(self, job_id: str, remote: bool | str | None = None, *, model: Any = None,
              model_key: str | None = None, host: str | None = None, api_key: str | None = None) -> dict[str, Any]:
        """Replay a recorded job's request bytes and return the saved values (the new run is
        recorded too, with `rerun_of`). `remote`: "local" (the simulation, against `model=` or
        the model loaded again from its recorded path) or True (the configured server, or
        `host=`, on `model_key=` or the recorded model's key or path); default: the job's own mode.
        A replay always runs the real modules on real values: a dry run's fake tensors and a
        mocked run's stand-ins are not in the request bytes (and a mocked run is never sent to
        a server)."""
        record = self.show(job_id)
        target = record.mode if remote is None else _mode(remote)
        if record.payload is None:
            raise JobHistoryError(f"Job {record.id} has no recorded request bytes to replay.")
        request, tensors = decode_request(record.payload, replay_policy())
        if request.local_blocks:
            raise JobHistoryError(MSG_LOCAL_BLOCKS.format(id=record.id))
        source = (record.source, record.filename, record.lineno)
        if target == "server":
            if record.mocked:
                raise JobHistoryError(MSG_MOCKED.format(id=record.id, mocked=", ".join(record.mocked)))
            key = model_key or _server_key(record)
            backend = RemoteBackend(model_key=key, host=host, api_key=api_key)
            from .client import shared_client

            run = JobRun("server", key, kind=record.kind, source=source, rerun_of=record.id,
                         host=shared_client(host, api_key).host, model_source=record.model_source)
            return backend.send(_with_model_key(record.payload, request, tensors, key), run=run).values
        if model is None:
            model = self._model_for(record)
        key = model_key_of(model, simulation=True)
        # The replay runs the real modules on real values: a dry run's fake tensors and a mocked
        # run's stand-ins were this process's, never in the request bytes.
        run = JobRun("local", key, model=model, kind=record.kind, source=source, rerun_of=record.id)
        backend = LocalSimulationBackend(model)
        payload = _with_model_key(record.payload, request, tensors, key)
        return decode_result(backend.run_payload(payload, key, policy_for_simulation(), run=run))

    def diff(self, a: str, b: str) -> JobDiff:
        """What differs between two recorded jobs: the body's source, the inputs (arguments,
        options, the values the body read), the saved values (when results were recorded:
        tensors by their largest absolute difference), the status and the sizes."""
        return diff_records(self.show(a), self.show(b))

    def prune(self, older_than: timedelta | float | None = None, keep: int | None = None) -> builtins.list[str]:
        """Remove records and return their ids: those older than `older_than` (a timedelta, or
        days), but never the `keep` newest; `keep` alone keeps only the `keep` newest."""
        if older_than is None and keep is None:
            raise ValueError(MSG_PRUNE_ALL)
        if keep is not None and keep < 0:
            raise ValueError(f"keep must be 0 or more, got {keep}.")
        records = store.select()  # newest first
        kept = records[:keep] if keep is not None else []
        candidates = records[len(kept):]
        if older_than is not None:
            age = older_than.total_seconds() if isinstance(older_than, timedelta) else float(older_than) * 86400
            cutoff = time.time() - age
            candidates = [r for r in candidates if r.created < cutoff]
        removed = [r.id for r in candidates]
        store.delete(removed)
        return removed

    def _resolve(self, prefix: str) -> str:
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"A job id must be a non-empty string, got {prefix!r}.")
        found = store.ids(prefix)
        if not found:
            raise JobHistoryError(MSG_UNKNOWN.format(prefix=prefix, path=self.path))
        if len(found) > 1:
            raise JobHistoryError(MSG_AMBIGUOUS.format(prefix=prefix, example=found[0][: len(prefix) + 4]))
        return found[0]

    def _model_for(self, record: JobRecord) -> Any:
        spec = record.model_source
        if spec is None or self._load_model is None:
            raise JobHistoryError(MSG_NO_MODEL.format(id=record.id, key=record.model_key))
        cache_key = json.dumps(spec, sort_keys=True)
        if self._loaded is None or self._loaded[0] != cache_key:
            self._loaded = None  # free the previous model before loading the next
            self._loaded = (cache_key, self._load_model(spec))
        return self._loaded[1]


def _mode(remote: bool | str) -> str:
    try:
        return _MODES[remote]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"remote must be 'local', 'server' or True, not {remote!r}.") from None


def _server_key(record: JobRecord) -> str:
    if not record.model_key.startswith("local:"):
        return record.model_key
    path = (record.model_source or {}).get("path")
    if isinstance(path, str) and path:
        return path
    raise JobHistoryError(MSG_NO_SERVER_KEY.format(id=record.id, key=record.model_key))


def _with_model_key(payload: bytes, request: TraceRequest, tensors: dict[str, Any], key: str) -> bytes:
    """The request bytes for a model known as `key` (the recorded bytes when that is their key)."""
    if request.model_key == key:
        return payload
    return encode_request(BuiltRequest(request.model_copy(update={"model_key": key}), tensors, []))
