"""Client for an Interlace server: submit payload bytes, follow the job, download the result.

    client = RemoteClient()                       # host/key from args, env, or interlace.CONFIG
    job = client.submit(payload)                  # returns at once (202)
    data = job.wait()                             # live status line, then the result bytes
    again = RemoteClient().job(job.id).result()   # re-attach by id, from any process

`wait` follows the job's WebSocket; when it drops (server restart, network) it reconnects with
backoff, asking only for events after the last one seen, and falls back to HTTP polling if
WebSockets keep failing. Payloads and results are opaque bytes here; encoding is done by
`interlace.remote`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import ssl
import threading
import time
from functools import lru_cache
from typing import Any
from urllib.parse import quote

import httpx
import websockets
from websockets.asyncio.client import connect as aconnect
from websockets.sync.client import connect as sconnect

from .._version import __version__
from ..config import CONFIG
from .display import JobStatusDisplay

KEY_HEADER = "X-Interlace-Key"
VERSION_HEADER = "X-Interlace-Version"
CALLBACK_HEADER = "X-Interlace-Callback"
FINAL = frozenset({"COMPLETED", "ERROR", "CANCELLED", "EXPIRED"})
PROGRESS_MIN_BYTES = 1024 * 1024  # show a download bar above this size
CHUNK = 256 * 1024


class RemoteException(Exception):
    """A job failed on the server; `tb_string` is the server's account (a traceback).

    When the job's code raised a built-in exception or one of Interlace's own (`category` is
    its name), the RemoteException is an instance of that class too, so the `except
    IndexError:` or `except interlace.OutOfOrderError:` written for a local run also catches
    it remotely (nnsight's `remote='local'` raises the original type).
    """

    def __new__(cls, tb_string: str = "", *args: Any, category: str | None = None, **kwargs: Any) -> "RemoteException":
        if cls is RemoteException and category:
            cls = _remote_exception_class(category)
        return super().__new__(cls, tb_string)

    def __init__(self, tb_string: str, *, job_id: str | None = None, category: str | None = None) -> None:
        Exception.__init__(self, tb_string)
        self.tb_string = tb_string
        self.job_id = job_id
        self.category = category

    def __str__(self) -> str:
        return self.tb_string

    def __reduce__(self) -> Any:
        return (_rebuild_remote_exception, (self.tb_string, self.job_id, self.category), self.__dict__)


def _rebuild_remote_exception(tb_string: str, job_id: str | None, category: str | None) -> RemoteException:
    return RemoteException(tb_string, job_id=job_id, category=category)


@lru_cache(maxsize=256)  # categories come from the server: bounded
def _remote_exception_class(category: str) -> type[RemoteException]:
    """RemoteException, also an instance of the exception class `category` names (built-in
    or `interlace.errors`), where that class can be combined with it."""
    import builtins

    from .. import errors

    original = getattr(errors, category, None) or getattr(builtins, category, None)
    if not (isinstance(original, type) and issubclass(original, Exception)) or issubclass(original, RemoteException):
        return RemoteException
    try:
        combined = type(f"Remote{category}", (RemoteException, original), {"__module__": "interlace"})
        combined("probe")  # classes whose constructor needs more (UnicodeDecodeError) are left out
    except TypeError:
        return RemoteException
    return combined


class RemoteRequestError(Exception):
    """The server refused a request (4xx/5xx). `problems` lists validation problems (422)."""

    def __init__(self, status_code: int, detail: str, problems: list[dict[str, Any]] | None = None) -> None:
        self.status_code = status_code
        self.detail = detail
        self.problems = problems
        text = f"HTTP {status_code}: {detail}"
        for problem in problems or ():
            where = f"{problem.get('filename')}:{problem.get('lineno')}: " if problem.get("filename") else ""
            fix = f" (fix: {problem['fix']})" if problem.get("fix") else ""
            text += f"\n  - {where}{problem.get('message', problem)}{fix}"
        super().__init__(text)


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds; httpx would do it for every client
    # (even for http:// hosts), so build the context once per process and share it.
    return ssl.create_default_context()


def _error_from(response: httpx.Response) -> RemoteRequestError:
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else None
        problems = body.get("problems") if isinstance(body, dict) else None
    except ValueError:
        detail, problems = None, None
    if not isinstance(detail, str):
        detail = response.text.strip() or response.reason_phrase
    return RemoteRequestError(response.status_code, detail, problems)


class RemoteClient:
    CONNECT_TIMEOUT = 10.0
    READ_TIMEOUT = 300.0
    TICK = 0.1  # display refresh while waiting
    BACKOFF_START, BACKOFF_MAX = 0.1, 2.0
    WS_FAILURES_BEFORE_POLLING = 3

    def __init__(
        self,
        host: str | None = None,
        api_key: str | None = None,
        *,
        verbose: bool = False,
        reconnect_timeout: float = 300.0,
    ) -> None:
        address = (host or os.environ.get("INTERLACE_HOST") or CONFIG.API.HOST).rstrip("/")
        if not address.startswith(("http://", "https://")):
            raise ValueError(f"Invalid host URL: {address!r}. It must start with http:// or https://.")
        self.host = address
        self.ws_host = "ws" + address[len("http"):]
        self.api_key = api_key or os.environ.get("INTERLACE_API_KEY") or CONFIG.API.APIKEY
        self.verbose = verbose or CONFIG.APP.DEBUG
        # How long waiting keeps retrying while the server cannot be reached at all.
        self.reconnect_timeout = reconnect_timeout
        self._timeout = httpx.Timeout(self.READ_TIMEOUT, connect=self.CONNECT_TIMEOUT)
        self._http: httpx.Client | None = None
        self._ahttp: httpx.AsyncClient | None = None
        self._ahttp_loop: asyncio.AbstractEventLoop | None = None
        self._policy: dict[str, Any] | None = None

    # -- plumbing -------------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        headers = {VERSION_HEADER: __version__}
        if self.api_key:
            headers[KEY_HEADER] = self.api_key
        return headers

    def _ws_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"additional_headers": self.headers, "open_timeout": self.CONNECT_TIMEOUT,
                                   "max_size": None}
        if self.ws_host.startswith("wss://"):
            options["ssl"] = _tls_context()
        return options

    def _unreachable(self, exc: BaseException) -> ConnectionError:
        return ConnectionError(
            f"Could not reach the Interlace server at {self.host} ({type(exc).__name__}: {exc}). "
            "Start one with `interlace serve` (it listens on http://127.0.0.1:8000 by default), or "
            "point the client at yours with INTERLACE_HOST or interlace.CONFIG.API.HOST."
        )

    @property
    def http(self) -> httpx.Client:
        # One client for the RemoteClient's life: keep-alive connections save a TCP handshake
        # per request.
        if self._http is None:
            self._http = httpx.Client(base_url=self.host, headers=self.headers, timeout=self._timeout,
                                      verify=_tls_context())
        return self._http

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _ahttp_client(self) -> httpx.AsyncClient:
        # An AsyncClient belongs to the loop it first ran on; make a new one per loop.
        loop = asyncio.get_running_loop()
        if self._ahttp is None or self._ahttp_loop is not loop:
            self._ahttp = httpx.AsyncClient(base_url=self.host, headers=self.headers, timeout=self._timeout,
                                            verify=_tls_context())
            self._ahttp_loop = loop
        return self._ahttp

    async def _arequest(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._ahttp_client().request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    async def aclose(self) -> None:
        self.close()
        if self._ahttp is not None:
            await self._ahttp.aclose()
            self._ahttp = None

    def __del__(self) -> None:
        # A client dropped without close() (`RemoteClient().job(id).result()`) lets its
        # keep-alive connections go now, not at exit with a ResourceWarning per socket.
        try:
            self.close()
        except Exception:  # (at interpreter exit httpx may be half torn down)
            pass

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "RemoteClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- API ------------------------------------------------------------------------------

    def _submit_args(self, payload: bytes, callback: str | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/octet-stream"}
        if callback:
            headers[CALLBACK_HEADER] = callback
        return {"content": payload, "headers": headers}

    def submit(self, payload: bytes, *, callback: str | None = None) -> "Job":
        """Send the payload; returns once the server has stored and queued the job."""
        body = self._request("POST", "/v1/jobs", **self._submit_args(payload, callback)).json()
        return Job(self, body["id"], body)

    async def asubmit(self, payload: bytes, *, callback: str | None = None) -> "Job":
        body = (await self._arequest("POST", "/v1/jobs", **self._submit_args(payload, callback))).json()
        return Job(self, body["id"], body)

    def job(self, job_id: str) -> "Job":
        """Re-attach to a job by id (from this or any other process)."""
        return Job(self, job_id)

    def jobs(self, limit: int = 100, status: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._request("GET", "/v1/jobs", params=params).json()["jobs"]

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/info").json()

    def policy(self, *, cached: bool = False) -> dict[str, Any]:
        """The server's execution policy; `cached=True` fetches it once per client."""
        if cached and self._policy is not None:
            return self._policy
        self._policy = self._request("GET", "/v1/policy").json()
        return self._policy

    def model_meta(self, model_key: str) -> dict[str, Any]:
        """A hosted model's config and tokenizer files, to build it without weights (needs a key)."""
        return self._request("GET", f"/v1/models/{quote(model_key, safe='')}/meta").json()

    def _display(self, display: JobStatusDisplay | bool | None) -> JobStatusDisplay:
        if isinstance(display, JobStatusDisplay):
            return display
        enabled = CONFIG.APP.REMOTE_LOGGING if display is None else bool(display)
        return JobStatusDisplay(enabled=enabled, verbose=self.verbose)


_shared: dict[tuple[str, str | None], RemoteClient] = {}
_shared_lock = threading.Lock()


@atexit.register
def _close_shared() -> None:
    """Close the process's shared clients' keep-alive connections before the interpreter
    tears down (otherwise each open socket is reported unclosed at exit)."""
    with _shared_lock:
        clients = list(_shared.values())
        _shared.clear()
    for client in clients:
        client.close()


def shared_client(host: str | None = None, api_key: str | None = None) -> RemoteClient:
    """One RemoteClient per (host, key) for the process, so that repeated traces reuse its
    keep-alive connections instead of opening new ones each time."""
    probe = RemoteClient(host, api_key)
    key = (probe.host, probe.api_key)
    with _shared_lock:
        client = _shared.get(key)
        if client is None:
            client = _shared[key] = probe
        return client


class _Tracker:
    """Feeds events to the display, drops duplicates (by seq) and spots the final one."""

    def __init__(self, job_id: str, display: JobStatusDisplay) -> None:
        self.job_id = job_id
        self.display = display
        self.last_seq = 0
        self.final: dict[str, Any] | None = None

    def feed(self, event: dict[str, Any]) -> dict[str, Any] | None:
        seq = event.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return None
            self.last_seq = seq
        status = event.get("status", "")
        # An ERROR's description is the traceback: it is raised, not squeezed into the line.
        shown = "" if status == "ERROR" else event.get("description") or ""
        self.display.update(self.job_id, status, shown)
        if status in FINAL:
            self.final = event
        return self.final

    def feed_poll(self, body: dict[str, Any]) -> dict[str, Any] | None:
        for event in body.get("events", []):
            if self.feed(event):
                return self.final
        status = body.get("status", {})
        if status.get("status") in FINAL and self.final is None:
            # Events can be trimmed (expiry); the job's row is the last word.
            self.final = {"id": self.job_id, "seq": None, **status}
            self.display.update(self.job_id, status["status"], "")
        return self.final


class Job:
    """A submitted job. Methods prefixed with `a` are the asyncio variants."""

    def __init__(self, client: RemoteClient, job_id: str, last_status: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.last_status = last_status

    def __repr__(self) -> str:
        status = (self.last_status or {}).get("status", "?")
        return f"<Job {self.id} {status}>"

    # -- status and control ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Poll the job's status JSON (status, description, queue_position, times, ...)."""
        self.last_status = self.client._request("GET", f"/v1/jobs/{quote(self.id)}").json()
        return self.last_status

    async def astatus(self) -> dict[str, Any]:
        self.last_status = (await self.client._arequest("GET", f"/v1/jobs/{quote(self.id)}")).json()
        return self.last_status

    def cancel(self) -> dict[str, Any]:
        """Cancel a job that has not started; raises RemoteRequestError(409) otherwise."""
        self.last_status = self.client._request("DELETE", f"/v1/jobs/{quote(self.id)}").json()
        return self.last_status

    def result(self, timeout: float | None = None) -> bytes:
        """Wait quietly for the job and return its result bytes."""
        return self.wait(display=False, timeout=timeout)

    # -- waiting (sync) -------------------------------------------------------------------

    def wait(self, display: JobStatusDisplay | bool | None = None, *, timeout: float | None = None) -> bytes:
        """Follow the job to its end and return the result bytes.

        display: None (default) shows the status line if CONFIG.APP.REMOTE_LOGGING; True/False
        force it on/off; or pass your own JobStatusDisplay. Raises RemoteException if the job
        fails, TimeoutError after `timeout` seconds (the job keeps running on the server),
        ConnectionError if the server stays unreachable for `client.reconnect_timeout`.
        """
        shown = self.client._display(display)
        tracker = _Tracker(self.id, shown)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            final = self._follow(tracker, deadline)
            return self._finish(final, lambda: self._download(shown))
        finally:
            shown.finish()

    def _follow(self, tracker: _Tracker, deadline: float | None) -> dict[str, Any]:
        client = self.client
        delay = client.BACKOFF_START
        ws_failures = 0
        down_since: float | None = None
        while True:
            ws_failed = False
            if ws_failures < client.WS_FAILURES_BEFORE_POLLING:
                try:
                    if self._follow_ws(tracker, deadline):
                        return tracker.final  # type: ignore[return-value]
                    ws_failures, delay = 0, client.BACKOFF_START  # closed early (restart): reconnect
                except WaitTimeout:
                    raise
                except (OSError, websockets.exceptions.WebSocketException):
                    ws_failed = True
            try:
                body = client._request("GET", f"/v1/jobs/{quote(self.id)}/events",
                                       params={"after": tracker.last_seq}).json()
                down_since = None
                # Count WebSocket failures only while HTTP works: a server that is down (restart)
                # must not push us into polling for good.
                ws_failures += ws_failed
                if tracker.feed_poll(body):
                    return tracker.final  # type: ignore[return-value]
            except ConnectionError:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > client.reconnect_timeout:
                    raise
            _check_deadline(self.id, deadline)
            _sleep_refreshing(delay, tracker.display, deadline)
            delay = min(delay * 2, client.BACKOFF_MAX)

    def _follow_ws(self, tracker: _Tracker, deadline: float | None) -> bool:
        """Follow the WebSocket until the final event (True) or until it closes (False)."""
        client = self.client
        url = f"{client.ws_host}/v1/jobs/{quote(self.id)}/events?after={tracker.last_seq}"
        with sconnect(url, **client._ws_options()) as ws:
            while True:
                try:
                    raw = ws.recv(timeout=_recv_wait(tracker.display, deadline, client.TICK))
                except TimeoutError:
                    _check_deadline(self.id, deadline)
                    tracker.display.update()
                    continue
                except websockets.exceptions.ConnectionClosedOK:
                    return False
                if tracker.feed(_parse_ws(raw)):
                    return True

    def _download(self, shown: JobStatusDisplay) -> bytes:
        client = self.client
        try:
            with client.http.stream("GET", f"/v1/jobs/{quote(self.id)}/result") as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                total = int(response.headers.get("content-length") or 0)
                if total <= PROGRESS_MIN_BYTES:
                    return response.read()
                parts: list[bytes] = []
                with shown.download(total) as advance:
                    for chunk in response.iter_bytes(CHUNK):
                        parts.append(chunk)
                        advance(len(chunk))
                return b"".join(parts)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise client._unreachable(exc) from exc

    def _finish(self, final: dict[str, Any], download: Any) -> Any:
        status = final.get("status")
        self.last_status = final
        if status == "COMPLETED":
            return download()
        if status == "ERROR":
            raise RemoteException(final.get("description") or "The job failed on the server.",
                                  job_id=self.id, category=final.get("error_category"))
        if status == "CANCELLED":
            raise RemoteException(f"Job {self.id} was cancelled before it ran.", job_id=self.id,
                                  category="cancelled")
        raise RemoteRequestError(410, final.get("description") or f"The result of job {self.id} expired.")

    # -- waiting (async) ------------------------------------------------------------------

    async def await_result(self, display: JobStatusDisplay | bool | None = None, *,
                           timeout: float | None = None) -> bytes:
        """Async twin of `wait`."""
        shown = self.client._display(display)
        tracker = _Tracker(self.id, shown)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            final = await self._afollow(tracker, deadline)
            if final.get("status") == "COMPLETED":
                self.last_status = final
                return await self._adownload(shown)
            return self._finish(final, None)
        finally:
            shown.finish()

    async def _afollow(self, tracker: _Tracker, deadline: float | None) -> dict[str, Any]:
        client = self.client
        delay = client.BACKOFF_START
        ws_failures = 0
        down_since: float | None = None
        while True:
            ws_failed = False
            if ws_failures < client.WS_FAILURES_BEFORE_POLLING:
                try:
                    if await self._afollow_ws(tracker, deadline):
                        return tracker.final  # type: ignore[return-value]
                    ws_failures, delay = 0, client.BACKOFF_START
                except WaitTimeout:
                    raise
                except (OSError, websockets.exceptions.WebSocketException):
                    ws_failed = True
            try:
                body = (await client._arequest("GET", f"/v1/jobs/{quote(self.id)}/events",
                                               params={"after": tracker.last_seq})).json()
                down_since = None
                # Count WebSocket failures only while HTTP works: a server that is down (restart)
                # must not push us into polling for good.
                ws_failures += ws_failed
                if tracker.feed_poll(body):
                    return tracker.final  # type: ignore[return-value]
            except ConnectionError:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > client.reconnect_timeout:
                    raise
            _check_deadline(self.id, deadline)
            await asyncio.sleep(delay)
            tracker.display.update()
            delay = min(delay * 2, client.BACKOFF_MAX)

    async def _afollow_ws(self, tracker: _Tracker, deadline: float | None) -> bool:
        client = self.client
        url = f"{client.ws_host}/v1/jobs/{quote(self.id)}/events?after={tracker.last_seq}"
        async with aconnect(url, **client._ws_options()) as ws:
            while True:
                try:
                    raw = await asyncio.wait_for(ws.recv(), _recv_wait(tracker.display, deadline, client.TICK))
                except asyncio.TimeoutError:
                    _check_deadline(self.id, deadline)
                    tracker.display.update()
                    continue
                except websockets.exceptions.ConnectionClosedOK:
                    return False
                if tracker.feed(_parse_ws(raw)):
                    return True

    async def _adownload(self, shown: JobStatusDisplay) -> bytes:
        client = self.client
        try:
            async with client._ahttp_client().stream("GET", f"/v1/jobs/{quote(self.id)}/result") as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_from(response)
                total = int(response.headers.get("content-length") or 0)
                if total <= PROGRESS_MIN_BYTES:
                    return await response.aread()
                parts: list[bytes] = []
                with shown.download(total) as advance:
                    async for chunk in response.aiter_bytes(CHUNK):
                        parts.append(chunk)
                        advance(len(chunk))
                return b"".join(parts)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise client._unreachable(exc) from exc


# -- helpers -----------------------------------------------------------------------------------


def _parse_ws(raw: str | bytes) -> dict[str, Any]:
    message = json.loads(raw)
    if "error" in message:  # the server refused the stream (401/404/426): not retryable
        raise RemoteRequestError(int(message.get("code", 400)), message["error"])
    return message


def _recv_wait(display: JobStatusDisplay, deadline: float | None, tick: float) -> float | None:
    wait = tick if display.enabled else None
    if deadline is not None:
        left = max(0.0, deadline - time.monotonic())
        wait = left if wait is None else min(wait, left)
    return wait


class WaitTimeout(TimeoutError):
    """`Job.wait(timeout=...)` ran out; the job itself goes on."""


def _check_deadline(job_id: str, deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimeout(
            f"Job {job_id} did not finish in time; it keeps running on the server. Re-attach later "
            f"with RemoteClient().job({job_id!r}).wait()."
        )


def _sleep_refreshing(delay: float, display: JobStatusDisplay, deadline: float | None) -> None:
    end = time.monotonic() + delay
    if deadline is not None:
        end = min(end, deadline)
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))
        display.update()
