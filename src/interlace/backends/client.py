"""Client for an Interlace server: submit payload bytes, follow the job, download the result.

    client = RemoteClient()                       # host/key from args, env, or interlace.CONFIG
    job = client.submit(payload)                  # returns at once (202)
    data = job.wait()                             # live status line, then the result bytes
    again = RemoteClient().job(job.id).result()   # re-attach by id, from any process

`wait` follows the job's WebSocket; when it drops (server restart, network) it reconnects with
backoff, asking only for events after the last one seen, and falls back to HTTP polling if
WebSockets keep failing. Those decisions are made once, without I/O, in `follow.py`; here
`_JobIO` and `_AsyncJobIO` only carry them out, blocking or with asyncio. Payloads and results
are opaque bytes here; encoding is done by `interlace.contract`. The protocol (headers, paths,
job states) is `interlace.contract.http`.

`wait(local=runner)` also runs the job's local blocks (`with interlace.local():`) on this
machine as the job reaches them: `local_serve.serve_local` is one block's conversation over
HTTP (the asyncio wait runs it on one thread of its own, so the event loop goes on meanwhile).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Final, Iterator

import httpx
import websockets
from websockets.asyncio.client import connect as aconnect
from websockets.sync.client import connect as sconnect

from .._version import __version__
from ..config import CONFIG
from ..contract.http import (
    AFTER_QUERY,
    CALLBACK_HEADER,
    INFO,
    JOB,
    JOB_EVENTS,
    JOB_LOCAL,
    JOB_RESULT,
    JOBS,
    KEY_HEADER,
    LOCAL_QUERY,
    WS_LOCAL_MAX_BYTES,
    MODEL_META,
    POLICY,
    VERSION_HEADER,
    path,
    local_frame,
)
from ..contract.local_block import LocalPeer
from ..errors import RemoteException, RemoteRequestError, ServerUnreachableError, WaitTimeout
from .display import JobStatusDisplay
from .follow import Follow, Head, arun, refusal, run
from .local_serve import serve_local

__all__ = [
    "RemoteClient",
    "Job",
    "shared_client",
    "fetch_policy",
    "RemoteException",
    "RemoteRequestError",
    "ServerUnreachableError",
    "WaitTimeout",
]

CHUNK = 256 * 1024  # download chunk

MSG_UNREACHABLE: Final = (
    "Could not reach the Interlace server at {host} ({error}). "
    "Start one with `interlace serve` (it listens on http://127.0.0.1:8000 by default), or "
    "point the client at yours with INTERLACE_HOST or interlace.CONFIG.API.HOST."
)

# Errors that mean no server answered (as opposed to one that answered badly). ReadError: a
# kept-alive connection reset by a server that died (kill -9) while the request was in flight.
_NOT_REACHED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


#: How long one request waits out a server's rate limit (429 with Retry-After) in all, before
#: the 429 reaches the caller with the server's message.
RATE_LIMIT_PATIENCE = 30.0


def _rate_limited_pause(response: httpx.Response, waited: float) -> float | None:
    """Seconds to wait before sending again, when the server said "too many requests, retry
    after N s" and the wait still fits the patience; None otherwise (a 429 without
    Retry-After, such as too many jobs in flight, is the caller's to see at once)."""
    if response.status_code != 429:
        return None
    try:
        pause = max(0.05, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None
    return pause if waited + pause <= RATE_LIMIT_PATIENCE else None


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle takes tens of milliseconds; httpx would do it for every client
    # (even for http:// hosts), so build the context once per process and share it.
    return ssl.create_default_context()


def _error_from(response: httpx.Response) -> RemoteRequestError:
    return refusal(response.status_code, response.content, response.reason_phrase)


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
        self._policy_unanswered = False  # `fetch_policy` found no server: do not ask again

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

    def _events_url(self, job_id: str, after: int, serves_local: bool = False) -> str:
        local = f"&{LOCAL_QUERY}=1" if serves_local else ""
        return f"{self.ws_host}{path(JOB_EVENTS, job_id=job_id)}?{AFTER_QUERY}={after}{local}"

    @contextlib.contextmanager
    def _reaching(self, *errors: type[Exception]) -> Iterator[None]:
        """Turn `errors` (the ones that mean no server answered) into one that says so."""
        try:
            yield
        except errors as exc:
            raise ServerUnreachableError(MSG_UNREACHABLE.format(
                host=self.host, error=f"{type(exc).__name__}: {exc}")) from None

    @property
    def http(self) -> httpx.Client:
        # One client for the RemoteClient's life: keep-alive connections save a TCP handshake
        # per request.
        if self._http is None:
            self._http = httpx.Client(base_url=self.host, headers=self.headers, timeout=self._timeout,
                                      verify=_tls_context())
        return self._http

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        waited = 0.0
        while True:
            with self._reaching(*_NOT_REACHED):
                response = self.http.request(method, url, **kwargs)
            pause = _rate_limited_pause(response, waited)
            if pause is None:
                break
            time.sleep(pause)
            waited += pause
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

    async def _arequest(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        waited = 0.0
        while True:
            with self._reaching(*_NOT_REACHED):
                response = await self._ahttp_client().request(method, url, **kwargs)
            pause = _rate_limited_pause(response, waited)
            if pause is None:
                break
            await asyncio.sleep(pause)
            waited += pause
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
        body = self._request("POST", JOBS, **self._submit_args(payload, callback)).json()
        return Job(self, body["id"], body)

    async def asubmit(self, payload: bytes, *, callback: str | None = None) -> "Job":
        body = (await self._arequest("POST", JOBS, **self._submit_args(payload, callback))).json()
        return Job(self, body["id"], body)

    def job(self, job_id: str) -> "Job":
        """Re-attach to a job by id (from this or any other process)."""
        return Job(self, job_id)

    def jobs(self, limit: int = 100, status: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._request("GET", JOBS, params=params).json()["jobs"]

    def info(self) -> dict[str, Any]:
        return self._request("GET", INFO).json()

    def policy(self, *, cached: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """The server's execution policy; `cached=True` fetches it once per client. This is the
        one way Interlace asks a server for its policy (`fetch_policy` builds on it)."""
        if cached and self._policy is not None:
            return self._policy
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        self._policy = self._request("GET", POLICY, **options).json()
        return self._policy

    def model_meta(self, model_key: str) -> dict[str, Any]:
        """A hosted model's config and tokenizer files, to build it without weights (needs a key)."""
        return self._request("GET", path(MODEL_META, model_key=model_key)).json()

    def _display(self, display: JobStatusDisplay | bool | None) -> JobStatusDisplay:
        if isinstance(display, JobStatusDisplay):
            return display
        enabled = CONFIG.APP.REMOTE_LOGGING if display is None else bool(display)
        return JobStatusDisplay(enabled=enabled, verbose=self.verbose)

    def _follow(self, job_id: str, display: JobStatusDisplay, timeout: float | None,
                local: LocalPeer | None = None) -> Follow:
        return Follow(
            job_id, display,
            deadline=None if timeout is None else time.monotonic() + timeout,
            reconnect_timeout=self.reconnect_timeout, tick=self.TICK,
            backoff=(self.BACKOFF_START, self.BACKOFF_MAX),
            ws_failures_before_polling=self.WS_FAILURES_BEFORE_POLLING,
            local=local,
        )


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


def fetch_policy(host: str | None = None, api_key: str | None = None, *, timeout: float = 0.5) -> dict[str, Any] | None:
    """The policy of the server at `host` (default: INTERLACE_HOST, else CONFIG.API.HOST), or
    None when no server answers within `timeout` seconds (or the host is not a URL).

    Asked through `shared_client`, so with its TLS context and headers, and once per host and
    key for the process: the answer, or the silence, is remembered by that client.
    """
    try:
        client = shared_client(host, api_key)
    except ValueError:  # not an http(s) URL: there is no server to ask
        return None
    if client._policy is None and not client._policy_unanswered:
        try:
            client.policy(timeout=timeout)
        except (ConnectionError, RemoteRequestError, httpx.HTTPError, ValueError):
            client._policy_unanswered = True
    policy = client._policy
    return policy if isinstance(policy, dict) else None


class Job:
    """A submitted job. Methods prefixed with `a` are the asyncio variants."""

    def __init__(self, client: RemoteClient, job_id: str, last_status: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = job_id
        self.last_status = last_status
        #: (status, server time) of each state the last wait saw (`follow.Follow.timeline`).
        self.timeline: list[tuple[str, float]] = []

    def __repr__(self) -> str:
        status = (self.last_status or {}).get("status", "?")
        return f"<Job {self.id} {status}>"

    # -- status and control ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Poll the job's status JSON (status, description, queue_position, times, ...)."""
        self.last_status = self.client._request("GET", path(JOB, job_id=self.id)).json()
        return self.last_status

    async def astatus(self) -> dict[str, Any]:
        self.last_status = (await self.client._arequest("GET", path(JOB, job_id=self.id))).json()
        return self.last_status

    def cancel(self) -> dict[str, Any]:
        """Cancel a job that has not started; raises RemoteRequestError(409) otherwise."""
        self.last_status = self.client._request("DELETE", path(JOB, job_id=self.id)).json()
        return self.last_status

    def result(self, timeout: float | None = None) -> bytes:
        """Wait quietly for the job and return its result bytes."""
        return self.wait(display=False, timeout=timeout)

    # -- waiting --------------------------------------------------------------------------

    def wait(self, display: JobStatusDisplay | bool | None = None, *, timeout: float | None = None,
             local: LocalPeer | None = None) -> bytes:
        """Follow the job to its end and return the result bytes.

        display: None (default) shows the status line if CONFIG.APP.REMOTE_LOGGING; True/False
        force it on/off; or pass your own JobStatusDisplay. local: the trace's local-block
        runner (`backends/local_runner.py`), which runs its `with interlace.local():` blocks here
        as the job reaches them. Raises RemoteException if the job fails (or the exception a
        local block raised here), WaitTimeout (a TimeoutError) after `timeout` seconds (the job
        keeps running on the server), ServerUnreachableError (a ConnectionError) if the server
        stays unreachable for `client.reconnect_timeout`.
        """
        follow = self.client._follow(self.id, self.client._display(display), timeout, local)
        try:
            return run(follow.wait(), _JobIO(self.client, self.id, serves_local=local is not None))
        finally:
            self._ended(follow)

    async def await_result(self, display: JobStatusDisplay | bool | None = None, *,
                           timeout: float | None = None, local: LocalPeer | None = None) -> bytes:
        """`wait`, with asyncio."""
        follow = self.client._follow(self.id, self.client._display(display), timeout, local)
        try:
            return await arun(follow.wait(), _AsyncJobIO(self.client, self.id, serves_local=local is not None))
        finally:
            self._ended(follow)

    def _ended(self, follow: Follow) -> None:
        if follow.final is not None:
            self.last_status = follow.final
        if follow.timeline:  # each wait follows the events from the first
            self.timeline = follow.timeline
        follow.display.finish()


class _JobIO:
    """The blocking I/O of following one job (`follow.JobIO`). `serves_local`: this client runs
    the job's local blocks, and tells the server so as it follows (`?local=1`)."""

    def __init__(self, client: RemoteClient, job_id: str, *, serves_local: bool = False) -> None:
        self.client = client
        self.job_id = job_id
        self._params: dict[str, Any] = {LOCAL_QUERY: 1} if serves_local else {}
        self._ws: Any = None
        self._ws_open = contextlib.ExitStack()
        self._open = contextlib.ExitStack()  # the result's streamed answer
        self._response: Any = None
        self._chunks: Iterator[bytes] | None = None

    def _drop_ws(self) -> None:
        self._ws = None
        with contextlib.suppress(Exception):  # a broken socket may fail to close; it is gone either way
            self._ws_open.close()

    def listen(self, after: int) -> None:
        self._drop_ws()
        url = self.client._events_url(self.job_id, after, bool(self._params))
        self._ws = self._ws_open.enter_context(sconnect(url, **self.client._ws_options()))

    def receive(self, timeout: float | None) -> str | bytes | None:
        try:
            return self._ws.recv(timeout=timeout)
        except websockets.exceptions.ConnectionClosedOK:
            self._drop_ws()
            return None

    def poll(self, after: int) -> dict[str, Any]:
        self._drop_ws()
        return self.client._request("GET", path(JOB_EVENTS, job_id=self.job_id),
                                    params={AFTER_QUERY: after, **self._params}).json()

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def fetch(self) -> Head:
        self._drop_ws()
        with self.client._reaching(httpx.ConnectError, httpx.ConnectTimeout):
            response = self._open.enter_context(self.client.http.stream("GET", path(JOB_RESULT, job_id=self.job_id)))
        self._response = response
        return Head(response.status_code, int(response.headers.get("content-length") or 0), response.reason_phrase)

    def read(self) -> bytes:
        return self._response.read()

    def chunk(self) -> bytes:
        if self._chunks is None:
            self._chunks = self._response.iter_bytes(CHUNK)
        return next(self._chunks, b"")

    def local(self, exchange: int, line: int, runner: LocalPeer, values: bytes | None) -> None:
        url = path(JOB_LOCAL, job_id=self.job_id, exchange=str(exchange))

        def over_websocket(header: dict, body: bytes) -> bool:
            # The block's last message rides the open status socket: one HTTP round trip less
            # per block (the reads, which need an answer, stay POSTs).
            if self._ws is None or len(body) > WS_LOCAL_MAX_BYTES:
                return False
            try:
                self._ws.send(local_frame(exchange, header, body))
            except websockets.exceptions.ConnectionClosed:
                return False
            return True

        serve_local(self.client._request, url, line, runner, values, over_websocket)

    def close(self) -> None:
        self._drop_ws()
        self._open.close()


class _AsyncJobIO:
    """The asyncio I/O of following one job (`follow.AsyncJobIO`)."""

    def __init__(self, client: RemoteClient, job_id: str, *, serves_local: bool = False) -> None:
        self.client = client
        self.job_id = job_id
        self._params: dict[str, Any] = {LOCAL_QUERY: 1} if serves_local else {}
        self._ws: Any = None
        self._ws_open = contextlib.AsyncExitStack()
        self._open = contextlib.AsyncExitStack()  # the result's streamed answer
        self._response: Any = None
        self._chunks: Any = None
        # Local blocks run on one thread of their own (the runner's greenlets belong to the
        # thread that made them), so the event loop goes on while a block runs.
        self._local_thread: ThreadPoolExecutor | None = None

    async def _drop_ws(self) -> None:
        self._ws = None
        with contextlib.suppress(Exception):  # a broken socket may fail to close; it is gone either way
            await self._ws_open.aclose()

    async def listen(self, after: int) -> None:
        await self._drop_ws()
        url = self.client._events_url(self.job_id, after, bool(self._params))
        self._ws = await self._ws_open.enter_async_context(aconnect(url, **self.client._ws_options()))

    async def receive(self, timeout: float | None) -> str | bytes | None:
        try:
            return await asyncio.wait_for(self._ws.recv(), timeout)
        except websockets.exceptions.ConnectionClosedOK:
            await self._drop_ws()
            return None

    async def poll(self, after: int) -> dict[str, Any]:
        await self._drop_ws()
        url = path(JOB_EVENTS, job_id=self.job_id)
        return (await self.client._arequest("GET", url, params={AFTER_QUERY: after, **self._params})).json()

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def fetch(self) -> Head:
        await self._drop_ws()
        stream = self.client._ahttp_client().stream("GET", path(JOB_RESULT, job_id=self.job_id))
        with self.client._reaching(httpx.ConnectError, httpx.ConnectTimeout):
            response = await self._open.enter_async_context(stream)
        self._response = response
        return Head(response.status_code, int(response.headers.get("content-length") or 0), response.reason_phrase)

    async def read(self) -> bytes:
        return await self._response.aread()

    async def chunk(self) -> bytes:
        if self._chunks is None:
            self._chunks = self._response.aiter_bytes(CHUNK)
        return await anext(self._chunks, b"")

    async def local(self, exchange: int, line: int, runner: LocalPeer, values: bytes | None) -> None:
        if self._local_thread is None:
            self._local_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="interlace-local")
        url = path(JOB_LOCAL, job_id=self.job_id, exchange=str(exchange))
        # The blocking client on that thread: the runner is synchronous code anyway.
        await asyncio.get_running_loop().run_in_executor(
            self._local_thread, serve_local, self.client._request, url, line, runner, values)

    async def close(self) -> None:
        await self._drop_ws()
        await self._open.aclose()
        if self._local_thread is not None:
            self._local_thread.shutdown(wait=False)
