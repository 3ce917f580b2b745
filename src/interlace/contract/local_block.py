"""Local blocks: what the server and the client say to each other while one runs.

`with interlace.local():` inside a remote body runs on the user's machine. The body that
travels holds the block's `with` line and `pass` in place of its code (the code never leaves
the client); the request lists each block's `LocalBlockSpec`: the names the block reads that
the body may have bound, and the names it assigns that the body uses afterwards.

When the server's body reaches a block, one conversation runs, driven by the server:

    server                                          client
    start(line, values of `reads` that are bound) ->
                                                  <-  ReadRequest(path, kind)   (any number:
    reply(the value, encoded)                     ->   `model.x.output` in the block)
                                                  <-  BlockDone(values of `writes`)
                                                      or BlockFailed(text, category)

Every hop implements `LocalPeer`: the client's runner itself (`remote='local'`), the worker
process's channel to its parent, the server's HTTP side waiting for the client. Values travel
in the same strict codec as results (tensors bitwise, no code, no pickle), both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import UnsupportedValueError, WireFormatError
from .values.decode import ValueDecoder
from .values.encode import ValueEncoder
from .wire.decode import decode_message
from .wire.encode import encode_message

__all__ = [
    "LocalBlockSpec",
    "ReadRequest",
    "BlockDone",
    "BlockFailed",
    "ClientMessage",
    "LocalPeer",
    "UnsendableLocalValue",
    "encode_local_values",
    "decode_local_values",
    "message_to_wire",
    "message_from_wire",
    "READ_KINDS",
    "CATEGORY_RAISED",
    "CATEGORY_TIMEOUT",
    "CATEGORY_CLIENT_GONE",
    "CATEGORY_VALUE",
    "CATEGORY_NO_CLIENT",
]

_IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_]{0,200}$"

#: What a block may read of a module on the server: `model.layer.output` and the like.
READ_KINDS = ("output", "input", "inputs")

#: Job error categories of a failed local block (the job's `error_category`).
CATEGORY_RAISED = "local-block-error"  # the block raised on the client
CATEGORY_TIMEOUT = "local-block-timeout"  # the block ran past the policy's local_block_seconds
CATEGORY_CLIENT_GONE = "local-block-client-gone"  # no client came back within local_grace_seconds
CATEGORY_VALUE = "local-block-value"  # a value the codec refuses, either way
CATEGORY_NO_CLIENT = "local-block-no-client"  # the run has nobody to run the block (a bug of ours)


class LocalBlockSpec(BaseModel):
    """One `with interlace.local():` block of a shipped body, keyed by its `with` line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line: int = Field(ge=1)
    #: Names the block reads that the body may have bound: the server sends the bound ones.
    reads: tuple[str, ...] = Field(default=(), max_length=1000)
    #: Names the block assigns that the body uses after it: the client sends them back and the
    #: server binds them.
    writes: tuple[str, ...] = Field(default=(), max_length=1000)

    def model_post_init(self, context: Any) -> None:
        import re

        for name in self.reads + self.writes:
            if not re.match(_IDENTIFIER, name):
                raise ValueError(f"a local block's name must be a plain identifier not starting with `_`, got {name!r}")


@dataclass(frozen=True)
class ReadRequest:
    """The block read `<model path>.<kind>`: the server reads it in the body's place."""

    path: str
    kind: Literal["output", "input", "inputs"]


@dataclass(frozen=True)
class BlockDone:
    """The block ended; `values` is `encode_local_values` of its `writes`."""

    values: bytes


@dataclass(frozen=True)
class BlockFailed:
    """The block (or the way to it) failed; the job fails with `text` under `category`."""

    text: str
    category: str = CATEGORY_RAISED


ClientMessage = Union[ReadRequest, BlockDone, BlockFailed]


class LocalPeer(Protocol):
    """The other side of a local block, as the server's body sees it (see the module doc).

    `start` and `reply` block until the client's next message. A peer may raise
    `LocalBlockAborted`-like errors of its own layer; the caller turns anything that is not a
    `ClientMessage` into the job's failure."""

    def start(self, line: int, values: bytes) -> ClientMessage: ...

    def reply(self, value: bytes) -> ClientMessage: ...


class UnsendableLocalValue(Exception):
    """A value a local block would send (either way) that the codec refuses."""

    def __init__(self, name: str, line: int, reason: str, direction: str) -> None:
        where = f"the local block at line {line}"
        if direction == "up":
            text = (f"`{name}`, assigned in {where}, cannot be sent to the server: {reason}. Send "
                    f"tensors, numbers, strings, lists or dicts of them (`{name} = torch.as_tensor(...)`), "
                    f"or keep the object inside the block.")
        else:
            text = (f"`{name}`, read by {where}, cannot be sent from the server to the block: {reason}. "
                    f"Compute it inside the block, or turn it into tensors or numbers before the block.")
        super().__init__(text)
        self.name = name
        self.line = line


_KIND = "local-values"


def encode_local_values(values: dict[str, Any], *, line: int, direction: Literal["up", "down"],
                        max_bytes: int | None = None) -> bytes:
    """Values for one hop of a local block, in the result codec. Raises UnsendableLocalValue."""
    encoder = ValueEncoder()
    body: dict[str, Any] = {}
    for name, value in values.items():
        try:
            body[name] = encoder.encode(value, path=name)
        except UnsupportedValueError as e:
            raise UnsendableLocalValue(name, line, str(e).splitlines()[0], direction) from None
    data = encode_message(_KIND, {"values": body}, encoder.tensors)
    if max_bytes is not None and len(data) > max_bytes:
        raise UnsendableLocalValue(", ".join(values), line, f"together they are {len(data) / 1e6:.1f} MB, over the "
                                   f"server's {max_bytes / 1e6:.1f} MB limit", direction)
    return data


def decode_local_values(data: bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The values of one hop; WireFormatError for anything but plain values."""
    message = decode_message(data, expected_kind=_KIND, max_bytes=max_bytes)
    values = message.body.get("values")
    if not isinstance(values, dict):
        raise WireFormatError("A local block's values must be an object.")
    decoder = ValueDecoder(message.tensors)
    return {str(name): decoder.decode(node, path=str(name)) for name, node in values.items()}


def message_to_wire(message: ClientMessage) -> tuple[dict[str, Any], bytes]:
    """A client message as a JSON header and raw bytes (the worker channel, HTTP)."""
    if isinstance(message, ReadRequest):
        return {"op": "read", "path": message.path, "kind": message.kind}, b""
    if isinstance(message, BlockDone):
        return {"op": "done"}, message.values
    return {"op": "failed", "text": message.text, "category": message.category}, b""


def message_from_wire(header: Any, body: bytes) -> ClientMessage:
    """The inverse of `message_to_wire`, checking every field (the sender is not trusted)."""
    if not isinstance(header, dict):
        raise WireFormatError("a local block message must be a JSON object")
    op = header.get("op")
    if op == "read":
        path, kind = header.get("path"), header.get("kind")
        if not isinstance(path, str) or len(path) > 1000 or kind not in READ_KINDS:
            raise WireFormatError(f"a local block's read needs a module path and one of {READ_KINDS}")
        return ReadRequest(path, kind)
    if op == "done":
        return BlockDone(bytes(body))
    if op == "failed":
        text, category = header.get("text"), header.get("category", CATEGORY_RAISED)
        if not isinstance(text, str) or not isinstance(category, str) or not category.startswith("local-block"):
            raise WireFormatError("a failed local block needs a text and a local-block category")
        return BlockFailed(text[:100_000], category)
    raise WireFormatError(f"unknown local block message {op!r}; expected read, done or failed")
