"""The client's side of `with interlace.local():` blocks: `LocalBlockRunner`, a `LocalPeer`.

A remote body's local blocks never leave the client: the engine's capture keeps each block's
code, compiled from the user's own file and lines (`tracing/local_block.py`,
`LocalBlockCode`). When the server's body reaches a block it asks this runner (through
whatever transport lies between, see `contract/local_block.py`) to run it:

    runner.start(line, values sent down)  -> ReadRequest | BlockDone | BlockFailed
    runner.reply(the read's value)        -> ReadRequest | BlockDone | BlockFailed

The block runs on a greenlet of its own, so that a read inside it (`model.layer.output`) can
stop the block halfway, hand a `ReadRequest(path, kind)` back to whoever called `start` or
`reply`, and go on when the value comes. That greenlet has no engine mediator: an envoy read
there reaches `Envoy._scanned`, which asks the greenlet's reader (`tracing.envoy.LOCAL_READER`)
for the module's path and kind. So the block never sees the server's mediator, even under
`remote='local'`, where the server's body greenlet itself calls `start` (same thread, same
model object), and values cross only as bytes in the wire's codec, as they do remotely.

The names a block sees, in the order that wins: the values the server sent down (the block's
`reads` the body had bound), what earlier blocks of this run assigned (one namespace for the
whole run: the seed's live chat reassigns `state` at every generation step), the caller's
variables (`CapturedTrace.lookup`; the `with ... as tracer` name is the client's tracer),
then builtins. `print` prints here: the block runs on the client.

The backends hand a runner to the transport (`runner_for(trace, policy)`; None when the body
has no local block) and, when the job ends failed under a `local-block*` category, raise
`runner.failure`: the block's own exception (with the user's traceback) or a
`LocalBlockError` saying what could not be sent.
"""

from __future__ import annotations

import builtins
import time
import traceback
import types
from typing import Any, Callable, Iterable, Protocol

import torch
from greenlet import GreenletExit, getcurrent, greenlet

from ..contract.errors import RemoteProtocolError
from ..contract.local_block import (
    CATEGORY_NO_CLIENT,
    CATEGORY_RAISED,
    CATEGORY_TIMEOUT,
    CATEGORY_VALUE,
    BlockDone,
    BlockFailed,
    ClientMessage,
    ReadRequest,
    UnsendableLocalValue,
    decode_local_values,
    encode_local_values,
)
from ..contract.policy import Policy
from ..errors import TracingError
from ..tracing.backend import CapturedTrace
from ..tracing.envoy import LOCAL_READER, MSG_OPERATION_IN_LOCAL_BLOCK, Envoy, OperationEnvoy
from ..tracing.frames import clean_traceback
from ..tracing.mediator import INPUT
from ..tracing.namespace import MISSING

__all__ = [
    "LocalBlockRunner", "LocalBlockError", "LocalBlockLike", "runner_for",
    "MSG_SET_IN_BLOCK", "MSG_SKIP_IN_BLOCK", "MSG_NOT_IN_BLOCK", "MSG_OTHER_MODEL", "MSG_UNKNOWN_LINE",
    "MSG_BAD_DOWN", "MSG_BAD_READ", "MSG_NO_READ", "MSG_BLOCK_TIMEOUT",
]

