"""The result store: result bytes by job id, on any fsspec filesystem.

The local directory is the default (no extra services); any fsspec URL works (memory://,
file://, s3://...). Writes go to a temporary name and are then moved into place, so a reader
never sees half a result and a crash never leaves one behind under the final name.

`DatabaseResultStore` keeps results in the job store's PostgreSQL database instead (the
`results` table): with several API replicas (`--store postgresql://...`) and no shared
`--result-store` URL, a result any replica wrote is one any replica can serve.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["ResultStore", "DatabaseResultStore"]

CHUNK = 256 * 1024


class ResultStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, job_id: str) -> str:
        return f"{self.root}/{job_id}.bin"

    def local_path(self, job_id: str) -> Path | None:
        """A plain path when the store is on the local disk (lets the app use sendfile)."""
        return Path(self._path(job_id)) if self.local else None

    def put(self, job_id: str, data: bytes) -> None:
        final = self._path(job_id)
        tmp = f"{self.root}/.{job_id}.{secrets.token_hex(4)}.tmp"
        if self.local:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, final)
            return
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, final)
        except Exception:
            # Some object stores have no cheap rename; their single PUT is atomic anyway.
            self.fs.pipe_file(final, data)
            self.fs.rm_file(tmp)

    def exists(self, job_id: str) -> bool:
        return bool(self.fs.exists(self._path(job_id)))

    def size(self, job_id: str) -> int:
        return int(self.fs.size(self._path(job_id)))

    def read(self, job_id: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(job_id)))

    def iter_chunks(self, job_id: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        with self.fs.open(self._path(job_id), "rb") as fh:
            while True:
                chunk = fh.read(chunk_size)
                if not chunk:
                    return
                yield chunk

    def delete(self, job_id: str) -> None:
        try:
            self.fs.rm_file(self._path(job_id))
        except FileNotFoundError:
            pass


class DatabaseResultStore:
    """Result bytes in the shared database's `results` table; the same face as `ResultStore`.

    One row a result: a result is at most the served policy's result size, and a row write is
    atomic, so no reader sees half of one."""

    local = False

    def __init__(self, db: Any) -> None:
        self.db = db
        self.url = f"the job store's results table ({db.describe()})"

    def local_path(self, job_id: str) -> Path | None:
        return None

    def put(self, job_id: str, data: bytes) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO results (job_id, data) VALUES (?, ?)"
                         " ON CONFLICT (job_id) DO UPDATE SET data = excluded.data", (job_id, data))

    def exists(self, job_id: str) -> bool:
        return self.db.query_one("SELECT 1 FROM results WHERE job_id = ?", (job_id,)) is not None

    def size(self, job_id: str) -> int:
        row = self.db.query_one("SELECT octet_length(data) FROM results WHERE job_id = ?", (job_id,))
        if row is None:
            raise FileNotFoundError(job_id)
        return int(row[0])

    def read(self, job_id: str) -> bytes:
        row = self.db.query_one("SELECT data FROM results WHERE job_id = ?", (job_id,))
        if row is None:
            raise FileNotFoundError(job_id)
        return bytes(row[0])

    def iter_chunks(self, job_id: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        data = self.read(job_id)
        for start in range(0, len(data), chunk_size):
            yield data[start:start + chunk_size]

    def delete(self, job_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM results WHERE job_id = ?", (job_id,))
