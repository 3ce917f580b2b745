"""The server's side of `with interlace.local():` blocks: one conversation per block reached.

A shipped body holds each local block as a call `__interlace_local__(<line>)` (the block's code
stayed on the client; see `contract/local_block.py` for the conversation). `run.py` binds that
name, for every job, to a `LocalBlocks` over the job's request, its model, its policy and its
`LocalPeer` (the client's runner in-process, the worker's channel to its parent, the server's
HTTP side). When the body reaches a block, `LocalBlocks(line)`:

1. sends the values of the block's `reads` that the body has bound and that are data (never
   envoys, tracers, modules, functions, classes or the model: the client has its own);
2. answers each `ReadRequest(path, kind)` with `getattr(<module envoy>, kind)`, read right
   here, on the body's greenlet, so the engine waits for the module's call as it does for
   the body's own reads; the answer is `encode_local_values({READ_VALUE: value})`;
3. on `BlockDone`, binds exactly the block's `writes` that came back, in the namespace the
   block's `with` line runs in; on `BlockFailed` (or anything that goes wrong on the way)
   raises `LocalBlockAborted`, which ends the job under the message's category.

The job's wall clock (`JobGuards.paused`) stops while the client has the block: the time a
block may take is the policy's `local_block_seconds`, enforced by the peer that waits for
the client.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
from typing import Any

import torch

from ..contract.code.decode import resolve_model_path
from ..contract.errors import WireFormatError
from ..contract.guard import BodyAPI, JobGuards, ModuleProxy
from ..contract.local_block import (
    CATEGORY_CLIENT_GONE,
    CATEGORY_NO_CLIENT,
    CATEGORY_RAISED,
    CATEGORY_VALUE,
    BlockDone,
    BlockFailed,
    ClientMessage,
    LocalBlockSpec,
    LocalPeer,
    ReadRequest,
    UnsendableLocalValue,
    decode_local_values,
    encode_local_values,
)
from ..contract.policy import Policy
from ..contract.request import TraceRequest
from ..tracing import Barrier, Envoy, Invoker, SourceEnvoy, Tracer
from ..tracing.local_block import LOCAL_HELPER  # capture compiles `with X.local():` to a call of it

__all__ = [
    "LOCAL_HELPER", "LocalBlocks", "LocalBlockAborted", "READ_VALUE", "MSG_NO_CLIENT", "MSG_UNKNOWN_LINE",
    "MSG_NOT_A_WRITE", "MSG_BAD_VALUES", "MSG_BAD_READ", "MSG_PEER_BROKE", "ask_peer", "checked_message", "peer_failure",
]

#: The one key of a read's answer: `encode_local_values({READ_VALUE: value})`.
READ_VALUE = "value"

MSG_NO_CLIENT = (
    "the local block at line {line} has no client to run on: this run was started without a "
    "way to reach the caller (a bug of the runner, not of your code). Run the trace with "
    "`remote=True` or `remote='local'` from the interlace client, or move the block's code out "
    "of `with interlace.local():`."
)
MSG_UNKNOWN_LINE = (
    "the body reached a local block at line {line}, but the request lists local blocks only at "
    "lines {known}: the request was not built by this version of the interlace client. Send "
    "the trace with the same interlace version as the server (`pip install -U interlace`)."
)
MSG_NOT_A_WRITE = (
    "the local block at line {line} sent back {names}, which the block does not assign for the "
    "code after it (it sends back {writes}). The client that ran it is broken or of another "
    "version; use the same interlace version as the server."
)
MSG_BAD_VALUES = (
    "the values the local block at line {line} sent back cannot be read: {reason}. A block "
    "sends back tensors, numbers, strings and lists or dicts of them; keep other objects "
    "inside the block (`x = torch.as_tensor(...)` before the block ends)."
)
MSG_BAD_READ = (
    "the local block at line {line} read `{path}.{kind}`, which the server cannot give: {reason}. "
    "Read a module of the model the trace runs on (`model.layer.output`) inside the block."
)
MSG_PEER_BROKE = (
    "the local block at line {line} could not reach the client: {reason}. The job was stopped; "
    "run it again (the client must stay connected while its local blocks run)."
)


class LocalBlockAborted(BaseException):
    """A local block ended the job: `text` (for the user) under `category`.

    A BaseException, as the guards' `JobLimitExceeded` is: the body's own `except Exception:`
    must not swallow it, since the block's effects (its `writes`) never arrived and the client
    already holds the failure it will report."""

    def __init__(self, text: str, category: str) -> None:
        super().__init__(text)
        self.text = text
        self.category = category


#: What a block reads but never travels: the client has its own (its model, its tracer, its
#: modules and functions), and none of them is data the codec would carry.
_STAYS_ON_SERVER: tuple[type, ...] = (
    Envoy, SourceEnvoy, Tracer, Invoker, Barrier, torch.nn.Module, types.ModuleType, ModuleProxy, BodyAPI, type,
    types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.BuiltinMethodType,
)


class LocalBlocks:
    """`ns[LOCAL_HELPER]` of one job: runs each local block it is called for (module doc)."""

    __slots__ = ("_specs", "_model", "_policy", "_peer", "_guards")

    def __init__(self, request: TraceRequest, model: Any, policy: Policy, peer: LocalPeer | None,
                 guards: JobGuards | None = None) -> None:
        self._specs: dict[int, LocalBlockSpec] = {spec.line: spec for spec in request.local_blocks}
        self._model = model
        self._policy = policy
        self._peer = peer
        self._guards = guards

    def __call__(self, line: int) -> None:
        # The namespace the `with` line runs in (the body's, or an inner trace's body in a
        # session): a body runs as module-level code, so its globals are its variables.
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_globals.get(LOCAL_HELPER) is not self:
            frame = frame.f_back
        ns = frame.f_globals
        spec = self._specs.get(line)
        if spec is None:
            known = ", ".join(str(n) for n in sorted(self._specs)) or "none"
            raise _abort(MSG_UNKNOWN_LINE.format(line=line, known=known), "invalid-request")
        if self._peer is None:
            raise _abort(MSG_NO_CLIENT.format(line=line), CATEGORY_NO_CLIENT)
        down = self._encode({name: ns[name] for name in spec.reads if name in ns and _is_data(ns[name])}, line)
        message = self._ask(line, "start", down)
        while isinstance(message, ReadRequest):
            value = self._read(line, message)
            message = self._ask(line, "reply", self._encode({READ_VALUE: value}, line, f"{message.path}.{message.kind}"))
        if isinstance(message, BlockFailed):
            raise _aborted(line, message)
        ns.update(self._written(spec, message.values))

    # -- the hops ------------------------------------------------------------------------

    def _ask(self, line: int, op: str, data: bytes) -> ClientMessage:
        """`peer.start` / `peer.reply`, with the job's wall clock stopped while the client has it."""
        peer = self._peer
        assert peer is not None
        waiting = self._guards.paused() if self._guards is not None else contextlib.nullcontext()
        try:
            with waiting:
                message = peer.start(line, data) if op == "start" else peer.reply(data)
        except Exception as error:  # noqa: BLE001 - a transport's failure ends the job, named
            return peer_failure(line, error)
        return checked_message(line, message)

    def _encode(self, values: dict[str, Any], line: int, read: str | None = None) -> bytes:
        """Values down; `read` names a module read's value (`model.layer.output`) in a refusal."""
        try:
            return encode_local_values(values, line=line, direction="down", max_bytes=self._policy.max_result_bytes)
        except UnsendableLocalValue as error:
            text = str(error) if read is None else str(error).replace(f"`{READ_VALUE}`", f"`{read}`", 1)
            raise LocalBlockAborted(f"UnsendableLocalValue: {text}", CATEGORY_VALUE) from None

    def _read(self, line: int, request: ReadRequest) -> Any:
        """The module value the block asked for, read on the body's greenlet (the engine waits
        for the module's call here, as for a read in the body itself)."""
        try:
            envoy = resolve_model_path(self._model, request.path)
        except WireFormatError as error:
            raise _abort(MSG_BAD_READ.format(line=line, path=request.path, kind=request.kind, reason=str(error)),
                         "invalid-request") from None
        return getattr(envoy, request.kind)

    def _written(self, spec: LocalBlockSpec, data: bytes) -> dict[str, Any]:
        try:
            values = decode_local_values(data, max_bytes=self._policy.max_upload_bytes)
        except WireFormatError as error:
            raise _abort(MSG_BAD_VALUES.format(line=spec.line, reason=str(error)), CATEGORY_VALUE) from None
        extra = sorted(set(values) - set(spec.writes))
        if extra:
            raise _abort(MSG_NOT_A_WRITE.format(
                line=spec.line, names=", ".join(f"`{n}`" for n in extra),
                writes=", ".join(f"`{n}`" for n in spec.writes) or "nothing"), CATEGORY_VALUE)
        return values