MSG_SET_IN_BLOCK = (
    "`{path}.{what}` cannot be set inside a local block: the block runs on your machine and the "
    "model on the server. Assign the new value to a name in the block, and write it to the module "
    "after the block:\n\n"
    "    with interlace.local():\n        new = my_fn({path}.{what})\n    {path}.{what} = new"
)
MSG_SKIP_IN_BLOCK = (
    "`{path}.skip(...)` cannot be used inside a local block: the block runs on your machine and "
    "the model on the server. Compute the value in the block and skip the module after it:\n\n"
    "    with interlace.local():\n        value = my_fn(...)\n    {path}.skip(value)"
)
MSG_NOT_IN_BLOCK = (
    "`{path}.{what}` cannot be used inside a local block, which runs on your machine: a block "
    "reads modules (`.output`, `.input`, `.inputs`) of the model on the server and nothing else "
    "of the run. Use `{path}.{what}` in the body, outside `with interlace.local():`."
)
MSG_OTHER_MODEL = (
    "`{path}.{what}` is a module of another model than the one this trace runs on the server; a "
    "local block can read only the traced model's modules. Read it in a trace of its own model, "
    "or read the traced model's module (`model.layer.output`)."
)
MSG_UNKNOWN_LINE = (
    "the server asked to run a local block at line {line}, but this trace has local blocks only "
    "at lines {known}: the server runs another version of the request. Use the same interlace "
    "version on client and server (`interlace env` shows both)."
)
MSG_BAD_DOWN = (
    "the values the server sent to the local block at line {line} cannot be read: {reason}. Use "
    "the same interlace version on client and server (`interlace env` shows both)."
)
MSG_BAD_READ = (
    "the value the server sent for `{path}.{kind}`, read by the local block at line {line}, cannot "
    "be read: {reason}. Use the same interlace version on client and server (`interlace env` "
    "shows both)."
)
MSG_BLOCK_TIMEOUT = (
    "The local block at line {line} ran on your machine for {took:.1f} s, more than the limit of {limit:g} s "
    "per local block (the policy's `local_block_seconds`; on a server, `interlace serve "
    "--local-block-timeout SECONDS`), so the job was stopped. Make the block faster, or do the slow "
    "part after the trace, on the saved values."
)
MSG_NO_READ = (
    "the server answered a read, but no local block of this trace is waiting for one (the server "
    "or the connection lost its place in the conversation). Run the trace again."
)


class LocalBlockError(TracingError):
    """A local block could not run, or could not send its values (the message says why and
    shows the fix). Raised by the client when the job ended on the block's failure."""


class LocalBlockLike(Protocol):
    """What the runner needs of one block (`tracing.local_block.LocalBlockCode` is one)."""

    @property
    def line(self) -> int: ...  # the `with` line, the block's key in the conversation

    @property
    def filename(self) -> str: ...

    @property
    def code(self) -> types.CodeType: ...  # the block's statements, as module-level code

    @property
    def writes(self) -> tuple[str, ...]: ...  # the names the server uses after the block


class _Descend:
    def __call__(self, depth: int, then: Callable[[], Any]) -> Any:
        return then() if depth <= 0 else self(depth - 1, then)


# Design note: the block's greenlet starts at its caller's depth, and a C-level stack walk
# that starts in it (torch captures one with every C++ error) goes up through the greenlet's
# base into memory that holds another greenlet's frames: it can crash the process. As the
# engine's body workers do (`tracing/mediator.py`, `_FLOOR_DEPTH`), the block first descends
# this many `tp_call` levels (~6 C frames each; torch walks at most 65) before it runs.
_FLOOR_DEPTH = 12


class _BlockGreenlet(greenlet):
    """The greenlet a block runs on: no engine mediator (`getcurrent().mediator` is None), a
    reader under `LOCAL_READER` (set per block)."""

    mediator = None


class _ReadFailed(LocalBlockError):
    """A read's answer that cannot be decoded (raised inside the block, reported as a value
    error rather than as the block's own exception)."""


def _as_code(path: str) -> str:
    """A module path as the user writes it (`model.layers.0` -> `model.layers[0]`)."""
    return "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in path.split(".")).lstrip(".")


class _ModuleAccess:
    """One module access inside a block (`model.layer.output`): what the envoy takes for its
    mediator (see `tracing.envoy.LOCAL_READER`), asking the server through the runner."""

    __slots__ = ("runner", "path", "what")

    def __init__(self, runner: "LocalBlockRunner", path: str, what: str) -> None:
        self.runner, self.path, self.what = runner, path, what

    def request(self, kind: int, idx: int = 0, it: int | None = None) -> Any:
        if kind != INPUT:
            return self.runner._read(self.path, "output")
        if self.what == "inputs":  # `(args, kwargs)`, whole
            value = self.runner._read(self.path, "inputs")
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], dict)):
                raise _ReadFailed(MSG_BAD_READ.format(path=self.path, kind="inputs", line=self.runner._line,
                                                      reason="it is not an (args, kwargs) pair"))
            return tuple(value[0]), dict(value[1])
        # `.input`: only the first argument travels (the others may be a KV cache, ...); the
        # envoy takes `args[0]` of what it gets.
        return (self.runner._read(self.path, "input"),), {}

    def swap(self, *args: Any, **kwargs: Any) -> None:
        raise TracingError(MSG_SET_IN_BLOCK.format(path=_as_code(self.path), what=self.what))

    def skip(self, *args: Any, **kwargs: Any) -> None:
        raise TracingError(MSG_SKIP_IN_BLOCK.format(path=_as_code(self.path)))

    def __getattr__(self, name: str) -> Any:  # `step` for `.next()`, ...: not in a block
        if name.startswith("__"):
            raise AttributeError(name)
        raise TracingError(MSG_NOT_IN_BLOCK.format(path=_as_code(self.path), what=self.what))


