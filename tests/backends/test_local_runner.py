"""The client's runner of local blocks (`backends/local_runner.py`), driven directly as the
server's side would: `start` with the values sent down, a `reply` per module read, until
`BlockDone` or `BlockFailed`. Blocks are built here as the engine's capture builds them: the
statements after a `with interlace.local():` line of a real file, compiled at their own lines."""

from __future__ import annotations

import textwrap
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from greenlet import greenlet

import interlace
from interlace.backends.local_runner import LocalBlockError, LocalBlockRunner, runner_for
from interlace.contract.local_block import (
    CATEGORY_NO_CLIENT,
    CATEGORY_RAISED,
    CATEGORY_TIMEOUT,
    CATEGORY_VALUE,
    BlockDone,
    BlockFailed,
    ReadRequest,
    decode_local_values,
    encode_local_values,
)
from interlace.contract.policy import Policy
from interlace.errors import TracingError
from interlace.tracing.backend import CapturedTrace
from interlace.tracing.namespace import MISSING


@dataclass(frozen=True)
class Block:
    """Shaped like `tracing.local_block.LocalBlockCode`."""

    line: int
    filename: str
    code: types.CodeType
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    assigned: tuple[str, ...] = ()


class UserFile:
    """A user's script: blocks are appended to it, each after a `with interlace.local():` line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = ["import interlace", ""]

    def block(self, body: str, *, writes: tuple[str, ...] = (), reads: tuple[str, ...] = ()) -> Block:
        line = len(self.lines) + 1
        statements = textwrap.dedent(body).strip("\n").splitlines()
        self.lines.append("with interlace.local():")
        self.lines.extend("    " + s for s in statements)
        self.path.write_text("\n".join(self.lines) + "\n")
        code = compile("\n" * line + "\n".join(statements) + "\n", str(self.path), "exec")
        return Block(line, str(self.path), code, reads, writes)


@pytest.fixture
def user_file(tmp_path: Path) -> UserFile:
    return UserFile(tmp_path / "script.py")


def lookup_of(names: dict[str, Any]):
    return lambda name: names.get(name, MISSING)


def down(line: int, **values: Any) -> bytes:
    return encode_local_values(values, line=line, direction="down")


def drive(runner: LocalBlockRunner, line: int, answers: dict[tuple[str, str], Any] | None = None,
          reads: list[tuple[str, str]] | None = None, **values: Any):
    """The server's side of one block: start, answer each read from `answers`, the last message."""
    message = runner.start(line, down(line, **values))
    while isinstance(message, ReadRequest):
        if reads is not None:
            reads.append((message.path, message.kind))
        value = (answers or {})[(message.path, message.kind)]
        message = runner.reply(encode_local_values({"value": value}, line=line, direction="down"))
    return message


def written(message: Any) -> dict[str, Any]:
    assert isinstance(message, BlockDone), message
    return decode_local_values(message.values)


def test_values_round_trip_bitwise(user_file):
    block = user_file.block("y = x\nz = [x, {'b': b}]", writes=("y", "z"))
    runner = LocalBlockRunner([block], lookup_of({}))
    x = torch.tensor([1.5, float("nan"), -0.0, float("inf"), 1e-45, -3.25], dtype=torch.float32)
    b = torch.randn(3, 4).to(torch.bfloat16)
    out = written(drive(runner, block.line, x=x, b=b))
    assert out["y"].dtype == torch.float32
    assert torch.equal(out["y"].view(torch.int32), x.view(torch.int32))  # nan and -0.0 bits too
    assert torch.equal(out["z"][1]["b"].view(torch.int16), b.view(torch.int16))