_NAMED = re.compile(r"[A-Z][A-Za-z0-9_.]*: ")


def _is_data(value: Any) -> bool:
    return not isinstance(value, _STAYS_ON_SERVER)


def _aborted(line: int, failed: BlockFailed) -> LocalBlockAborted:
    if failed.category == CATEGORY_RAISED:  # the user's own error: their traceback follows
        return LocalBlockAborted(f"LocalBlockError: the local block at line {line} raised on the client:\n"
                                 f"{failed.text}", failed.category)
    return _abort(failed.text, failed.category)


def _abort(text: str, category: str) -> LocalBlockAborted:
    """The job's end, its message named once, as an exception's last line is ("LocalBlockError: ...",
    or the name a transport or the client's runner already gave it)."""
    return LocalBlockAborted(text if _NAMED.match(text) else f"LocalBlockError: {text}", category)


def peer_failure(line: int, error: Exception) -> BlockFailed:
    """What a peer that raised instead of answering means: the job fails under the error's own
    local-block category if it has one (a transport's timeout), else `CATEGORY_CLIENT_GONE`."""
    category = getattr(error, "category", None)
    if not (isinstance(category, str) and category.startswith("local-block")):
        category = CATEGORY_CLIENT_GONE
    return BlockFailed(MSG_PEER_BROKE.format(line=line, reason=f"{type(error).__name__}: {error}"), category)


def checked_message(line: int, message: Any) -> ClientMessage:
    """`message` if it is a client message, else the failure a broken peer is."""
    if isinstance(message, (ReadRequest, BlockDone, BlockFailed)):
        return message
    return BlockFailed(MSG_PEER_BROKE.format(line=line, reason=f"its peer answered {type(message).__name__}"),
                       CATEGORY_CLIENT_GONE)


def ask_peer(peer: LocalPeer | None, start: bool, line: int, body: bytes) -> ClientMessage:
    """One hop of a relayed local block (a worker's parent, a Ray replica's API process): the
    client's answer through `peer` (`start(line, values)` or `reply(value)`), never raising:
    no peer, a peer that raised or one that answered nonsense is the block's `BlockFailed`."""
    if peer is None:
        return BlockFailed(MSG_NO_CLIENT.format(line=line), CATEGORY_NO_CLIENT)
    try:
        message = peer.start(line, body) if start else peer.reply(body)
    except Exception as error:  # noqa: BLE001 - the job fails with it; the relay goes on
        return peer_failure(line, error)
    return checked_message(line, message)