class _Reader:
    """`getattr(block greenlet, LOCAL_READER)`: gives envoys their `_ModuleAccess`."""

    __slots__ = ("runner", "roots")

    def __init__(self, runner: "LocalBlockRunner", roots: frozenset[int]) -> None:
        self.runner, self.roots = runner, roots

    def stand_in(self, envoy: Envoy, what: str) -> _ModuleAccess:
        path = envoy._path
        if isinstance(envoy, OperationEnvoy):
            raise TracingError(MSG_OPERATION_IN_LOCAL_BLOCK.format(path=path, what="output"))
        if self.roots and id(envoy._root) not in self.roots:
            raise TracingError(MSG_OTHER_MODEL.format(path=_as_code(path), what=what))
        return _ModuleAccess(self.runner, path, what)


def _names_of(code: types.CodeType) -> frozenset[str]:
    """Every name `code` and the functions, classes and comprehensions in it may look up in
    its namespace (`co_names` also holds attribute names: looking those up too is harmless)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_of(const)
    return frozenset(names)


def _may_have_changed(value: Any, version: int | None) -> bool:
    """Whether a value sent down may have been changed in place by the block: a tensor whose
    version counter moved, or a container (no cheap way to tell)."""
    if isinstance(value, torch.Tensor):
        return version is None or value._version != version
    return isinstance(value, (list, dict, set, bytearray))


class LocalBlockRunner:
    """Runs a trace's local blocks on the client: the `LocalPeer` the transports talk to.

    `blocks`: the trace's `LocalBlockCode`s (anything with `line`, `filename`, `code` and
    `writes`). `lookup`: a name's value in the caller (`CapturedTrace.lookup`: its locals,
    then its globals, or `MISSING`). `max_up_bytes`: the server's limit on what a block sends
    back (`Policy.max_upload_bytes`). `max_block_seconds`: the time a block may take from its
    start to its end (`Policy.local_block_seconds`; None: no limit). A server enforces its own
    limit while it waits; this one gives the in-process run the same end, and a block past it
    is answered with `BlockFailed(CATEGORY_TIMEOUT)` whatever it did (as the server would have
    given up on it first): the block is not interrupted, but checked at each read and at its
    end. `model`: the traced model; a block may read only its modules (None: any).

    `start` and `reply` must be called from one thread (greenlets do not cross threads); from
    the user's thread (`remote=True`, the HTTP driver) or from the server's body greenlet
    (`remote='local'`), alike. A block may be started many times (a block in a step loop).

    `failure`: None, or what the client raises when the job ends failed on a block: the
    exception the block raised (its traceback: the user's lines, Interlace's frames dropped),
    or a `LocalBlockError` (a value that could not be sent either way, a line the trace has no
    block at). Each `BlockFailed` this runner answers sets it, except a timeout's, which
    resets it to None: the job's own account (the server's) is the error then.
    """

    failure: BaseException | None

    def __init__(self, blocks: Iterable[LocalBlockLike], lookup: Callable[[str], Any], *,
                 max_up_bytes: int | None = None, max_block_seconds: float | None = None,
                 model: Any = None) -> None:
        self.blocks: dict[int, LocalBlockLike] = {block.line: block for block in blocks}
        self.failure = None
        self._lookup = lookup
        self._max_up_bytes = max_up_bytes
        self._max_seconds = max_block_seconds
        self._started = 0.0
        roots: set[int] = set()
        if model is not None:
            # An edited copy (`model.edit()`) shares its original's envoys: the same model.
            roots = {id(model), id(model.__dict__.get("_edit_origin"))}
        self._reader = _Reader(self, frozenset(roots))
        name = lookup("__name__")
        # One namespace for the whole run: what blocks assign stays for later blocks and steps
        # (and a function a block defines sees later values through its globals).
        self._ns: dict[str, Any] = {"__builtins__": builtins.__dict__,
                                    "__name__": name if type(name) is str else "__main__"}
        self._assigned: set[str] = set()
        self._names: dict[int, frozenset[str]] = {}
        self._greenlet: _BlockGreenlet | None = None
        self._caller: Any = None
        self._line = 0
        self._waiting = False

    # -- the peer ------------------------------------------------------------------------------

    def start(self, line: int, values: bytes) -> ClientMessage:
        """Run the block at `line` with the values the server sent down, until it reads a
        module (`ReadRequest`) or ends (`BlockDone` with its `writes`, or `BlockFailed`)."""
        self.close()  # a block still waiting for a read: the server gave up on it
        self._line = line
        self._started = time.monotonic()
        block = self.blocks.get(line)
        if block is None:
            known = ", ".join(str(n) for n in sorted(self.blocks)) or "none"
            return self._fail(LocalBlockError(MSG_UNKNOWN_LINE.format(line=line, known=known)), CATEGORY_NO_CLIENT)
        try:
            down = decode_local_values(values)
        except RemoteProtocolError as error:
            return self._fail(LocalBlockError(MSG_BAD_DOWN.format(line=line, reason=error)), CATEGORY_VALUE)
        ns = self._namespace(block, down)
        g = _BlockGreenlet(self._body, parent=getcurrent())
        setattr(g, LOCAL_READER, self._reader)
        self._greenlet = g
        return self._enter(g, (block, ns, down))

    def reply(self, value: bytes) -> ClientMessage:
        """The value of the module read the block waits for (`encode_local_values({"value":
        v})`); the block goes on to its next read or its end."""
        g = self._greenlet
        if g is None or g.dead or not self._waiting:
            return self._fail(LocalBlockError(MSG_NO_READ), CATEGORY_NO_CLIENT)
        return self._enter(g, value)

    def close(self) -> None:
        """End a block left waiting for a read (the job ended, or gave up on the block)."""
        g, self._greenlet, self._waiting = self._greenlet, None, False
        if g is not None and not g.dead:
            g.parent = getcurrent()
            g.throw(GreenletExit)

    # -- the block's greenlet ------------------------------------------------------------------

    def _enter(self, g: _BlockGreenlet, value: Any) -> ClientMessage:
        """Switch into the block until it reads (it switches back here) or ends (it returns
        here: its parent is whoever called)."""
        caller = getcurrent()
        self._caller = caller
        if g.parent is not caller:
            g.parent = caller
        self._waiting = False
        message = g.switch(value)
        self._caller = None
        if g.dead:
            self._greenlet = None
        else:
            self._waiting = True
        took = time.monotonic() - self._started
        if self._max_seconds is not None and took > self._max_seconds:
            self.close()
            self.failure = None
            return BlockFailed(MSG_BLOCK_TIMEOUT.format(line=self._line, took=took, limit=self._max_seconds),
                               CATEGORY_TIMEOUT)
        return message

    def _read(self, path: str, kind: str) -> Any:
        """On the block's greenlet: ask the caller for `path.kind` and wait for `reply`."""
        caller = self._caller
        assert caller is not None, "a local block read outside start/reply"
        data = caller.switch(ReadRequest(path, kind))  # type: ignore[arg-type]
        try:
            values = decode_local_values(data)
        except RemoteProtocolError as error:
            raise _ReadFailed(MSG_BAD_READ.format(path=path, kind=kind, line=self._line, reason=error)) from None
        if len(values) != 1:
            raise _ReadFailed(MSG_BAD_READ.format(path=path, kind=kind, line=self._line,
                                                  reason=f"it holds {len(values)} values instead of one"))
        return next(iter(values.values()))

    def _body(self, job: tuple[LocalBlockLike, dict[str, Any], dict[str, Any]]) -> ClientMessage:
        block, ns, down = job
        del job
        try:
            return _Descend()(_FLOOR_DEPTH, lambda: self._run(block, ns, down))
        except RecursionError:  # too near the recursion limit to descend: run from here
            return self._run(block, ns, down)

    def _run(self, block: LocalBlockLike, ns: dict[str, Any], down: dict[str, Any]) -> ClientMessage:
        before = ns.copy()
        versions = {name: v._version for name, v in down.items() if isinstance(v, torch.Tensor)}
        try:
            exec(block.code, ns)
        except GreenletExit:
            raise
        except _ReadFailed as error:
            return self._fail(error.with_traceback(None), CATEGORY_VALUE)
        except BaseException as error:  # noqa: BLE001 - the user's own error, reported whole
            return self._raised(block, error)
        changed: dict[str, Any] = {}
        missing = MISSING
        for name, value in ns.items():
            if before.get(name, missing) is not value and not name.startswith("__"):
                changed[name] = value
        self._assigned.update(changed)
        for name in before.keys() - ns.keys():  # `del name` in the block
            self._assigned.discard(name)
        # Only what the block assigned on this path travels: a write it left alone keeps
        # the server's value (the very object: often a view into a module's output that the
        # body edits later). Identity cannot see `hs = hs.mul_(0)` on a value sent down, so a
        # value sent down travels back if it may have changed in place.
        up = {}
        for name in block.writes:
            if name in changed:
                up[name] = changed[name]
            elif name in down and ns.get(name, missing) is down[name]:
                if _may_have_changed(down[name], versions.get(name)):
                    up[name] = down[name]
        try:
            data = encode_local_values(up, line=block.line, direction="up", max_bytes=self._max_up_bytes)
        except UnsendableLocalValue as error:
            return self._fail(LocalBlockError(str(error)), CATEGORY_VALUE)
        return BlockDone(data)

    # -- the namespace and failures ------------------------------------------------------------

    def _namespace(self, block: LocalBlockLike, down: dict[str, Any]) -> dict[str, Any]:
        """The run's namespace for `block`: values sent down, over what blocks assigned, over
        the caller's names the block's code may use."""
        ns = self._ns
        assigned = self._assigned
        for name in [n for n in ns if n not in assigned and not n.startswith("__")]:
            del ns[name]  # the last block's values sent down and caller names: fresh ones now
        names = self._names.get(block.line)
        if names is None:
            names = self._names[block.line] = _names_of(block.code)
        lookup, missing = self._lookup, MISSING
        for name in names:
            if name not in ns:
                value = lookup(name)
                if value is not missing:
                    ns[name] = value
        ns.update(down)
        return ns

    def _raised(self, block: LocalBlockLike, error: BaseException) -> BlockFailed:
        error = error.with_traceback(clean_traceback(error.__traceback__))
        self.failure = error
        lines = ["Traceback (most recent call last):\n"]
        for frame in traceback.extract_tb(error.__traceback__):
            name = "<local block>" if frame.name == "<module>" and frame.filename == block.filename else frame.name
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {name}\n')
            if frame.line:
                lines.append(f"    {frame.line.strip()}\n")
        lines.extend(traceback.format_exception_only(type(error), error))
        return BlockFailed("".join(lines).rstrip("\n"), CATEGORY_RAISED)

    def _fail(self, error: BaseException, category: str) -> BlockFailed:
        self.failure = error
        return BlockFailed(f"{type(error).__name__}: {error}", category)


