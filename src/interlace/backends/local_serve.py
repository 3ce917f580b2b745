"""One local block, served from the client over HTTP (`GET/POST /v1/jobs/{id}/local/{n}`).

The follow loop (`follow.py`) decides when: a STREAM event (or a polled `local_block`) names a
block the job waits for. `serve_local` then carries out the conversation of
`contract/local_block.py` with the trace's runner (`local_runner.py`): the values down, the
runner's reads (each answered with the value the server read), and its last message up. The
protocol: docs/http-api.md, "Local blocks".
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable

import httpx

from ..contract.http import LOCAL_HEADER
from ..contract.local_block import CATEGORY_RAISED, BlockFailed, LocalPeer, ReadRequest, message_to_wire
from ..errors import RemoteRequestError

__all__ = ["serve_local", "Request", "SendFinal"]

#: `RemoteClient._request`: (method, url, **httpx options) -> the answer; raises
#: RemoteRequestError for a 4xx/5xx and ServerUnreachableError (a ConnectionError) for no answer.
Request = Callable[..., httpx.Response]


#: Sends a block's final message (`message_to_wire`'s header and body) another way, the job's
#: WebSocket; False when it cannot (no socket open, a message too large), and it is POSTed.
SendFinal = Callable[[dict, bytes], bool]


def serve_local(request: Request, url: str, line: int, runner: LocalPeer, values: bytes | None = None,
                send_final: SendFinal | None = None) -> None:
    """Run the local block at `line` whose endpoint is `url` with `runner`: GET the values sent
    down (unless the STREAM event carried them: `values`), then POST each message the runner
    gives (a read's answer is the value it asked for) until its last one (done or failed),
    which goes through `send_final` when it takes it.
    Blocking; RemoteRequestError 404/409 when the server no longer waits for this block (it
    timed out, the job ended)."""
    if values is None:
        values = request("GET", url).content
    try:
        message = runner.start(line, values)
        while isinstance(message, ReadRequest):
            answer = request("POST", url, headers={LOCAL_HEADER: "read", "Content-Type": "application/json"},
                             content=json.dumps({"path": message.path, "kind": message.kind}))
            message = runner.reply(answer.content)
    except (RemoteRequestError, ConnectionError):
        raise
    except Exception as exc:
        # The runner itself broke (it answers a block's own errors with BlockFailed): let the
        # job fail now rather than wait for the server's limit, then raise it here.
        with contextlib.suppress(Exception):
            text = f"the client's local-block runner failed: {type(exc).__name__}: {exc}"
            _post_final(request, url, *message_to_wire(BlockFailed(text, CATEGORY_RAISED)))
        raise
    header, body = message_to_wire(message)
    if send_final is not None and send_final(header, body):
        return
    _post_final(request, url, header, body)


def _post_final(request: Request, url: str, header: dict, body: bytes) -> None:
    op = header.pop("op")
    options: dict[str, Any]
    if op == "done":
        options = {"headers": {LOCAL_HEADER: op, "Content-Type": "application/octet-stream"}, "content": body}
    else:
        options = {"headers": {LOCAL_HEADER: op, "Content-Type": "application/json"}, "content": json.dumps(header)}
    request("POST", url, **options)