def test_namespace_persists_across_blocks_and_steps(user_file):
    step = user_file.block("state = {'n': state['n'] + 1, 'seen': state['seen'] + [token]}\nn = state['n'] + offset",
                           writes=("n",))
    other = user_file.block("total = state['n'] * 10", writes=("total",))
    caller = {"state": {"n": 0, "seen": []}, "offset": 100}
    runner = LocalBlockRunner([step, other], lookup_of(caller))
    for i in range(3):  # a block in a step loop: `state` is the one the last step assigned
        assert written(drive(runner, step.line, token=i)) == {"n": 101 + i}
    assert written(drive(runner, other.line)) == {"total": 30}
    assert caller["state"] == {"n": 0, "seen": []}  # the caller's own object is untouched
    # A value sent down wins over what a block assigned.
    assert written(drive(runner, other.line, state={"n": 7})) == {"total": 70}


def test_values_sent_down_do_not_linger(user_file):
    uses = user_file.block("r = hs if 'hs' in dir() else -1", writes=("r",))
    runner = LocalBlockRunner([uses], lookup_of({}))
    assert written(drive(runner, uses.line, hs=5)) == {"r": 5}
    assert written(drive(runner, uses.line)) == {"r": -1}  # not sent this time: not there


def test_a_write_the_block_did_not_assign_is_not_sent(user_file):
    block = user_file.block("if flag:\n    hs = hs * 0", writes=("hs",))
    runner = LocalBlockRunner([block], lookup_of({}))
    assert written(drive(runner, block.line, hs=torch.ones(2), flag=False)) == {}
    assert torch.equal(written(drive(runner, block.line, hs=torch.ones(2), flag=True))["hs"], torch.zeros(2))


def test_reads_ask_the_server_by_path_and_kind(user_file, tiny_mlp):
    model = interlace.NNsight(tiny_mlp)
    block = user_file.block(
        "h = model.layer1.output * 2\nfirst = model.layer2.input + 1\nargs, kwargs = model.act.inputs\n"
        "top = model.output",
        writes=("h", "first", "args", "kwargs", "top"))
    runner = LocalBlockRunner([block], lookup_of({"model": model}), model=model)
    hidden, inp = torch.randn(1, 10), torch.randn(1, 10)
    answers = {("model.layer1", "output"): hidden, ("model.layer2", "input"): inp,
               ("model.act", "inputs"): ((inp,), {"k": 3}), ("model", "output"): torch.ones(1, 2)}
    reads: list[tuple[str, str]] = []
    out = written(drive(runner, block.line, answers, reads))
    assert reads == [("model.layer1", "output"), ("model.layer2", "input"), ("model.act", "inputs"),
                     ("model", "output")]
    assert torch.equal(out["h"], hidden * 2) and torch.equal(out["first"], inp + 1)
    assert torch.equal(out["args"][0], inp) and out["kwargs"] == {"k": 3}
    assert torch.equal(out["top"], torch.ones(1, 2))


def test_setting_a_module_value_in_a_block_is_refused_with_the_fix(user_file, tiny_mlp):
    model = interlace.NNsight(tiny_mlp)
    block = user_file.block("model.layer1.output = torch.zeros(1, 10)")
    runner = LocalBlockRunner([block], lookup_of({"model": model, "torch": torch}), model=model)
    message = runner.start(block.line, down(block.line))  # no read first: refused at once
    assert isinstance(message, BlockFailed) and message.category == CATEGORY_RAISED
    assert "`model.layer1.output` cannot be set inside a local block" in message.text
    assert "model.layer1.output = new" in message.text
    assert isinstance(runner.failure, TracingError)


def test_other_uses_of_modules_in_a_block_are_refused(user_file, tiny_mlp):
    model, other = interlace.NNsight(tiny_mlp), interlace.NNsight(torch.nn.Sequential(torch.nn.ReLU()))
    skip = user_file.block("model.layer1.skip(1)")
    step = user_file.block("model.layer1.next()")
    foreign = user_file.block("x = other.output")
    runner = LocalBlockRunner([skip, step, foreign], lookup_of({"model": model, "other": other}), model=model)
    for block, text in [(skip, "`model.layer1.skip(...)` cannot be used inside a local block"),
                        (step, "`model.layer1.next()` cannot be used inside a local block"),
                        (foreign, "another model than the one this trace runs")]:
        message = runner.start(block.line, down(block.line))
        assert isinstance(message, BlockFailed) and text in message.text, message