class _WithName:
    """A lookup that answers one name itself (the `as` name of the trace: its tracer)."""

    __slots__ = ("name", "value", "outer")

    def __init__(self, name: str, value: Any, outer: Callable[[str], Any]) -> None:
        self.name, self.value, self.outer = name, value, outer

    def __call__(self, name: str) -> Any:
        return self.value if name == self.name else self.outer(name)


def runner_for(trace: CapturedTrace, policy: Policy | None = None) -> LocalBlockRunner | None:
    """The runner of `trace`'s local blocks (None when its body has none). `policy`: the
    server's `Policy` (its `max_upload_bytes` limits what a block sends back, its
    `local_block_seconds` the time a block may take)."""
    blocks = tuple(getattr(trace.block, "local_blocks", ()) or ())
    if not blocks:
        return None
    lookup = trace.lookup
    if trace.block.as_name:  # `with model.trace(...) as tracer:`: the client's tracer (`tracer.log`)
        lookup = _WithName(trace.block.as_name, trace.tracer, lookup)
    if policy is None:
        return LocalBlockRunner(blocks, lookup, model=trace.model)
    return LocalBlockRunner(blocks, lookup, max_up_bytes=policy.max_upload_bytes,
                            max_block_seconds=policy.local_block_seconds, model=trace.model)
