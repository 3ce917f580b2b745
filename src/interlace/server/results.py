"""The result store: result bytes by job id, on any fsspec filesystem.

The local directory is the default (no extra services); any fsspec URL works (memory://,
file://, s3://...). Writes go to a temporary name and are then moved into place, so a reader
never sees half a result and a crash never leaves one behind under the final name.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["ResultStore"]

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