def test_a_raising_block_keeps_its_exception_and_the_users_line(user_file):
    block = user_file.block("def check(v):\n    raise ValueError(f'bad value {v}')\ncheck(x)")
    runner = LocalBlockRunner([block], lookup_of({}))
    message = drive(runner, block.line, x=3)
    assert isinstance(message, BlockFailed) and message.category == CATEGORY_RAISED
    raise_line = block.line + 2
    assert f'File "{block.filename}", line {raise_line}, in check' in message.text
    assert "raise ValueError(f'bad value {v}')" in message.text  # the user's source line
    assert f'line {block.line + 3}, in <local block>' in message.text
    assert message.text.endswith("ValueError: bad value 3")
    assert "local_runner.py" not in message.text
    error = runner.failure
    assert isinstance(error, ValueError) and str(error) == "bad value 3"
    frames = traceback.extract_tb(error.__traceback__)
    assert [(f.filename, f.lineno) for f in frames] == [(block.filename, block.line + 3), (block.filename, raise_line)]


def test_an_unsendable_write_fails_as_a_value_error_naming_it(user_file):
    block = user_file.block("handle = open", writes=("handle",))
    runner = LocalBlockRunner([block], lookup_of({}))
    message = drive(runner, block.line)
    assert isinstance(message, BlockFailed) and message.category == CATEGORY_VALUE
    assert "`handle`" in message.text and f"line {block.line}" in message.text
    assert isinstance(runner.failure, LocalBlockError) and "`handle`" in str(runner.failure)


def test_writes_over_the_servers_limit_fail_as_a_value_error(user_file):
    block = user_file.block("big = torch.randn(100_000)", writes=("big",))
    runner = LocalBlockRunner([block], lookup_of({"torch": torch}), max_up_bytes=10_000)
    message = drive(runner, block.line)
    assert isinstance(message, BlockFailed) and message.category == CATEGORY_VALUE and "limit" in message.text


def test_an_unknown_line_or_a_stray_reply_fails_cleanly(user_file):
    block = user_file.block("x = 1")
    runner = LocalBlockRunner([block], lookup_of({}))
    message = runner.start(999, down(999))
    assert isinstance(message, BlockFailed) and message.category == CATEGORY_NO_CLIENT and str(block.line) in message.text
    stray = runner.reply(encode_local_values({"value": 1}, line=1, direction="down"))
    assert isinstance(stray, BlockFailed) and stray.category == CATEGORY_NO_CLIENT


def test_a_block_left_waiting_is_ended_by_the_next_start(user_file, tiny_mlp):
    model = interlace.NNsight(tiny_mlp)
    ended: list[str] = []
    block = user_file.block("try:\n    h = model.layer1.output\nfinally:\n    ended.append('ended')", writes=("h",))
    runner = LocalBlockRunner([block], lookup_of({"model": model, "ended": ended}), model=model)
    assert isinstance(runner.start(block.line, down(block.line)), ReadRequest)
    out = written(drive(runner, block.line, {("model.layer1", "output"): torch.ones(1)}))
    assert ended == ["ended", "ended"] and torch.equal(out["h"], torch.ones(1))


