"""Server settings, from CLI flags (see `interlace.cli`) or built directly in tests."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..execution.cobatch import BatchLimits

__all__ = ["ServerSettings", "MiB", "default_data_dir", "is_loopback", "LOOPBACK_HOSTS", "MAX_BATCH_WAIT_MS"]

MiB = 1024 * 1024


#: The longest `--batch-wait-ms`: a lone job never waits longer than this for company, so the
#: wait stays a small share of even the shortest job's latency.
MAX_BATCH_WAIT_MS = 1000.0

_DEFAULT_BATCH = BatchLimits()


def default_data_dir() -> Path:
    """`$INTERLACE_DATA_DIR`, else `$XDG_DATA_HOME/interlace`, else `~/.local/share/interlace`.

    A per-user location (not the current directory) so that `interlace serve` and
    `interlace keys create` agree on the database wherever they are run from.
    """
    explicit = os.environ.get("INTERLACE_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "interlace"


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False
    # Seconds a finished job's result (and record of its events) stays downloadable.
    result_ttl: float = 24 * 3600.0
    # fsspec URL; None means `<data_dir>/results` on the local disk.
    result_store: str | None = None
    # (The upload limit, like every limit, is the runner's served policy: `JobService.limits`.)
    # How often the sweeper deletes expired results.
    sweep_interval: float = 60.0
    # A job interrupted this many times (server killed while it ran) ends in ERROR instead of
    # being retried, so that a payload that crashes the server cannot loop forever.
    max_attempts: int = 3
    callback_timeout: float = 5.0
    # LOG lines kept per job; later lines are dropped with one notice (a print loop must not
    # fill the database).
    max_log_events: int = 10_000
    # fsync payload files and use synchronous=FULL: survives power loss, costs latency.
    # Off by default: WAL + synchronous=NORMAL already survives a killed process.
    fsync: bool = False
    # Co-batching (`execution/cobatch.py`; `interlace serve --batch-rows/--batch-tokens/
    # --batch-wait-ms/--no-cobatch`): queued jobs of one model that may share a forward run as
    # one batch of at most `batch_rows` rows and `batch_tokens` tokens; a worker that took a
    # job waits at most `batch_wait_ms` for more. Only runners that batch
    # (`types.BatchingJobRunner`) ever do.
    cobatch: bool = _DEFAULT_BATCH.enabled
    batch_rows: int = Field(default=_DEFAULT_BATCH.max_rows, gt=0)
    batch_tokens: int = Field(default=_DEFAULT_BATCH.max_tokens, gt=0)
    batch_wait_ms: float = Field(default=_DEFAULT_BATCH.wait_seconds * 1000.0, ge=0.0, le=MAX_BATCH_WAIT_MS)
    # The job store (`interlace serve --store`): None is SQLite in `data_dir` with the queue in
    # memory (the embedded default); a `postgresql://` URL is a database several API replicas
    # share, the queue included (`db.py`, `store_queue.py`, `shared_queue.py`).
    store: str | None = None
    # How other replicas and clients reach this one (`--advertise-url`; default `base_url`):
    # named in the answer to a local-block request that reached the wrong replica.
    advertise_url: str | None = None
    # Shared queue only: a replica that has not beaten for `lease_seconds` is taken for dead
    # and its RUNNING jobs are requeued by the others; it beats every `lease_seconds / 5`.
    lease_seconds: float = Field(default=30.0, gt=0.0)
    # Shared queue only: how often an idle worker looks for jobs other replicas accepted (its
    # own replica's submissions wake it at once) and the event relay for other replicas' events.
    poll_interval: float = Field(default=0.2, gt=0.0)

    @property
    def batch_limits(self) -> BatchLimits:
        """The co-batching settings as the engine takes them (`run_batch(jobs, limits)`)."""
        return BatchLimits(max_rows=self.batch_rows, max_tokens=self.batch_tokens,
                           wait_seconds=self.batch_wait_ms / 1000.0, enabled=self.cobatch)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "interlace.db"

    @property
    def payload_dir(self) -> Path:
        return self.data_dir / "payloads"

    @property
    def result_url(self) -> str:
        return self.result_store or str(self.data_dir / "results")

    @property
    def public_url(self) -> str:
        return self.advertise_url or self.base_url

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")
