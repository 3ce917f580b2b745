"""Local blocks across the worker process's channel: `ChannelPeer` in the worker, `LocalRelay`
in its parent.

In a worker process (`worker.py`) the body's `LocalBlocks` (`local_exchange.py`) talks to a
`ChannelPeer`, which asks the parent over the job's channel and waits for its answer; the
parent (`process.WorkerProcess.run`) hands each such message to its `LocalRelay`, which asks
the parent's own peer (the server's HTTP side, or the client's runner under `remote='local',
isolate=True`) and gives back what to answer:

    worker                                        parent
    {"op": "local-start", "line"} + values    ->  peer.start(line, values)
                                              <-  {"op": "local-msg", "msg": {"op": "read", ...}}
    {"op": "local-reply"} + value             ->  peer.reply(value)
                                              <-  {"op": "local-msg", "msg": {"op": "done"}} + values
                                                  (or {"op": "failed", "text", "category"})

`msg` is `contract.local_block.message_to_wire`'s header and the bytes are its body; the worker
checks it with `message_from_wire`. The parent never decodes the values: they are bytes it
passes between the worker and the client, each of which checks them.
"""

from __future__ import annotations

from typing import Any

from ..contract.errors import WireFormatError
from ..contract.local_block import (
    ClientMessage,
    LocalPeer,
    ReadRequest,
    message_from_wire,
    message_to_wire,
)
from .channel import Channel
from .local_exchange import ask_peer

__all__ = ["OP_LOCAL_MSG", "OP_LOCAL_REPLY", "OP_LOCAL_START", "ChannelPeer", "LocalRelay", "MalformedLocalMessage"]

OP_LOCAL_START = "local-start"
OP_LOCAL_REPLY = "local-reply"
OP_LOCAL_MSG = "local-msg"


class ChannelPeer:
    """The worker's `LocalPeer`: each hop is one message to the parent and its answer."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def start(self, line: int, values: bytes) -> ClientMessage:
        self._channel.send({"op": OP_LOCAL_START, "line": int(line)}, values)
        return self._answer()

    def reply(self, value: bytes) -> ClientMessage:
        self._channel.send({"op": OP_LOCAL_REPLY}, value)
        return self._answer()

    def _answer(self) -> ClientMessage:
        header, body = self._channel.recv()
        if header.get("op") != OP_LOCAL_MSG:
            raise WireFormatError(f"the parent answered a local block with {header.get('op')!r}, not {OP_LOCAL_MSG!r}")
        return message_from_wire(header.get("msg"), body)


class MalformedLocalMessage(ValueError):
    """The worker broke the local-block conversation (the parent stops it, as for any
    malformed message)."""


class LocalRelay:
    """The parent's side of one job's local blocks: answers the worker's `local-start` and
    `local-reply` messages through `peer` (None: the run has no client, every block fails)."""

    def __init__(self, peer: LocalPeer | None) -> None:
        self._peer = peer
        self._open: int | None = None  # the line of the block waiting for a `local-reply`

    def answer(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        """The answer to send back, as (header, body). Raises MalformedLocalMessage."""
        op = header.get("op")
        if op == OP_LOCAL_START:
            line = header.get("line")
            if type(line) is not int or line < 1 or self._open is not None:
                raise MalformedLocalMessage(f"a local-start with line {line!r} (a block at line {self._open} is open)")
        elif op == OP_LOCAL_REPLY:
            line = self._open
            if line is None:
                raise MalformedLocalMessage("a local-reply with no local block open")
        else:
            raise MalformedLocalMessage(f"not a local block message: {op!r}")
        message = ask_peer(self._peer, op == OP_LOCAL_START, line, body)
        self._open = line if isinstance(message, ReadRequest) else None
        wire, data = message_to_wire(message)
        return {"op": OP_LOCAL_MSG, "msg": wire}, data

