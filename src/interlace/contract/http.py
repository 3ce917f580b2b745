"""The HTTP protocol that the client (`backends/client.py`) and the server (`server/app.py`)
speak: header names, URL paths, query names and job states. Both sides import them from here,
so neither can drift from the other. The full protocol, with examples: docs/http-api.md.

Authentication. Every job endpoint, every status stream, `/v1/status` and
`/v1/models/{key}/meta` need an API key in the `KEY_HEADER` (`X-Interlace-Key`). `/v1/info`,
`/v1/policy`, `/openapi.json`, `/docs` and the status page (`STATUS_PAGE`: it asks for a key
and sends it) need none. A browser, which cannot set headers on a WebSocket, sends the key as
the stream's first message instead: `{"key": "...", "version": "..."}` (`WS_AUTH_FIELDS`).

Versions. Clients send `VERSION_HEADER` (`X-Interlace-Version`) with their version; a server
accepts the same major version as its own and answers 426 otherwise (the rule itself is the
server's: `server/versions.py`). A request without the header is accepted (curl). The
WebSocket takes the version from the header, from `?version=` (`VERSION_QUERY`) or from the
first message.

Errors. Every error answer is JSON `{"detail": ..., "problems": [...]}` (`problems` only for
422). The WebSocket refuses with one message `{"error": text, "code": status}` and then closes
with code `WS_CLOSE_BASE + status` (4401, 4404, 4426).

Job states. `RECEIVED` (stored and validated) -> `QUEUED` -> `RUNNING` -> `COMPLETED` or
`ERROR`; a queued job can become `CANCELLED`; a finished one becomes `EXPIRED` once its result
is deleted. `LOG` is not a state but an event carrying one printed line; `STREAM` is not one
either: a transient event saying the job waits for the client's local block.

Events. The stream (WS `JOB_EVENTS`) and the poll (GET `JOB_EVENTS`, `?after=N`) send the same
event objects, `{"id", "seq", "status", "description", "queue_position", "time"}` (+
`"error_category"` for ERROR). `seq` grows per job; a client that reconnects passes the last
`seq` it saw as `after` (`AFTER_QUERY`) and misses nothing. `"seq": null` marks a transient
update that is not stored: a queue position, or a `STREAM` event.

Local blocks (`with interlace.local():`, `contract/local_block.py`). When a running job reaches
one, the server sends a transient `STREAM` event with `"exchange": n` (the job's n-th block,
from 1) and `"line"`, and the job's status JSON shows `"local_block": {"exchange": n, "line":
...}` while it waits (null otherwise), so a polling client sees it too. The client then GETs
`JOB_LOCAL` (the values, octet-stream) and POSTs its messages there, one at a time, naming the
kind in `LOCAL_HEADER` (`LOCAL_OPS`): `read` (JSON `{"path", "kind"}`; the answer, 200, is the
value), `done` (the body is the block's values; 204) or `failed` (JSON `{"text", "category"}`;
204). A client that can run the blocks follows the job with `?local=1` (`LOCAL_QUERY`): while
none does (and nobody calls `JOB_LOCAL`), a waiting job gives up after the policy's
`local_grace_seconds`. On that WebSocket the client may also send a block's final message
(done or failed, up to `WS_LOCAL_MAX_BYTES`) as one binary frame (`local_frame`) instead of the
POST: the same message, one HTTP round trip less per block.
"""

from __future__ import annotations

import enum
import json
from typing import Final
from urllib.parse import quote

__all__ = [
    "KEY_HEADER",
    "VERSION_HEADER",
    "CALLBACK_HEADER",
    "VERSION_QUERY",
    "AFTER_QUERY",
    "LOCAL_QUERY",
    "WS_AUTH_FIELDS",
    "WS_CLOSE_BASE",
    "INFO",
    "POLICY",
    "MODEL_META",
    "JOBS",
    "JOB",
    "JOB_EVENTS",
    "JOB_RESULT",
    "JOB_LOCAL",
    "STATUS",
    "STATUS_PAGE",
    "LOCAL_HEADER",
    "LOCAL_OPS",
    "WS_LOCAL_MAX_BYTES",
    "local_frame",
    "parse_local_frame",
    "path",
    "JobStatus",
    "TERMINAL",
    "PENDING",
]

# -- headers and query names ------------------------------------------------------------------

