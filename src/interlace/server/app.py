"""The HTTP and WebSocket API (FastAPI). Thin: checks, then calls `service.JobService`.

See docs/http-api.md for the protocol. Handlers do the small SQLite work inline (microseconds,
cheaper than a thread hop) and move anything that scales with payload or result size to a
thread, so one large upload never stalls the status streams of everyone else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from contextlib import asynccontextmanager, suppress
from functools import lru_cache, partial
from importlib import metadata
from typing import Any, AsyncIterator, Final
from urllib.parse import urlparse

import anyio
from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .._version import PROTOCOL_VERSION, __version__
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
    LOCAL_HEADER,
    LOCAL_OPS,
    LOCAL_QUERY,
    WS_LOCAL_MAX_BYTES,
    MODEL_META,
    POLICY,
    STATUS,
    STATUS_PAGE,
    VERSION_HEADER,
    VERSION_QUERY,
    WS_AUTH_FIELDS,
    WS_CLOSE_BASE,
    JobStatus,
    parse_local_frame,
)
from ..contract.errors import WireFormatError
from ..contract.local_block import ReadRequest, message_from_wire
from ..execution.errors import BadRequest
from . import versions
from .auth import MSG_INVALID_KEY, MSG_MISSING_KEY, User
from .limits import TooManyRequests
from .local_exchange import ExchangeError
from .replica_proxy import LocalElsewhere, forward_frame_soon, forward_local
from .service import Conflict, JobService, NotFound
from .settings import MiB, ServerSettings
from .status import RECENT_JOBS, server_status
from .status_page import page_response
from .store import Event, JobRecord, queued_text
from .types import JobRunner

__all__ = ["create_app", "ApiError", "INLINE_BYTES", "LOCAL_MESSAGE_BYTES"]

log = logging.getLogger("interlace.server")

# Payloads up to this size are validated on the event loop; larger ones in a thread.
INLINE_BYTES = 1 * MiB
WS_AUTH_TIMEOUT = 10.0
# A local block's read or failure message is a little JSON (a failure: a traceback's text).
LOCAL_MESSAGE_BYTES = 1 * MiB

DESCRIPTION = f"""Run traces on hosted models. Submit with `POST {JOBS}` (payload bytes),
follow `WS {JOB_EVENTS.format(job_id="{id}")}` (or poll `GET {JOB.format(job_id="{id}")}`), download
`GET {JOB_RESULT.format(job_id="{id}")}`. `GET {MODEL_META.format(model_key="{key}")}` describes a hosted
model (config and tokenizer, no weights) for clients that build it without weights. Job and model
endpoints need the `{KEY_HEADER}` header; create a key on the server machine with
`interlace keys create --name YOU`. Full protocol: docs/http-api.md."""

MSG_EMPTY_BODY: Final = ("The request body is empty; send the encoded payload bytes "
                         "(Content-Type: application/octet-stream).")
MSG_TOO_LARGE: Final = (
    "The payload is {amount} bytes; this server accepts at most {limit} bytes ({limit_mib:.0f} MiB). "
    "Send smaller inputs or save fewer values, or ask the operator to raise "
    "`interlace serve --max-upload-mb`."
)
MSG_LOCAL_TOO_LARGE: Final = (
    "The values this local block sends back are {amount} bytes; this server accepts at most {limit} bytes "
    "({limit_mib:.0f} MiB) per message. Send back fewer or smaller values (keep large objects inside the "
    "block), or ask the operator to raise `interlace serve --max-upload-mb`."
)
MSG_LOCAL_OP: Final = (
    "Say which message of the local block this is in the {header} header: one of {ops} (got {got!r}). "
    "`read`: JSON {{\"path\": \"model.layers.0\", \"kind\": \"output\"}}; `done`: the block's values "
    "(octet-stream); `failed`: JSON {{\"text\": ..., \"category\": \"local-block-error\"}}."
)


class ApiError(Exception):
    def __init__(self, status: int, detail: str, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.problems = problems


def _error_body(detail: str, problems: list[dict[str, Any]] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"detail": detail}
    if problems is not None:
        body["problems"] = problems
    return body


@lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    found = {}
    for name in ("interlace", "torch", "transformers", "safetensors", "zstandard", "numpy",
                 "fastapi", "uvicorn", "pydantic"):
        with suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def create_app(settings: ServerSettings, runner: JobRunner) -> FastAPI:
    service = JobService(settings, runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.hub.bind(asyncio.get_running_loop())
        # Recovery reads and re-validates payloads: keep it off the loop.
        await anyio.to_thread.run_sync(service.start)
        sweeper = asyncio.create_task(_sweep_forever(service, settings.sweep_interval))
        try:
            yield
        finally:
            sweeper.cancel()
            service.stop()
            service.hub.unbind()

    app = FastAPI(title="Interlace server", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.detail, exc.problems), status_code=exc.status)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(_error_body(str(exc), None), status_code=404)

    @app.exception_handler(TooManyRequests)
    async def _too_many(request: Request, exc: TooManyRequests) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return JSONResponse({"detail": exc.message, **exc.details}, status_code=429, headers=headers)

    @app.exception_handler(ExchangeError)
    async def _exchange_error(request: Request, exc: ExchangeError) -> JSONResponse:
        return JSONResponse(_error_body(exc.text, None), status_code=exc.status)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(_error_body(str(exc), None), status_code=409)

    def authenticate(request: Request, *, counted: bool = True) -> User:
        problem = versions.incompatibility(request.headers.get(VERSION_HEADER))
        if problem:
            raise ApiError(426, problem)
        key = request.headers.get(KEY_HEADER)
        if not key:
            raise ApiError(401, MSG_MISSING_KEY)
        user = service.keys.verify(key)
        if user is None:
            raise ApiError(401, MSG_INVALID_KEY)
        if counted:
            service.rate.take(user.key_id)  # 429 past `requests_per_minute` (limits.py)
        return user

    # -- public ---------------------------------------------------------------------------

    @app.get(INFO, summary="Server version, supported client versions, hosted models (no key needed)")
    async def info() -> JSONResponse:
        return JSONResponse({
            "server": "interlace",
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "supported_client_versions": versions.supported_range(),
            "models": service.model_keys,
            "max_upload_bytes": service.limits.max_upload_bytes,
            "result_ttl": settings.result_ttl,
            "python": sys.version.split()[0],
            "packages": _package_versions(),
        })

    @app.get(POLICY, summary="The server's execution policy (what payloads may do)")
    async def policy() -> JSONResponse:
        return JSONResponse(service.runner.policy())

    @app.get(
        MODEL_META.replace("{model_key}", "{model_key:path}"),  # a key may hold a literal /
        summary="A hosted model's config and tokenizer files (no weights), to build it on the meta device",
        responses={401: {"description": "missing or bad key"},
                   404: {"description": "model not hosted (the answer names the hosted models)"},
                   409: {"description": "the hosted model has no Hugging Face config"}},
    )
    async def model_meta(request: Request, model_key: str) -> Response:
        authenticate(request)
        # Writing and reading the tokenizer files takes milliseconds: off the loop (once per key).
        body = await anyio.to_thread.run_sync(service.model_meta, model_key)
        return Response(body, media_type="application/json")

    @app.get(STATUS, summary="The server's state for your key: models, queues, your recent jobs, versions, limits",
             responses={401: {"description": "missing or bad key"}})
    async def status(request: Request, limit: int = RECENT_JOBS) -> JSONResponse:
        user = authenticate(request)
        return JSONResponse(server_status(service, user, limit=limit))

    @app.get(STATUS_PAGE, include_in_schema=False)  # the same data as a page (server/status.html)
    @app.get("/", include_in_schema=False)
    async def status_page() -> Response:
        return page_response()

    # -- jobs -----------------------------------------------------------------------------

    @app.post(
        JOBS,
        status_code=202,
        summary="Submit a job: the body is the encoded payload",
        openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}},
        responses={202: {"description": '{"id", "status": "QUEUED", "queue_position"}'},
                   400: {"description": "undecodable payload"}, 401: {"description": "missing or bad key"},
                   404: {"description": "model not hosted"}, 413: {"description": "payload too large"},
                   422: {"description": "validation problems (listed)"}, 426: {"description": "client version"},
                   429: {"description": "too many requests, or too many jobs in flight, for this key "
                                        "(the message says the limit; Retry-After when waiting helps)"}},
    )
    async def submit(request: Request) -> JSONResponse:
        user = authenticate(request)
        callback = _check_callback(request.headers.get(CALLBACK_HEADER))
        body = await _read_limited(request, service.limits.max_upload_bytes)
        if not body:
            raise ApiError(400, MSG_EMPTY_BODY)
        accept = partial(service.accept, user, body, callback=callback,
                         client_version=request.headers.get(VERSION_HEADER))
        if len(body) <= INLINE_BYTES:
            job_id, position = accept()
        else:
            job_id, position = await anyio.to_thread.run_sync(accept)
        return JSONResponse({"id": job_id, "status": JobStatus.QUEUED.value, "queue_position": position},
                            status_code=202)

    @app.get(JOBS, summary="Your jobs, newest first")
    async def list_jobs(request: Request, limit: int = 100, status: str | None = None) -> JSONResponse:
        user = authenticate(request)
        records = service.store.list_jobs(user.name, status=status, limit=max(1, min(limit, 1000)))
        return JSONResponse({"jobs": [service.status_json(r) for r in records]})

    @app.get(JOB, summary="A job's status (poll)")
    async def job_status(request: Request, job_id: str, local: int = Query(0, alias=LOCAL_QUERY)) -> JSONResponse:
        user = authenticate(request)
        record = service.owned(user, job_id)
        if local:
            service.local_client_seen(job_id)
        return JSONResponse(service.status_json(record))

    @app.get(JOB_EVENTS, summary="A job's recorded events after `after` (polling fallback)")
    async def job_events(request: Request, job_id: str, after: int = Query(0, alias=AFTER_QUERY),
                         local: int = Query(0, alias=LOCAL_QUERY)) -> JSONResponse:
        user = authenticate(request)
        record = service.owned(user, job_id)
        if local:
            service.local_client_seen(job_id)
        events = service.store.events_after(job_id, after)
        return JSONResponse({"status": service.status_json(record), "events": [e.to_json() for e in events]})

    @app.delete(JOB, summary="Cancel a queued job")
    async def cancel(request: Request, job_id: str) -> JSONResponse:
        user = authenticate(request)
        return JSONResponse(service.status_json(service.cancel(user, job_id)))

    @app.get(JOB_RESULT, summary="Download the result bytes of a COMPLETED job")
    async def result(request: Request, job_id: str) -> Response:
        user = authenticate(request)
        record = service.owned(user, job_id)
        _check_downloadable(record)
        store = service.results
        local = store.local_path(job_id)
        if local is not None:
            try:
                size = local.stat().st_size
            except FileNotFoundError:
                raise ApiError(410, _gone_text(job_id)) from None
            if size <= INLINE_BYTES:
                # Small results: one read and one send beat a streaming loop.
                return Response(local.read_bytes(), media_type="application/octet-stream")
        else:
            try:
                size = await anyio.to_thread.run_sync(store.size, job_id)
            except FileNotFoundError:
                raise ApiError(410, _gone_text(job_id)) from None
        return StreamingResponse(store.iter_chunks(job_id), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size)})

    local_responses: dict[int | str, dict[str, Any]] = {
        400: {"description": "bad exchange number or message (the answer names the problem)"},
        401: {"description": "missing or bad key"},
        404: {"description": "unknown job (or another user's), or no such local block"},
        409: {"description": "the block is over (answered, timed out, the job ended), or not the client's turn"},
        413: {"description": "message larger than the server accepts"},
    }

    @app.get(JOB_LOCAL, summary="The values sent down to a running job's local block (octet-stream)",
             responses=local_responses)
    async def local_values(request: Request, job_id: str, exchange: str) -> Response:
        user = authenticate(request)
        number = _exchange_number(exchange)
        try:
            peer = service.local_peer(user, job_id)
        except LocalElsewhere as away:  # several API replicas: the one running the job answers
            return await forward_local(request, away, job_id, exchange, service.forward_timeout)
        return Response(peer.values(number), media_type="application/octet-stream")

    @app.post(
        JOB_LOCAL, status_code=200,
        summary=f"The client's next message for a running job's local block ({LOCAL_HEADER}: read, done, failed)",
        responses={200: {"description": "read: the value (octet-stream)"},
                   204: {"description": "done or failed: the job goes on"}, **local_responses},
    )
    async def local_message(request: Request, job_id: str, exchange: str) -> Response:
        # A message the job is waiting for is not counted against `requests_per_minute`: the
        # job's own pace bounds those (a streamed generation sends one per token), and a rate
        # limit would only slow it down. A refused one counts, so floods still meet the limit.
        user = authenticate(request, counted=False)
        try:
            return await _local_message(request, user, job_id, exchange)
        except Exception:
            service.rate.take(user.key_id)
            raise

    async def _local_message(request: Request, user: User, job_id: str, exchange: str) -> Response:
        number = _exchange_number(exchange)
        try:
            peer = service.local_peer(user, job_id)
        except LocalElsewhere as away:  # several API replicas: the one running the job answers
            return await forward_local(request, away, job_id, exchange, service.forward_timeout)
        op = request.headers.get(LOCAL_HEADER)
        if op not in LOCAL_OPS:
            raise ApiError(400, MSG_LOCAL_OP.format(header=LOCAL_HEADER, ops=", ".join(LOCAL_OPS), got=op))
        if op == "done":
            body = await _read_limited(request, service.limits.max_upload_bytes, MSG_LOCAL_TOO_LARGE)
            header: Any = {"op": op}
        else:
            body = await _read_limited(request, LOCAL_MESSAGE_BYTES, MSG_LOCAL_TOO_LARGE)
            header = _json_object(body, op)
            header["op"] = op
            body = b""
        try:
            message = message_from_wire(header, body)
        except WireFormatError as exc:
            raise ApiError(400, f"Bad `{op}` message for a local block: {exc}.") from None
        answer = peer.post(number, message)
        if answer is None:
            return Response(status_code=204)
        # The worker thread answers the read; this request waits on the loop, never blocking it.
        return Response(await asyncio.wrap_future(answer), media_type="application/octet-stream")

    @app.websocket(JOB_EVENTS)
    async def events_ws(ws: WebSocket, job_id: str, after: int = Query(0, alias=AFTER_QUERY)) -> None:
        await ws.accept()
        try:
            await _stream_events(service, ws, job_id, after)
        except WebSocketDisconnect:
            pass

    return app


# -- helpers ---------------------------------------------------------------------------------


def _check_callback(url: str | None) -> str | None:
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ApiError(400, f"{CALLBACK_HEADER} must be an http:// or https:// URL, got {url!r}.")
    return url


async def _read_limited(request: Request, limit: int, template: str = MSG_TOO_LARGE) -> bytes:
    """Read the body, refusing it (413, `template`'s text) as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, _too_large_text(int(declared), limit, template=template))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, _too_large_text(size, limit, at_least=True, template=template))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large_text(size: int, limit: int, at_least: bool = False, template: str = MSG_TOO_LARGE) -> str:
    amount = f"more than {limit}" if at_least else str(size)
    return template.format(amount=amount, limit=limit, limit_mib=limit / MiB)


def _exchange_number(text: str) -> int:
    # ASCII digits only: `str.isdigit` also accepts '¹', which `int` refuses (found by the fuzzer).
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2**31:
        raise ApiError(400, f"A local block's exchange number is a whole number from 1 (the `exchange` of the "
                            f"job's STREAM event), got {text!r}.")
    return int(text)


def _json_object(body: bytes, op: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body or b"null")
    except ValueError as exc:
        parsed, problem = None, f"it is not JSON ({exc})"
    else:
        problem = "it must be a JSON object"
    if not isinstance(parsed, dict):
        example = '{"path": "model.layers.0", "kind": "output"}' if op == "read" else \
            '{"text": "...", "category": "local-block-error"}'
        raise ApiError(400, f"Bad `{op}` message for a local block: {problem}, like {example}.")
    return parsed


def _gone_text(job_id: str) -> str:
    return f"The result of job {job_id} expired and was deleted; submit the job again."


def _check_downloadable(record: JobRecord) -> None:
    status = record.status
    if status == JobStatus.EXPIRED.value or (
        status == JobStatus.COMPLETED.value and record.expires_at is not None and record.expires_at <= time.time()
    ):
        raise ApiError(410, _gone_text(record.id))
    if status == JobStatus.COMPLETED.value:
        return
    if status == JobStatus.ERROR.value:
        raise ApiError(409, f"Job {record.id} ended in ERROR and has no result; "
                            f"GET {JOB.format(job_id=record.id)} shows the error.")
    if status == JobStatus.CANCELLED.value:
        raise ApiError(409, f"Job {record.id} was cancelled; it has no result.")
    raise ApiError(409, f"Job {record.id} is {status}, not finished; follow {JOB_EVENTS.format(job_id=record.id)} "
                        "and download once it is COMPLETED.")


async def _sweep_forever(service: JobService, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(service.sweep)
        except Exception:
            log.exception("result sweep failed; will retry")


async def _ws_fail(ws: WebSocket, code: int, message: str) -> None:
    # The JSON message carries the full text; the close reason is capped at 123 bytes.
    await ws.send_text(json.dumps({"error": message, "code": code}))
    await ws.close(code=WS_CLOSE_BASE + code, reason=message.encode()[:120].decode(errors="ignore"))


async def _stream_events(service: JobService, ws: WebSocket, job_id: str, after: int) -> None:
    key = ws.headers.get(KEY_HEADER)
    version = ws.headers.get(VERSION_HEADER) or ws.query_params.get(VERSION_QUERY)
    if not key:
        # Browsers cannot set headers on a WebSocket: accept the key as the first message,
        # {"key": "...", "version": "..."}.
        try:
            first = json.loads(await asyncio.wait_for(ws.receive_text(), WS_AUTH_TIMEOUT))
        except (asyncio.TimeoutError, ValueError, KeyError):
            first = {}
        if isinstance(first, dict):
            key_field, version_field = WS_AUTH_FIELDS
            key = first.get(key_field)
            version = version or first.get(version_field)
    problem = versions.incompatibility(version)
    if problem:
        return await _ws_fail(ws, 426, problem)
    if not key:
        return await _ws_fail(ws, 401, MSG_MISSING_KEY)
    user = service.keys.verify(key)
    if user is None:
        return await _ws_fail(ws, 401, MSG_INVALID_KEY)
    try:
        service.rate.take(user.key_id)
    except TooManyRequests as exc:
        return await _ws_fail(ws, 429, exc.message)
    record = service.store.get_owned(job_id, user.name)
    if record is None:
        return await _ws_fail(ws, 404, f"No job {job_id!r} for this API key's user.")

    # Subscribe before reading history: events committed meanwhile arrive on the queue and
    # are de-duplicated by seq, so nothing falls between the two.
    sub = service.hub.subscribe(job_id, serves_local=ws.query_params.get(LOCAL_QUERY) == "1")
    ws.state.interlace_auth = (key, version)  # a final frame for another replica goes on with it
    receiver = asyncio.ensure_future(_until_disconnect(ws, service, user, job_id))
    try:
        events = service.store.events_after(job_id, after) or [service.current_event(record)]
        last = after
        for event in events:
            await _send(ws, event)
            last = max(last, event.seq or 0)
        if any(e.terminal for e in events):
            return await ws.close()
        position = service.pool.position(record.model_key, job_id)
        replayed = [e.queue_position for e in events if e.status == JobStatus.QUEUED.value]
        if position is not None and (not replayed or replayed[-1] != position):
            # The stored QUEUED event has the position at the time; say where it is now.
            await _send(ws, Event(job_id, JobStatus.QUEUED.value, queued_text(position), position, time.time()))
        # A STREAM event is transient (not stored): a watcher that (re)connects while the job
        # waits for a local block is told now. If the event was also published meanwhile, the
        # client sees it twice and serves the exchange once (by its number).
        stream = service.stream_event(job_id)
        if stream is not None:
            await _send(ws, stream)
        while True:
            getter = asyncio.ensure_future(sub.get())
            done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:  # the client went away
                getter.cancel()
                return
            event = getter.result()
            if event is None:  # we fell behind: catch up from the database
                sub.take_lag()
                backlog = service.store.events_after(job_id, last)
            else:
                backlog = [event]
            for item in backlog:
                if item.seq is not None and item.seq <= last:
                    continue
                await _send(ws, item)
                last = max(last, item.seq or 0)
                if item.terminal:
                    return await ws.close()
    finally:
        receiver.cancel()
        service.hub.unsubscribe(sub)


async def _send(ws: WebSocket, event: Event) -> None:
    await ws.send_text(json.dumps(event.to_json()))


async def _until_disconnect(ws: WebSocket, service: JobService, user: User, job_id: str) -> None:
    """Completes when the client closes. The only client message after the handshake is a local
    block's final message as a binary frame (`contract.http.local_frame`): the same message as
    the POST to `JOB_LOCAL`, from the job's authenticated owner, without an HTTP round trip."""
    with suppress(Exception):
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("bytes")
            if frame:
                _take_local_frame(service, user, job_id, frame, ws)


def _take_local_frame(service: JobService, user: User, job_id: str, frame: bytes, ws: WebSocket) -> None:
    """Hand a WebSocket frame's final message to the job's local block. A frame that is not one
    (or comes too late: the block timed out, the job ended) is dropped: the client learns what
    became of the block from the job's events, as after a POST answered 404/409."""
    if len(frame) > WS_LOCAL_MAX_BYTES + 64 * 1024:
        return
    try:
        number, header, body = parse_local_frame(frame)
        message = message_from_wire(header, body)
        if isinstance(message, ReadRequest):  # a read needs its answer: POST it
            return
        service.local_peer(user, job_id).post(number, message)
    except LocalElsewhere as away:  # several API replicas: POSTed to the one running the job
        forward_frame_soon(away, job_id, frame, *ws.state.interlace_auth, service.forward_timeout)
    except (ValueError, WireFormatError, ExchangeError, NotFound):
        return
