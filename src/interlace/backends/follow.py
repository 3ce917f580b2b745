"""Following a job to its end, decided without doing any I/O (sans-IO).

`Follow.wait()` is a generator. It yields the next thing to do as a `Step` (open the job's
WebSocket, receive a message, poll the events, pause, then fetch and read the result), is sent
what came of it, or is thrown the error it raised, and finally returns the result bytes. Every
decision lives here: dropping events seen before (by `seq`), when a WebSocket counts as
failed, when to fall back to polling, the backoff, how long an unreachable server is retried,
the deadline, what the display shows, and which error a failed job raises.

`run` (blocking) and `arun` (asyncio) carry the steps out against an I/O object that has one
method per step (`client.py`: `_JobIO`, `_AsyncJobIO`). So the blocking and the async wait
share every decision and differ only in how they do I/O.

Local blocks (`with interlace.local():`). A job that reaches one sends a STREAM event (or shows
`local_block` in a polled status) with the exchange's number; the steps then say `local`: run
the block with the trace's runner (`local`, a `LocalPeer`: `local_runner.py`) over the job's
local-block endpoint. Each exchange is served at most once, however often it is announced
(reconnects replay it). A follower without the runner (re-attached by id) cannot run the
block: it warns once, and the job fails after the server's grace period. A job that ends in
ERROR after the block raised on this machine raises that very exception (`local.failure`).
"""

from __future__ import annotations

import base64
import json
import time
import warnings
from typing import Any, Awaitable, Final, Generator, NamedTuple, Protocol, TypeVar

from websockets.exceptions import WebSocketException

from ..contract.http import JobStatus, TERMINAL
from ..contract.local_block import LocalPeer
from ..errors import RemoteException, RemoteRequestError, WaitTimeout
from .display import JobStatusDisplay

__all__ = ["Follow", "Step", "Head", "JobIO", "AsyncJobIO", "run", "arun", "refusal", "MSG_WAIT_TIMEOUT",
           "MSG_NO_LOCAL_RUNNER", "LocalBlockUnserved"]

PROGRESS_MIN_BYTES = 1024 * 1024  # show a download bar above this size

MSG_WAIT_TIMEOUT: Final = (
    "Job {job_id} did not finish in time; it keeps running on the server. Re-attach later "
    "with RemoteClient().job({job_id!r}).wait()."
)

MSG_NO_LOCAL_RUNNER: Final = (
    "Job {job_id} is waiting for its local block at line {line} (`with interlace.local():`), which only "
    "the Python process that submitted the trace can run: the block's code never left it. This client "
    "re-attached by id and cannot run it, so the job fails once no client has answered for the "
    "server's grace period (`interlace serve --local-grace`). Keep the process that submitted the "
    "trace waiting for its result (a blocking `remote=True` trace, or `.result()` on the RemoteJob "
    "a `blocking=False` trace returned), or run the trace again."
)

T = TypeVar("T")


class LocalBlockUnserved(UserWarning):
    """A followed job waits for a local block that this client cannot run (see MSG_NO_LOCAL_RUNNER)."""


class Step(NamedTuple):
    """One thing to do: call the I/O object's method `action` with `args`."""

    action: str
    args: tuple[Any, ...] = ()


class Head(NamedTuple):
    """The start of the result's answer: what `fetch` returns."""

    status_code: int
    length: int  # Content-Length, 0 when absent
    reason: str