class _ServerMediator:
    """Stands for the server's mediator on the server's body greenlet (`remote='local'`)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def request(self, *args: Any) -> Any:
        self.calls.append(args)
        raise AssertionError("the block read through the server's mediator")

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        raise AssertionError(f"the block used the server's mediator ({name})")


class _ServerBody(greenlet):
    mediator: Any = None


def test_inside_the_servers_body_greenlet_reads_still_go_through_the_peer(user_file, tiny_mlp, capsys):
    model = interlace.NNsight(tiny_mlp)
    block = user_file.block(
        "from interlace.tracing import current_mediator\nseen = current_mediator() is None\n"
        "h = model.layer1.output + 1\nprint('printed here', float(h.sum()))",
        writes=("h", "seen"))
    runner = LocalBlockRunner([block], lookup_of({"model": model}), model=model)
    server = _ServerMediator()
    reads: list[tuple[str, str]] = []

    def body() -> Any:  # the server's body: it calls the peer itself, as under remote='local'
        return drive(runner, block.line, {("model.layer1", "output"): torch.zeros(1, 10)}, reads)

    g = _ServerBody(body)
    g.mediator = server
    out = written(g.switch())
    assert reads == [("model.layer1", "output")] and server.calls == []
    assert out["seen"] is True and torch.equal(out["h"], torch.ones(1, 10))
    assert "printed here 10.0" in capsys.readouterr().out


def test_runner_for_gives_none_without_blocks_and_binds_the_tracer(user_file):
    block = user_file.block("name = type(tracer).__name__", writes=("name",))

    class Tracer:
        pass

    def trace(blocks: tuple) -> CapturedTrace:
        captured = types.SimpleNamespace(local_blocks=blocks, as_name="tracer")
        return CapturedTrace("trace", captured, (), {}, lookup_of({}), None, Tracer())  # type: ignore[arg-type]

    assert runner_for(trace(())) is None
    runner = runner_for(trace((block,)), Policy())
    assert runner is not None
    assert written(drive(runner, block.line)) == {"name": "Tracer"}


def test_with_the_engines_own_block_code(tmp_path):
    """The blocks capture makes (`tracing.local_block`) run as the handmade ones do."""
    import ast

    from interlace.tracing.local_block import find_local_blocks, local_block_codes

    path = tmp_path / "chat.py"
    source = ("import interlace\nstate = {'n': 0}\nwith model.trace(x) as tracer:\n    hs = model.layer1.output\n"
              "    with interlace.local():\n        state = {'n': state['n'] + 1}\n        hs = hs * state['n']\n"
              "        tracer.log('step', state['n'])\n    model.layer1.output = hs\n")
    path.write_text(source)
    body = ast.parse(source).body[2].body  # type: ignore[attr-defined]
    (code,) = local_block_codes(body, find_local_blocks(body, str(path)), str(path), "tracer")
    assert (code.line, code.reads, code.writes) == (5, ("hs",), ("hs",))
    trace = CapturedTrace("trace", types.SimpleNamespace(local_blocks=(code,), as_name="tracer"), (), {},
                          lookup_of({"state": {"n": 0}, "interlace": interlace}), None,
                          types.SimpleNamespace(log=print))  # type: ignore[arg-type]
    runner = runner_for(trace)
    assert runner is not None
    for n in (1, 2, 3):  # the block in a generation loop: `state` carries over
        assert torch.equal(written(drive(runner, 5, hs=torch.ones(2)))["hs"], torch.full((2,), float(n)))


def test_a_block_past_its_time_fails_as_a_timeout_at_its_next_read_or_end(user_file, tiny_mlp):
    model = interlace.NNsight(tiny_mlp)
    ended: list[str] = []
    slow = user_file.block("import time\ntime.sleep(0.3)\ny = 1", writes=("y",))
    reads = user_file.block("import time\ntry:\n    time.sleep(0.3)\n    h = model.layer1.output\n"
                            "finally:\n    ended.append('ended')", writes=("h",))
    runner = LocalBlockRunner([slow, reads], lookup_of({"model": model, "ended": ended}), max_block_seconds=0.1,
                              model=model)
    for block in (slow, reads):
        message = runner.start(block.line, down(block.line))
        assert isinstance(message, BlockFailed) and message.category == CATEGORY_TIMEOUT, message
        assert f"line {block.line}" in message.text and "limit of 0.1 s" in message.text
        assert runner.failure is None  # the job's own account is the error
    assert ended == ["ended"]  # the block waiting for its read was ended


def test_a_write_changed_in_place_travels_back(user_file):
    block = user_file.block("if flag:\n    hs = hs.mul_(0)\nelse:\n    hs = hs", writes=("hs",))
    runner = LocalBlockRunner([block], lookup_of({}))
    assert torch.equal(written(drive(runner, block.line, hs=torch.ones(2), flag=True))["hs"], torch.zeros(2))
    assert written(drive(runner, block.line, hs=torch.ones(2), flag=False)) == {}  # unchanged: the server keeps its own
