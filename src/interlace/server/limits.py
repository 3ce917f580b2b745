"""Limits per key (the sandbox's layer 5): requests per minute and jobs in flight, answered 429.

With several API replicas on one PostgreSQL job store, the bucket of each key is a database
row (`SharedRateLimiter`), so the replicas together allow what one server would.

The numbers are the served policy's (`GET /v1/policy`; `interlace serve --requests-per-minute`,
`--max-queued-per-key`), read from the job runner, which enforces the per-job ones (size, time,
memory, printed text): one policy, one source for every limit (`served_limits`).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Final

from ..contract.policy import Policy

__all__ = ["MSG_QUEUE_FULL", "MSG_RATE_LIMITED", "MSG_LOG_TRUNCATED", "RateLimiter", "SharedRateLimiter",
           "TooManyRequests", "served_limits"]

MSG_RATE_LIMITED: Final = (
    "Too many requests: this API key made more than {limit} requests in the last minute (the server "
    "allows {limit} per minute per key). Retry after {retry} s (the Retry-After header says when); "
    "the operator can raise the limit with `interlace serve --requests-per-minute N`."
)
MSG_QUEUE_FULL: Final = (
    "Too many jobs: this API key has {count} jobs queued or running, and the server accepts at most "
    "{limit} per key. Wait for some to finish (or cancel queued ones with DELETE /v1/jobs/{{id}}), "
    "or ask the operator to raise the limit with `interlace serve --max-queued-per-key N`."
)
MSG_LOG_TRUNCATED: Final = (
    "[interlace: output truncated: this job printed more than {limit} bytes, the server's limit per "
    "job; later output is dropped. Print less, or save values instead (`x.save()`); the operator can "
    "raise it with `interlace serve --max-log-kb N`.]"
)


class TooManyRequests(Exception):
    """Answered 429; `retry_after` (seconds) goes in the Retry-After header when known."""

    def __init__(self, message: str, retry_after: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.details = details


def served_limits(served: dict[str, Any]) -> Policy:
    """The limits in a runner's served policy; a runner serving only some (the test fake) gets
    the defaults for the rest."""
    return Policy.model_validate({k: v for k, v in served.items() if k in Policy.model_fields})


class RateLimiter:
    """A token bucket per key: `per_minute` requests at once, refilled at `per_minute` a minute.

    Written here rather than taken from a library (slowapi, limits): the check is ten lines over
    a dict, needs the key the server has already verified, and must answer with our message.
    Only verified keys get a bucket, so the table is as large as the set of valid keys.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        """Count one request of `key`; raises TooManyRequests when it has none left."""
        now = self._clock()
        with self._lock:
            tokens, when = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - when) * self._rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                retry = max(1, math.ceil((1.0 - tokens) / self._rate))
                raise TooManyRequests(MSG_RATE_LIMITED.format(limit=self.per_minute, retry=retry),
                                      retry_after=retry, limit=self.per_minute)
            self._buckets[key] = (tokens - 1.0, now)


# One statement: the key's row is locked for it, so two replicas' requests are counted one
# after the other. Every SET expression reads the row as it was: `ok` says whether a token
# was there (refilled since `updated` on the database's clock, one clock for every replica).
_REFILLED = "LEAST(?, key_buckets.tokens + (EXTRACT(EPOCH FROM now()) - key_buckets.updated) * ?)"
_TAKE_SQL = (
    "INSERT INTO key_buckets (key_id, tokens, updated, ok) VALUES (?, ?, EXTRACT(EPOCH FROM now()), TRUE)"
    f" ON CONFLICT (key_id) DO UPDATE SET ok = {_REFILLED} >= 1,"
    f" tokens = CASE WHEN {_REFILLED} >= 1 THEN {_REFILLED} - 1 ELSE {_REFILLED} END,"
    " updated = EXTRACT(EPOCH FROM now()) RETURNING ok, tokens"
)


class SharedRateLimiter:
    """`RateLimiter`'s token bucket, kept in the shared database's `key_buckets` table
    (`replica_proxy.SHARED_SCHEMA`): the same limit, refill and 429 text, counted once for
    all the API replicas. `db` is the PostgreSQL database (`db_postgres.PostgresDatabase`)."""

    def __init__(self, db: Any, per_minute: int) -> None:
        self.db = db
        self.per_minute = per_minute
        self._rate = per_minute / 60.0

    def take(self, key: str) -> None:
        """Count one request of `key`; raises TooManyRequests when it has none left."""
        cap, rate = float(self.per_minute), self._rate
        params = (key, cap - 1.0, *([cap, rate] * 4))
        with self.db.transaction() as conn:
            row = conn.execute(_TAKE_SQL, params).fetchone()
        ok, tokens = bool(row[0]), float(row[1])
        if not ok:
            retry = max(1, math.ceil((1.0 - tokens) / rate))
            raise TooManyRequests(MSG_RATE_LIMITED.format(limit=self.per_minute, retry=retry),
                                  retry_after=retry, limit=self.per_minute)