class JobIO(Protocol):
    """The blocking I/O for one job, one method per `Step.action`."""

    def listen(self, after: int) -> None:
        """Open the job's event stream (WebSocket), for events after `after`."""

    def receive(self, timeout: float | None) -> str | bytes | None:
        """The stream's next message; None once the server closed it; TimeoutError when none
        came within `timeout`."""

    def poll(self, after: int) -> dict[str, Any]:
        """The job's status and stored events after `after` (HTTP)."""

    def pause(self, seconds: float) -> None: ...

    def fetch(self) -> Head:
        """Start downloading the result."""

    def read(self) -> bytes:
        """The rest of the result's answer."""

    def chunk(self) -> bytes:
        """The answer's next chunk; b"" at its end."""

    def local(self, exchange: int, line: int, runner: LocalPeer, values: bytes | None) -> None:
        """Serve the job's local block number `exchange` with `runner` (GET the values unless
        the event carried them, then POST each message); RemoteRequestError 404/409 when the
        server no longer waits for it."""

    def close(self) -> None:
        """Release what is open (called once, when the steps end)."""


class AsyncJobIO(Protocol):
    """`JobIO`, with each method a coroutine."""

    async def listen(self, after: int) -> None: ...

    async def receive(self, timeout: float | None) -> str | bytes | None: ...

    async def poll(self, after: int) -> dict[str, Any]: ...

    async def pause(self, seconds: float) -> None: ...

    async def fetch(self) -> Head: ...

    async def read(self) -> bytes: ...

    async def chunk(self) -> bytes: ...

    async def local(self, exchange: int, line: int, runner: LocalPeer, values: bytes | None) -> None: ...

    async def close(self) -> None: ...


def refusal(status_code: int, body: bytes, reason: str) -> RemoteRequestError:
    """The error for a refused request, with the server's `detail` and `problems` when its
    body carries them (every Interlace error answer does; a proxy's may not)."""
    detail: Any = None
    problems: Any = None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        detail, problems = answer.get("detail"), answer.get("problems")
    if not isinstance(detail, str):
        detail = body.decode("utf-8", "replace").strip() or reason
    return RemoteRequestError(status_code, detail, problems if isinstance(problems, list) else None)


def _parse_ws(raw: str | bytes) -> dict[str, Any]:
    message = json.loads(raw)
    if "error" in message:  # the server refused the stream (401/404/426): not retryable
        raise RemoteRequestError(int(message.get("code", 400)), message["error"])
    return message