#: The API key (`il_<id>_<secret>`, made with `interlace keys create`).
KEY_HEADER: Final = "X-Interlace-Key"
#: The client's Interlace version, checked against the server's (426 when incompatible).
VERSION_HEADER: Final = "X-Interlace-Version"
#: Optional on submit: an http(s) URL the server POSTs the final status JSON to.
CALLBACK_HEADER: Final = "X-Interlace-Callback"
#: The WebSocket's alternative to `VERSION_HEADER`, for clients that cannot set headers.
VERSION_QUERY: Final = "version"
#: Events after this `seq` (GET and WS `JOB_EVENTS`).
AFTER_QUERY: Final = "after"
#: `?local=1` on JOB_EVENTS (WS or GET) and JOB: this client runs the job's local blocks, so its
#: watching keeps a job that waits for one from giving up on it (`local_grace_seconds`).
LOCAL_QUERY: Final = "local"
#: The fields of the WebSocket's first message when the handshake carried no key.
WS_AUTH_FIELDS: Final = ("key", "version")
#: A refused WebSocket closes with this plus the HTTP status (4401, 4404, 4426).
WS_CLOSE_BASE: Final = 4000
#: On POST `JOB_LOCAL`: which message of a local block the body is (one of `LOCAL_OPS`).
LOCAL_HEADER: Final = "X-Interlace-Local"
#: The client's messages during a local block (`contract.local_block.message_to_wire`'s ops).
LOCAL_OPS: Final = ("read", "done", "failed")
#: The largest final message a client sends over the job's WebSocket; larger ones are POSTed
#: (the server's WebSocket frames are limited; HTTP bodies stream).
WS_LOCAL_MAX_BYTES: Final = 1024 * 1024


def local_frame(exchange: int, header: dict, body: bytes) -> bytes:
    """A local block's final message as one binary WebSocket frame: 4 bytes (big-endian) of
    JSON length, the JSON header (`message_to_wire`'s, plus `"exchange"`), then the body."""
    head = json.dumps({**header, "exchange": exchange}).encode()
    return len(head).to_bytes(4, "big") + head + body


def parse_local_frame(frame: bytes) -> tuple[int, dict, bytes]:
    """The inverse of `local_frame`: (exchange, header without it, body). ValueError for a
    frame that does not follow the format (the sender is not trusted)."""
    if len(frame) < 4:
        raise ValueError("a local-block frame starts with 4 bytes of header length")
    size = int.from_bytes(frame[:4], "big")
    if size > 64 * 1024 or 4 + size > len(frame):
        raise ValueError("a local-block frame's header length is out of range")
    header = json.loads(frame[4:4 + size])
    if not isinstance(header, dict):
        raise ValueError("a local-block frame's header must be a JSON object")
    exchange = header.pop("exchange", None)
    if type(exchange) is not int or not 0 < exchange < 2**31:
        raise ValueError("a local-block frame's header needs its `exchange` number")
    return exchange, header, bytes(frame[4 + size:])

# -- paths (templates; fill them with `path`) -------------------------------------------------

#: GET: server version, supported client versions, hosted models (no key).
INFO: Final = "/v1/info"
#: GET: the execution policy that payloads are validated against (no key).
POLICY: Final = "/v1/policy"
#: GET: a hosted model's config and tokenizer files, to build it without weights.
MODEL_META: Final = "/v1/models/{model_key}/meta"
#: POST: submit a payload (202 with the id). GET: your jobs, newest first.
JOBS: Final = "/v1/jobs"
#: GET: a job's status. DELETE: cancel a queued job.
JOB: Final = "/v1/jobs/{job_id}"
#: GET: the stored events after `?after=N` (polling). WS: the live status stream.
JOB_EVENTS: Final = "/v1/jobs/{job_id}/events"
#: GET: the result bytes of a COMPLETED job.
JOB_RESULT: Final = "/v1/jobs/{job_id}/result"
#: GET: the values sent down to the job's local block number `exchange`. POST: the client's
#: next message for it (`LOCAL_HEADER`).
JOB_LOCAL: Final = "/v1/jobs/{job_id}/local/{exchange}"
#: GET: the server's state for the key: hosted models, queues, the key's recent jobs with their
#: timelines, versions, policy and limits (JSON; what the status page shows).
STATUS: Final = "/v1/status"
#: GET: the status page (HTML, no key: it asks for one and reads `STATUS` with it).
STATUS_PAGE: Final = "/status"


def path(template: str, **params: str) -> str:
    """`template` with each `{name}` filled by its value, percent-encoded (a `/` in a model
    key becomes `%2F`): `path(JOB, job_id=job.id)`."""
    return template.format(**{name: quote(value, safe="") for name, value in params.items()})


# -- job states --------------------------------------------------------------------------------


class JobStatus(str, enum.Enum):
    """A job's state, and the `status` of each event. A `str`, so `"QUEUED" in PENDING` and
    comparisons with the strings on the wire work."""

    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    LOG = "LOG"  # an event, never a stored job state
    STREAM = "STREAM"  # a transient event: the job waits for the client's local block
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


#: A job in one of these states will not change again except by expiry; a stream ends with one.
TERMINAL: Final = frozenset({JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELLED, JobStatus.EXPIRED})
#: States the server still owes work for; requeued after a restart.
PENDING: Final = frozenset({JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING})
