"""The server's side of a local block: the job's `LocalPeer`, answered by its client over HTTP.

`JobService` gives every running job one `ServerLocalPeer` (cheap: most jobs never call it).
When the job's body reaches `with interlace.local():`, the execution layer calls `start(line,
values)` from the job's worker thread. The peer numbers the exchange (1, 2, ... per job),
announces it with a transient STREAM event (WebSocket) and in the job's status JSON (polling,
re-attaching), and blocks that worker thread, and only it, until the client's next message
arrives through the app's HTTP handlers (`values`, `post`), which never block the event loop:
a read's answer comes back to its request as a `concurrent.futures.Future`.

    worker thread                               event loop (HTTP, `app.py`)
    start(line, values) -> STREAM, wait  <---   GET  .../local/n    values(n)
                                         <---   POST .../local/n    post(n, ReadRequest) -> Future
    reply(value) -> resolves that Future, wait
                                         <---   POST .../local/n    post(n, BlockDone | BlockFailed)

Two limits end a wait with a `BlockFailed` the execution layer turns into the job's ERROR:
`local_block_seconds` from the start of the block (`CATEGORY_TIMEOUT`), and
`local_grace_seconds` without a client watching the job (no WebSocket on its status, no
request about it: `CATEGORY_CLIENT_GONE`), so a vanished client frees the worker soon.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Callable, Final

from ..contract.http import JobStatus
from ..contract.local_block import (
    CATEGORY_CLIENT_GONE,
    CATEGORY_TIMEOUT,
    BlockDone,
    BlockFailed,
    ClientMessage,
    ReadRequest,
)
from .store import Event

__all__ = [
    "ServerLocalPeer",
    "Exchange",
    "ExchangeError",
    "MSG_LOCAL_TIMEOUT",
    "MSG_CLIENT_GONE",
    "MSG_NO_EXCHANGE",
    "MSG_EXCHANGE_OVER",
    "MSG_SERVER_TURN",
    "MSG_JOB_ENDED",
    "INLINE_VALUES_BYTES",
    "make_stream_event",
]

MSG_LOCAL_TIMEOUT: Final = (
    "The local block at line {line} ran on your machine for more than {limit:g} s, this server's limit "
    "per local block, so the job was stopped. Make the block faster (or do the slow part after the "
    "trace, on the saved values), or ask the server's operator to raise the limit: "
    "`interlace serve --local-block-timeout SECONDS`."
)
MSG_CLIENT_GONE: Final = (
    "The job reached the local block at line {line}, which runs on the machine that submitted it, but no "
    "client followed the job for {grace:g} s (the submitting process ended or lost its connection, or "
    "did not wait for the job: `blocking=False`), so the job was stopped. Run the trace again and let it "
    "wait for its result; a client that reconnects within {grace:g} s goes on where it was. The "
    "operator sets this wait with `interlace serve --local-grace SECONDS`."
)
MSG_NO_EXCHANGE: Final = (
    "Job {job_id} waits for no local block number {number} (the last one it reached is {current}). "
    "Use the `exchange` of the job's latest STREAM event, or the `local_block` of its status "
    "(GET /v1/jobs/{job_id})."
)
MSG_EXCHANGE_OVER: Final = (
    "Local block number {number} of job {job_id} is over ({why}); the job no longer waits for it. "
    "Follow the job's events to see how it goes on."
)
MSG_SERVER_TURN: Final = (
    "Local block number {number} of job {job_id} is still answering your previous read; send one "
    "message at a time and wait for each read's answer."
)
MSG_JOB_ENDED: Final = (
    "Job {job_id} ended while its local block number {number} was running; follow the job's events "
    "for why."
)
MSG_STREAM: Final = "Waiting for your local block at line {line}."
#: Values up to this size travel inside the STREAM event (base64), so the client need not GET
#: them: one round trip less per block. Larger ones are only fetched.
INLINE_VALUES_BYTES: Final = 64 * 1024


class ExchangeError(Exception):
    """A client's request about an exchange that cannot be served; `status` is its HTTP answer
    (404: no such exchange, 409: it is over or it is not the client's turn)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class Exchange:
    """One local block of a job, from its `start` to the client's final message."""

    number: int
    line: int
    values: bytes
    started: float  # monotonic
    #: Who acts next: "client" (the worker waits for a message) or "server" (it is answering a read).
    turn: str = "client"
    #: The read request waiting for the worker's answer.
    answer: "Future[bytes] | None" = None
    last_read: ReadRequest | None = None
    #: A value whose read request went away before it came (a dropped connection): the same
    #: read, sent again, gets it without asking the worker twice.
    kept: tuple[ReadRequest, bytes] | None = None
    #: Why it is over (None while it runs): "done", "failed", "timeout", "client gone", "job ended".
    ended: str | None = None


class ServerLocalPeer:
    """One job's `LocalPeer` on the server (see the module docstring).

    `publish` sends an event to the job's watchers; `watched()` says whether a WebSocket
    follows the job now. Worker side: `start`, `reply`; HTTP side: `values`, `post`, `touch`,
    `pending`, `stream_event`; the service calls `close` once the job ended.
    """

    #: How often a waiting worker looks whether a client still watches (seconds, at most).
    TICK = 0.25

    def __init__(
        self,
        job_id: str,
        *,
        block_seconds: float,
        grace_seconds: float,
        publish: Callable[[Event], None],
        watched: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        ended: Callable[[int], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.block_seconds = block_seconds
        self.grace_seconds = grace_seconds
        self._publish = publish
        self._watched = watched
        self._clock = clock
        # Told (worker thread) the number of each exchange once it is over for the worker: the
        # shared store forgets the pending block (`replica_proxy.LocalBlockBoard`).
        self._ended = ended
        self._lock = threading.Lock()
        self._inbox: queue.Queue[ClientMessage] = queue.Queue()
        self._current: Exchange | None = None
        self._seen = clock()  # the last time a client was known to be there
        self._closed = False

    # -- the worker's side (LocalPeer) ------------------------------------------------------

    def start(self, line: int, values: bytes) -> ClientMessage:
        with self._lock:
            now = self._clock()
            number = self._current.number + 1 if self._current is not None else 1
            exchange = self._current = Exchange(number, int(line), bytes(values), now)
            # The grace counts from here: between blocks nobody needed the client.
            self._seen = now
        self._publish(self._event(exchange))
        return self._told(exchange, self._wait(exchange))

    def reply(self, value: bytes) -> ClientMessage:
        with self._lock:
            exchange = self._current
            if exchange is None or exchange.turn != "server" or exchange.last_read is None:
                raise RuntimeError("ServerLocalPeer.reply without a read to answer (a bug of the execution layer)")
            exchange.turn = "client"
            self._seen = self._clock()
            answer, exchange.answer = exchange.answer, None
            if answer is None or not _resolve(answer, bytes(value)):
                exchange.kept = (exchange.last_read, bytes(value))
        return self._told(exchange, self._wait(exchange))

    def _told(self, exchange: Exchange, message: ClientMessage) -> ClientMessage:
        if self._ended is not None and not isinstance(message, ReadRequest):
            try:
                self._ended(exchange.number)
            except Exception:  # bookkeeping for other replicas must not fail the job's block
                logging.getLogger("interlace.server").exception("local block of %s: end hook failed", self.job_id)
        return message

    def _wait(self, exchange: Exchange) -> ClientMessage:
        block_end = exchange.started + self.block_seconds
        while True:
            now = self._clock()
            with self._lock:
                if self._watched():
                    self._seen = now
                gone_at = self._seen + self.grace_seconds
            if now >= block_end:
                text = MSG_LOCAL_TIMEOUT.format(line=exchange.line, limit=self.block_seconds)
                return self._give_up(exchange, BlockFailed(text, CATEGORY_TIMEOUT), "timeout")
            if now >= gone_at:
                text = MSG_CLIENT_GONE.format(line=exchange.line, grace=self.grace_seconds)
                return self._give_up(exchange, BlockFailed(text, CATEGORY_CLIENT_GONE), "client gone")
            try:
                return self._inbox.get(timeout=max(0.001, min(block_end, gone_at, now + self.TICK) - now))
            except queue.Empty:
                continue

    def _give_up(self, exchange: Exchange, failure: BlockFailed, why: str) -> ClientMessage:
        with self._lock:
            if exchange.ended is None and exchange.turn == "client":
                exchange.ended = why
                return failure
        # A message was accepted while we decided: it is in the inbox, and it wins.
        return self._inbox.get()

    # -- the HTTP side ----------------------------------------------------------------------

    def values(self, number: int) -> bytes:
        """The values sent down to exchange `number` (GET); ExchangeError if it is not running."""
        with self._lock:
            exchange = self._running(number)
            self._seen = self._clock()
            return exchange.values

    def post(self, number: int, message: ClientMessage) -> "Future[bytes] | None":
        """Hand the client's `message` for exchange `number` to the waiting worker. A read gets
        a Future of the value (resolved by `reply`); the final message gets None."""
        with self._lock:
            exchange = self._running(number)
            self._seen = self._clock()
            if exchange.turn != "client":
                raise ExchangeError(409, MSG_SERVER_TURN.format(number=number, job_id=self.job_id))
            if isinstance(message, ReadRequest):
                if exchange.kept is not None and exchange.kept[0] == message:
                    answer: Future[bytes] = Future()
                    answer.set_result(exchange.kept[1])
                    exchange.kept = None
                    return answer
                exchange.turn, exchange.last_read = "server", message
                exchange.answer = answer = Future()
                self._inbox.put(message)
                return answer
            exchange.ended = "done" if isinstance(message, BlockDone) else "failed"
            self._inbox.put(message)
            return None

    def touch(self) -> None:
        """A client asked about the job (a poll): it is still there."""
        with self._lock:
            self._seen = self._clock()

    def pending(self) -> tuple[int, int] | None:
        """(number, line) of the exchange running now, or None."""
        with self._lock:
            exchange = self._current
            if exchange is None or exchange.ended is not None or self._closed:
                return None
            return exchange.number, exchange.line

    def stream_event(self) -> Event | None:
        """The STREAM event of the exchange running now, for a watcher that just connected."""
        with self._lock:
            exchange = self._current
            if exchange is None or exchange.ended is not None or self._closed:
                return None
        return self._event(exchange)

    def close(self) -> None:
        """The job ended: a read still waiting is told so; later requests get 409."""
        with self._lock:
            self._closed = True
            exchange = self._current
            if exchange is None:
                return
            exchange.ended = exchange.ended or "job ended"
            answer, exchange.answer = exchange.answer, None
        if answer is not None:
            error = ExchangeError(409, MSG_JOB_ENDED.format(job_id=self.job_id, number=exchange.number))
            try:
                answer.set_exception(error)
            except InvalidStateError:  # the request went away first
                pass

    # -- helpers ----------------------------------------------------------------------------

    def _running(self, number: int) -> Exchange:
        # Under the lock.
        exchange = self._current
        if exchange is None or number > exchange.number or number < 1:
            current = exchange.number if exchange is not None else "none"
            raise ExchangeError(404, MSG_NO_EXCHANGE.format(job_id=self.job_id, number=number, current=current))
        if number < exchange.number:
            raise ExchangeError(409, MSG_EXCHANGE_OVER.format(number=number, job_id=self.job_id,
                                                              why="a later block started"))
        if exchange.ended is not None or self._closed:
            raise ExchangeError(409, MSG_EXCHANGE_OVER.format(number=number, job_id=self.job_id,
                                                              why=exchange.ended or "job ended"))
        return exchange

    def _event(self, exchange: Exchange) -> Event:
        inline = exchange.values if len(exchange.values) <= INLINE_VALUES_BYTES else None
        return make_stream_event(self.job_id, exchange.number, exchange.line, inline)

    def __repr__(self) -> str:
        return f"ServerLocalPeer({self.job_id!r})"


def make_stream_event(job_id: str, exchange: int, line: int, values: bytes | None) -> Event:
    """The transient STREAM event of a job's local block `exchange` (`values`: inline, or None
    when too large: the client GETs them). One builder for the holder and the other replicas."""
    return Event(job_id, JobStatus.STREAM.value, MSG_STREAM.format(line=line), None, time.time(),
                 exchange=exchange, line=line, values=values)


def _resolve(answer: "Future[bytes]", value: bytes) -> bool:
    """Give `value` to the waiting read; False when its request went away (cancelled)."""
    try:
        answer.set_result(value)
    except InvalidStateError:
        return False
    return True