class Follow:
    """The decisions of following job `job_id`; `wait()` gives the steps (see the module)."""

    def __init__(
        self,
        job_id: str,
        display: JobStatusDisplay,
        *,
        deadline: float | None = None,
        reconnect_timeout: float = 300.0,
        tick: float = 0.1,
        backoff: tuple[float, float] = (0.1, 2.0),
        ws_failures_before_polling: int = 3,
        local: LocalPeer | None = None,
    ) -> None:
        self.job_id = job_id
        self.display = display
        self.deadline = deadline  # time.monotonic() value; None waits for ever
        self.reconnect_timeout = reconnect_timeout  # how long an unreachable server is retried
        self.tick = tick  # display refresh while waiting
        self.backoff_start, self.backoff_max = backoff
        self.ws_failures_before_polling = ws_failures_before_polling
        self.last_seq = 0
        self.final: dict[str, Any] | None = None
        #: (status, the server's time) of each state event seen: the job history's timeline.
        self.timeline: list[tuple[str, float]] = []
        self.local = local  # the trace's local-block runner; None when re-attached by id
        self.served: set[int] = set()  # local-block exchanges served (or given up on): never twice
        self._due: tuple[int, int, bytes | None] | None = None  # (exchange, line, values) to serve next

    # -- events ---------------------------------------------------------------------------

    def feed(self, event: dict[str, Any]) -> bool:
        """Show `event` unless seen before; True once it is the final one."""
        seq = event.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return False
            self.last_seq = seq
        status = event.get("status", "")
        if status == JobStatus.STREAM:
            # Not shown: the block itself is what the user sees now.
            self._offer(event.get("exchange"), event.get("line"), event.get("values"))
            return False
        if status != JobStatus.LOG and isinstance(event.get("time"), (int, float)):
            self.timeline.append((getattr(status, "value", status), float(event["time"])))
        # An ERROR's description is the traceback: it is raised, not squeezed into the line.
        shown = "" if status == JobStatus.ERROR else event.get("description") or ""
        self.display.update(self.job_id, status, shown)
        if status in TERMINAL:
            self.final = event
        return self.final is not None

    def feed_poll(self, body: dict[str, Any]) -> bool:
        """Feed a poll's answer (`{"status": ..., "events": [...]}`); True once final."""
        for event in body.get("events", []):
            if self.feed(event):
                return True
        status = body.get("status", {})
        pending = status.get("local_block")
        if isinstance(pending, dict) and status.get("status") not in TERMINAL:
            self._offer(pending.get("exchange"), pending.get("line"))
        if status.get("status") in TERMINAL and self.final is None:
            # Events can be trimmed (expiry); the job's row is the last word.
            self.final = {"id": self.job_id, "seq": None, **status}
            self.display.update(self.job_id, status["status"], "")
        return self.final is not None

    def _offer(self, exchange: Any, line: Any, values: Any = None) -> None:
        """The job waits for local block `exchange`: serve it next, unless served before.
        `values`: the values sent down, when the event carried them (base64)."""
        if not isinstance(exchange, int) or not isinstance(line, int) or exchange in self.served:
            return
        if self.local is None:
            self.served.add(exchange)  # say it once per block
            warnings.warn(MSG_NO_LOCAL_RUNNER.format(job_id=self.job_id, line=line), LocalBlockUnserved,
                          stacklevel=2)
            return
        try:
            inline = base64.b64decode(values, validate=True) if isinstance(values, str) else None
        except ValueError:
            inline = None  # fetched instead
        self._due = (exchange, line, inline)

    def _serve_local(self) -> Generator[Step, Any, None]:
        """Serve the local block announced last, if any (once: it is marked served first)."""
        if self._due is None:
            return
        (exchange, line, values), self._due = self._due, None
        self.served.add(exchange)
        # The block's own output goes to the terminal from now on: end the status line, and stop
        # rewriting it in place, which would erase what the block printed on it.
        self.display.finish()
        self.display.inplace = False
        try:
            yield Step("local", (exchange, line, self.local, values))
        except RemoteRequestError as e:
            if e.status_code not in (404, 409):
                raise
            # The server no longer waits for this block (it timed out, the job ended): the
            # job's events say why.
        except ConnectionError:
            pass  # the server went away mid-block; following the job finds out what became of it

    # -- time -----------------------------------------------------------------------------

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise WaitTimeout(MSG_WAIT_TIMEOUT.format(job_id=self.job_id))

    def _receive_timeout(self) -> float | None:
        # Wake up to animate the display; without one, only the deadline needs waking for.
        wait = self.tick if self.display.enabled else None
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            wait = left if wait is None else min(wait, left)
        return wait

    def _pause(self, seconds: float) -> Generator[Step, Any, None]:
        self.check_deadline()
        end = time.monotonic() + seconds
        if self.deadline is not None:
            end = min(end, self.deadline)
        while (left := end - time.monotonic()) > 0:
            yield Step("pause", (min(left, self.tick),))
            self.display.update()

    # -- the steps ------------------------------------------------------------------------

    def wait(self) -> Generator[Step, Any, bytes]:
        """Follow the job to its end; return the result bytes or raise the job's failure."""
        final = yield from self.events()
        if final.get("status") == JobStatus.COMPLETED:
            return (yield from self.result())
        raise self.failure(final)

    def events(self) -> Generator[Step, Any, dict[str, Any]]:
        """Follow the events until the final one, and return it.

        The WebSocket first; when it closes early (a server restart) reconnect at once, asking
        only for the events after the last one seen. Each time it fails, poll over HTTP
        instead, with backoff; after `ws_failures_before_polling` failures in a row (while
        HTTP works) keep polling. A server that does not answer at all is retried for
        `reconnect_timeout` seconds.
        """
        delay = self.backoff_start
        ws_failures = 0
        down_since: float | None = None
        while True:
            ws_failed = False
            if ws_failures < self.ws_failures_before_polling:
                try:
                    if (yield from self._stream()):
                        return self.final  # type: ignore[return-value]
                    ws_failures, delay = 0, self.backoff_start  # closed early: reconnect
                except WaitTimeout:  # a TimeoutError, so an OSError: not a failed WebSocket
                    raise
                except (OSError, WebSocketException):
                    ws_failed = True
            try:
                body = yield Step("poll", (self.last_seq,))
            except ConnectionError:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.reconnect_timeout:
                    raise
            else:
                down_since = None
                # Count WebSocket failures only while HTTP works: a server that is down (restart)
                # must not push us into polling for good.
                ws_failures += ws_failed
                if self.feed_poll(body):
                    return self.final  # type: ignore[return-value]
                if self._due is not None:
                    yield from self._serve_local()
                    delay = self.backoff_start  # the job moved on: look again soon
                    continue
            yield from self._pause(delay)
            delay = min(delay * 2, self.backoff_max)

    def _stream(self) -> Generator[Step, Any, bool]:
        """Follow the WebSocket until the final event (True) or until it closes (False)."""
        yield Step("listen", (self.last_seq,))
        while True:
            try:
                raw = yield Step("receive", (self._receive_timeout(),))
            except TimeoutError:
                self.check_deadline()
                self.display.update()
                continue
            if raw is None:
                return False
            if self.feed(_parse_ws(raw)):
                return True
            yield from self._serve_local()

    def result(self) -> Generator[Step, Any, bytes]:
        """Download the result; a progress bar when it is large."""
        head: Head = yield Step("fetch")
        if head.status_code >= 400:
            raise refusal(head.status_code, (yield Step("read")), head.reason)
        if head.length <= PROGRESS_MIN_BYTES:
            return (yield Step("read"))
        parts: list[bytes] = []
        with self.display.download(head.length) as advance:
            while chunk := (yield Step("chunk")):
                parts.append(chunk)
                advance(len(chunk))
        return b"".join(parts)

    def failure(self, final: dict[str, Any]) -> BaseException:
        """The error for a job that ended without a result."""
        status = final.get("status")
        failure = getattr(self.local, "failure", None)
        if status == JobStatus.ERROR and isinstance(failure, BaseException):
            # The job failed because a local block failed here: the user's own exception, with
            # their traceback and line, not the server's account of it.
            return failure
        if status == JobStatus.ERROR:
            return RemoteException(final.get("description") or "The job failed on the server.",
                                   job_id=self.job_id, category=final.get("error_category"))
        if status == JobStatus.CANCELLED:
            return RemoteException(f"Job {self.job_id} was cancelled before it ran.", job_id=self.job_id,
                                   category="cancelled")
        return RemoteRequestError(410, final.get("description") or f"The result of job {self.job_id} expired.")


# -- carrying the steps out ----------------------------------------------------------------------


def run(steps: Generator[Step, Any, T], io: JobIO) -> T:
    """Do `steps` with blocking I/O; return what they return."""
    reply: Any = None
    error: Exception | None = None
    try:
        while True:
            try:
                step = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            try:
                reply, error = getattr(io, step.action)(*step.args), None
            except Exception as exc:  # the steps decide what an error means
                reply, error = None, exc
    finally:
        io.close()


async def arun(steps: Generator[Step, Any, T], io: AsyncJobIO) -> T:
    """`run`, with asyncio I/O."""
    reply: Any = None
    error: Exception | None = None
    try:
        while True:
            try:
                step = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            try:
                pending: Awaitable[Any] = getattr(io, step.action)(*step.args)
                reply, error = await pending, None
            except Exception as exc:  # the steps decide what an error means
                reply, error = None, exc
    finally:
        await io.close()
