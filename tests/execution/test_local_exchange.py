"""The server's side of local blocks (`execution/local_exchange.py`), in-process and through a
worker process (`execution/local_channel.py`), against a scripted client.

The requests are built by hand: the body calls the helper (`__interlace_local__(<line>)`) that
the engine's capture compiles `with interlace.local():` to, and a `FakePeer` plays the client:
it records what the server sent and answers from a script. What the real client does with the
messages is tested with the client's runner (tests/streaming).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

import interlace
from interlace.contract.local_block import (
    CATEGORY_CLIENT_GONE,
    CATEGORY_NO_CLIENT,
    CATEGORY_RAISED,
    CATEGORY_TIMEOUT,
    CATEGORY_VALUE,
    BlockDone,
    BlockFailed,
    LocalBlockSpec,
    ReadRequest,
    decode_local_values,
    encode_local_values,
)
from interlace.contract.policy import DEFAULT_POLICY
from interlace.contract.request import BlockSpec, BuiltRequest, TraceRequest, encode_request
from interlace.contract.result import decode_result
from interlace.execution.channel import Channel
from interlace.execution.errors import JobFailed
from interlace.execution.local_channel import ChannelPeer, LocalRelay, MalformedLocalMessage
from interlace.execution.local_exchange import LOCAL_HELPER, READ_VALUE
from interlace.execution.process import WorkerSpec, WorkerSupervisor
from interlace.execution.run import execute_request

PROMPT = "The Eiffel Tower is in the city of"
FILE = "/home/user/experiment.py"


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def up(line: int, **values) -> BlockDone:
    """The client's `BlockDone` carrying `values`."""
    return BlockDone(encode_local_values(values, line=line, direction="up"))


class FakePeer:
    """A client that answers from `script`: each entry a message, or a function of what was
    just sent (the decoded values) returning one. Records every hop in `sent`."""

    def __init__(self, *script, delay: float = 0.0) -> None:
        self.script = list(script)
        self.sent: list[tuple[str, int | None, dict]] = []
        self.delay = delay

    def start(self, line: int, values: bytes):
        self.sent.append(("start", line, decode_local_values(values)))
        return self._next()

    def reply(self, value: bytes):
        self.sent.append(("reply", None, decode_local_values(value)))
        return self._next()

    def _next(self):
        time.sleep(self.delay)
        answer = self.script.pop(0)
        return answer(self.sent[-1][2]) if callable(answer) else answer


def request(body: str, *blocks: LocalBlockSpec, kind: str = "trace", kwargs=None) -> TraceRequest:
    """A trace request whose body is `body`, its first line at line 11 of FILE (the `with` is at
    line 9, then `import torch`)."""
    source = f"with model.{kind}({PROMPT!r}) as tracer:\n    import torch\n"
    source += "".join(f"    {line}\n" for line in body.splitlines())
    return TraceRequest(model_key="m", kind=kind, args=[PROMPT], kwargs=kwargs or {},
                        block=BlockSpec(filename=FILE, first_lineno=9, source=source),
                        model_refs={"model": "model"}, local_blocks=list(blocks))


def run(model, req: TraceRequest, peer=None, policy=DEFAULT_POLICY) -> dict:
    return execute_request(req, {}, model, policy=policy, local=peer)


def call(line: int) -> str:
    return f"{LOCAL_HELPER}({line})"


# -- values down and up ------------------------------------------------------------------------


def test_reads_travel_only_when_bound_and_data(model):
    body = "\n".join([
        "h = model.transformer.h[0].output[0]",
        "n = 3",
        "f = lambda x: x",
        "layer = model.transformer.h[1]",
        call(15),
        "kept = h.save()",
    ])
    spec = LocalBlockSpec(line=15, reads=("h", "n", "f", "layer", "model", "tracer", "torch", "never_bound"))
    peer = FakePeer(up(15))
    out = run(model, request(body, spec), peer)
    ((hop, line, values),) = peer.sent
    assert (hop, line) == ("start", 15)
    # Functions, envoys, the model, the tracer and unbound names stay: the client has its own.
    assert sorted(values) == ["h", "n"]
    assert values["n"] == 3 and torch.equal(values["h"], out["kept"])


def test_writes_are_bound_for_the_code_after_the_block(model):
    body = "\n".join([
        "h = model.transformer.h[0].output[0]",
        call(12),
        "doubled = (h * scale).save()",
        "label = word.save()",
    ])
    spec = LocalBlockSpec(line=12, reads=("h",), writes=("scale", "word"))
    peer = FakePeer(lambda sent: up(12, scale=torch.tensor(2.0), word="Paris"))
    out = run(model, request(body, spec), peer)
    with model.trace(PROMPT):
        h = model.transformer.h[0].output[0].save()
    assert torch.equal(out["doubled"], h * 2) and out["label"] == "Paris"


def test_a_write_the_block_did_not_send_keeps_the_servers_value(model):
    body = "\n".join(["x = torch.ones(2)", call(12), "y = x.save()"])
    out = run(model, request(body, LocalBlockSpec(line=12, writes=("x",))), FakePeer(up(12)))
    assert torch.equal(out["y"], torch.ones(2))


def test_a_read_is_answered_with_the_modules_own_value(model, tiny_gpt2_path):
    """`model.transformer.h[2].output` inside the block: the server reads it in the body's
    place, bitwise what a raw forward hook on the same weights sees."""
    body = "\n".join([call(11), "result = got.save()"])
    spec = LocalBlockSpec(line=11, writes=("got",))
    peer = FakePeer(ReadRequest("model.transformer.h.2", "output"), lambda sent: up(11, got=sent[READ_VALUE]))
    out = run(model, request(body, spec), peer)

    raw = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_path))
    tokens = transformers.AutoTokenizer.from_pretrained(str(tiny_gpt2_path))(PROMPT, return_tensors="pt")
    seen = {}
    handle = raw.transformer.h[2].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        raw(**tokens)
    handle.remove()
    expected = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    got = out["result"][0] if isinstance(out["result"], tuple) else out["result"]
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_several_reads_and_their_order(model):
    body = "\n".join([call(11), "a_in = a.save()", "b_out = b.save()"])
    spec = LocalBlockSpec(line=11, writes=("a", "b"))
    got = {}
    peer = FakePeer(
        ReadRequest("model.transformer.h.0", "input"),
        lambda sent: got.setdefault("a", sent[READ_VALUE]) is not None and ReadRequest("model.lm_head", "output"),
        lambda sent: up(11, a=got["a"], b=sent[READ_VALUE]),
    )
    out = run(model, request(body, spec), peer)
    with model.trace(PROMPT):
        a = model.transformer.h[0].input.save()
        b = model.lm_head.output.save()
    assert torch.equal(out["a_in"], a) and torch.equal(out["b_out"], b)
    assert [hop for hop, _, _ in peer.sent] == ["start", "reply", "reply"]


def test_a_block_in_a_loop_runs_at_every_pass(model):
    body = "\n".join(["total = 0", "for i in range(3):", f"    {call(13)}", "    total = total + step",
                      "out = torch.tensor(total).save()"])
    spec = LocalBlockSpec(line=13, reads=("i", "total"), writes=("step",))
    peer = FakePeer(*[lambda sent: up(13, step=sent["i"] * 10)] * 3)
    out = run(model, request(body, spec), peer)
    assert out["out"].item() == 30
    assert [values for _, _, values in peer.sent] == [{"i": 0, "total": 0}, {"i": 1, "total": 0}, {"i": 2, "total": 10}]


def test_a_block_in_an_inner_trace_of_a_session_binds_in_that_trace(model):
    """The inner trace's body has a namespace of its own: the block reads and writes there."""
    source = "\n".join([
        "with model.session() as tracer:",
        "    import torch",
        f"    with model.trace({PROMPT!r}):",
        "        h = model.transformer.h[0].output[0]",
        f"        {call(13)}",
        "        scaled = (h * z).save()",
        "",
    ])
    req = TraceRequest(model_key="m", kind="session", block=BlockSpec(filename=FILE, first_lineno=9, source=source),
                       model_refs={"model": "model"},
                       local_blocks=[LocalBlockSpec(line=13, reads=("h",), writes=("z",))])
    peer = FakePeer(lambda sent: up(13, z=torch.tensor(3.0)))
    out = run(model, req, peer)
    with model.trace(PROMPT):
        h = model.transformer.h[0].output[0].save()
    assert torch.equal(out["scaled"], h * 3) and torch.equal(peer.sent[0][2]["h"], h)


# -- failures ----------------------------------------------------------------------------------


def test_the_blocks_failure_is_the_jobs_error_at_the_users_line(model):
    body = "\n".join(["h = model.transformer.h[0].output[0]", call(12), "x = h.save()"])
    client_text = 'Traceback (most recent call last):\n  File "/home/user/experiment.py", line 13, in <local block>\n' \
                  "    y = 1 / 0\nZeroDivisionError: division by zero"
    peer = FakePeer(BlockFailed(client_text, CATEGORY_RAISED))
    with pytest.raises(JobFailed) as info:
        run(model, request(body, LocalBlockSpec(line=12, reads=("h",))), peer)
    assert info.value.category == CATEGORY_RAISED
    text = info.value.traceback_text
    assert f'File "{FILE}", line 12' in text and f"{LOCAL_HELPER}(12)" in text  # the server's frame: the block's line
    assert text.endswith(client_text) and "raised on the client" in text


def test_the_body_cannot_swallow_a_blocks_failure(model):
    body = "\n".join(["try:", f"    {call(12)}", "except Exception:", "    pass", "x = torch.ones(1).save()"])
    peer = FakePeer(BlockFailed("boom", CATEGORY_RAISED))
    with pytest.raises(JobFailed) as info:
        run(model, request(body, LocalBlockSpec(line=12)), peer)
    assert info.value.category == CATEGORY_RAISED


@pytest.mark.parametrize("category", [CATEGORY_TIMEOUT, CATEGORY_CLIENT_GONE, CATEGORY_VALUE])
def test_a_transports_failure_keeps_its_category(model, category):
    peer = FakePeer(BlockFailed("LocalBlockTimeout: the local block at line 11 ran past 300 s", category))
    with pytest.raises(JobFailed) as info:
        run(model, request(call(11), LocalBlockSpec(line=11)), peer)
    assert info.value.category == category
    assert info.value.traceback_text.endswith("LocalBlockTimeout: the local block at line 11 ran past 300 s")


def test_a_peer_that_raises_fails_the_job_with_its_category(model):
    class Gone(ConnectionError):
        category = CATEGORY_TIMEOUT

    def broken(sent):
        raise Gone("no answer in 300 s")

    with pytest.raises(JobFailed) as info:
        run(model, request(call(11), LocalBlockSpec(line=11)), FakePeer(broken))
    assert info.value.category == CATEGORY_TIMEOUT and "Gone: no answer in 300 s" in info.value.traceback_text

    def unnamed(sent):
        raise OSError("connection reset")

    with pytest.raises(JobFailed) as info:
        run(model, request(call(11), LocalBlockSpec(line=11)), FakePeer(unnamed))
    assert info.value.category == CATEGORY_CLIENT_GONE and "could not reach the client" in info.value.traceback_text


def test_an_unknown_line_is_an_invalid_request(model):
    with pytest.raises(JobFailed) as info:
        run(model, request(call(11), LocalBlockSpec(line=30)), FakePeer(up(11)))
    assert info.value.category == "invalid-request"
    assert "line 11" in info.value.traceback_text and "lines 30" in info.value.traceback_text


def test_no_peer_fails_clearly(model):
    with pytest.raises(JobFailed) as info:
        run(model, request(call(11), LocalBlockSpec(line=11)), None)
    assert info.value.category == CATEGORY_NO_CLIENT
    assert "has no client to run on" in info.value.traceback_text


def test_a_value_the_codec_refuses_either_way(model):
    # Down: an object of the body's own class is not data the codec carries.
    body = "\n".join(["class Box:", "    pass", "box = Box()", call(14)])
    with pytest.raises(JobFailed) as info:
        run(model, request(body, LocalBlockSpec(line=14, reads=("box",))), FakePeer(up(14)))
    assert info.value.category == CATEGORY_VALUE
    assert "UnsendableLocalValue: `box`, read by the local block at line 14" in info.value.traceback_text
    # Up: bytes that are not values, and a name the block does not write.
    for answer, words in ((BlockDone(b"not a message"), "cannot be read"),
                          (up(11, secret=1), "sent back `secret`")):
        with pytest.raises(JobFailed) as info:
            run(model, request(call(11), LocalBlockSpec(line=11, writes=("x",))), FakePeer(answer))
        assert info.value.category == CATEGORY_VALUE and words in info.value.traceback_text


def test_a_read_of_a_module_the_model_lacks(model):
    peer = FakePeer(ReadRequest("model.transformer.nothing", "output"))
    with pytest.raises(JobFailed) as info:
        run(model, request(call(11), LocalBlockSpec(line=11)), peer)
    assert info.value.category == "invalid-request" and "model.transformer.nothing.output" in info.value.traceback_text


def test_values_down_are_held_to_the_result_limit(model):
    """A read the block asks for is refused by its name when over the server's result limit."""
    policy = DEFAULT_POLICY.model_copy(update={"max_result_bytes": 10_000})
    peer = FakePeer(ReadRequest("model.lm_head", "output"))
    with pytest.raises(JobFailed) as info:
        run(model, request(call(11), LocalBlockSpec(line=11)), peer, policy)
    assert info.value.category == CATEGORY_VALUE
    assert "`model.lm_head.output`, read by the local block at line 11" in info.value.traceback_text
    assert "limit" in info.value.traceback_text


def test_tracer_log_is_a_log_line_like_print(model):
    lines: list[str] = []
    body = "\n".join(['print("a", 1)', 'tracer.log("b", 2)', "x = torch.ones(1).save()"])
    execute_request(request(body), {}, model, policy=DEFAULT_POLICY, log=lines.append)
    assert lines == ["a 1", "b 2"]


# -- the job's wall clock ----------------------------------------------------------------------


def test_the_wall_clock_stops_while_the_client_has_the_block(model):
    policy = DEFAULT_POLICY.model_copy(update={"timeout_seconds": 1.0})
    body = "\n".join([call(11), "for i in range(3):", "    x = i", "y = z.save()"])
    peer = FakePeer(up(11, z=torch.tensor(5)), delay=2.0)
    out = run(model, request(body, LocalBlockSpec(line=11, writes=("z",))), peer, policy)
    assert out["y"].item() == 5
    # The server's own time still counts: a body that loops for 2 s fails.
    spin = "import time\nstart = time.monotonic()\nwhile time.monotonic() - start < 2:\n    pass"
    with pytest.raises(JobFailed) as info:
        run(model, request(spin), None, policy)
    assert "wall-time limit of 1 s" in info.value.traceback_text


# -- the worker's channel ------------------------------------------------------------------------


def _channel_pair():
    a, b = socket.socketpair()
    return Channel(a), Channel(b)


def test_channel_peer_and_relay_carry_the_conversation():
    """The worker's ChannelPeer and the parent's LocalRelay, over a real socketpair."""
    worker_end, parent_end = _channel_pair()
    client = FakePeer(ReadRequest("model.lm_head", "output"), lambda sent: up(7, z=sent[READ_VALUE] + 1))
    relay = LocalRelay(client)

    def parent():
        for _ in range(2):
            header, body = parent_end.recv()
            parent_end.send(*relay.answer(header, body))

    thread = threading.Thread(target=parent)
    thread.start()
    peer = ChannelPeer(worker_end)
    first = peer.start(7, encode_local_values({"h": torch.arange(3)}, line=7, direction="down"))
    assert first == ReadRequest("model.lm_head", "output")
    done = peer.reply(encode_local_values({READ_VALUE: torch.ones(2)}, line=7, direction="down"))
    thread.join(5)
    assert isinstance(done, BlockDone) and torch.equal(decode_local_values(done.values)["z"], torch.full((2,), 2.0))
    assert torch.equal(client.sent[0][2]["h"], torch.arange(3)) and client.sent[0][1] == 7


def test_relay_refuses_a_broken_conversation_and_answers_without_a_client():
    relay = LocalRelay(FakePeer(up(3)))
    with pytest.raises(MalformedLocalMessage):
        relay.answer({"op": "local-reply"}, b"")  # no block open
    with pytest.raises(MalformedLocalMessage):
        relay.answer({"op": "local-start", "line": "3"}, b"")
    header, body = LocalRelay(None).answer({"op": "local-start", "line": 3}, b"")
    assert header["msg"]["op"] == "failed" and header["msg"]["category"] == CATEGORY_NO_CLIENT
    raising = LocalRelay(FakePeer(lambda sent: 1 / 0))
    header, _ = raising.answer({"op": "local-start", "line": 3}, encode_local_values({}, line=3, direction="down"))
    assert header["msg"]["category"] == CATEGORY_CLIENT_GONE and "ZeroDivisionError" in header["msg"]["text"]


# -- through a real worker process ---------------------------------------------------------------
#
# The worker decodes and validates the payload itself, so the body spells the block as a user
# does (`with tracer.local():`, its code left on the client: `pass`); capture compiles it to the
# helper call on the server.

WORKER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def worker(tiny_gpt2_path):
    policy = DEFAULT_POLICY.model_copy(update={"timeout_seconds": WORKER_TIMEOUT_S})
    spec = WorkerSpec("m", {"kind": "language_model", "path": str(tiny_gpt2_path), "load_kwargs": {}},
                      read_paths=(str(tiny_gpt2_path),))
    supervisor = WorkerSupervisor(spec, policy).start()
    yield supervisor
    supervisor.close()


def payload(body: str, *blocks: LocalBlockSpec) -> bytes:
    """`body` under `with model.trace(PROMPT) as tracer:` (line 9), `import torch` at line 10:
    its first line is line 11. A `local:` line stands for `with tracer.local(): pass`."""
    lines = []
    for line in body.splitlines():
        if line.strip() == "local:":
            indent = line[: len(line) - len(line.lstrip())]
            lines += [f"{indent}with tracer.local():", f"{indent}    pass"]
        else:
            lines.append(line)
    req = request("\n".join(lines), *blocks)
    return encode_request(BuiltRequest(req, {}, []))


def test_worker_runs_a_block_through_its_parent(worker, model):
    body = "\n".join([
        "h = model.transformer.h[0].output[0]",
        'print("before")',
        "local:",  # lines 13-14
        'print("after")',
        "out = (h * scale + got[0]).save()",
    ])
    client = FakePeer(ReadRequest("model.transformer.h.1", "output"),
                      lambda sent: up(13, scale=torch.tensor(2.0), got=sent[READ_VALUE]))
    logged: list[str] = []
    result = decode_result(worker.run(payload(body, LocalBlockSpec(line=13, reads=("h",), writes=("scale", "got"))),
                                      logged.append, local=client))
    with model.trace(PROMPT):
        h = model.transformer.h[0].output[0]
        expected = (h * 2 + model.transformer.h[1].output[0]).save()
    assert torch.equal(result["out"], expected)
    assert [line.strip() for line in logged] == ["before", "after"]
    assert [(hop, line) for hop, line, _ in client.sent] == [("start", 13), ("reply", None)]
    assert sorted(client.sent[0][2]) == ["h"]


def test_worker_wall_clock_stops_while_the_client_has_the_block(worker):
    """The job's limit is 2 s; the client takes 3 s: the worker's guards and its parent's
    deadline both wait, and the job succeeds on the same worker."""
    pid = worker.worker.host_pid
    client = FakePeer(up(11, z=torch.tensor(7)), delay=WORKER_TIMEOUT_S + 1)
    result = decode_result(worker.run(payload("local:\nout = z.save()", LocalBlockSpec(line=11, writes=("z",))),
                                      lambda line: None, local=client))
    assert result["out"].item() == 7 and worker.worker.host_pid == pid


def test_worker_block_failures_and_no_client(worker):
    client = FakePeer(BlockFailed("Traceback ...\nKeyError: 'x'", CATEGORY_RAISED))
    with pytest.raises(JobFailed) as info:
        worker.run(payload("x = 1\nlocal:", LocalBlockSpec(line=12)), lambda line: None, local=client)
    assert info.value.category == CATEGORY_RAISED
    assert 'line 12, in <with block>' in info.value.traceback_text and info.value.traceback_text.endswith("KeyError: 'x'")
    with pytest.raises(JobFailed) as info:
        worker.run(payload("local:", LocalBlockSpec(line=11)), lambda line: None)
    assert info.value.category == CATEGORY_NO_CLIENT and "has no client to run on" in info.value.traceback_text
    # The worker is fine after both.
    assert decode_result(worker.run(payload("y = torch.ones(1).save()"), lambda line: None))["y"].item() == 1


class RawPeer:
    """A client that records raw bytes and answers `answer`."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.sent: list[tuple[int, bytes]] = []

    def start(self, line: int, values: bytes):
        self.sent.append((line, values))
        return self.answer

    def reply(self, value: bytes):
        raise AssertionError("no read in this conversation")


# The probe (tests/server/worker_probe.py) runs a job's bytes as plain Python: here, a worker
# that speaks the channel by hand, as a broken or hostile one would.
_PROBE_CHANNEL = "import gc\nfrom interlace.execution.channel import Channel\n" \
                 "ch = next(o for o in gc.get_objects() if isinstance(o, Channel))\n"


def test_parent_relays_bytes_and_stops_a_worker_that_breaks_the_conversation(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "server"))
    supervisor = WorkerSupervisor(WorkerSpec("probe", {}, entry="worker_probe"), DEFAULT_POLICY)
    try:
        relayed = _PROBE_CHANNEL + (
            'ch.send({"op": "local-start", "line": 5}, b"opaque values")\n'
            "header, body = ch.recv()\n"
            "result = [header, body.decode()]\n")
        client = RawPeer(BlockDone(b"opaque writes"))
        header, body = json.loads(supervisor.run(relayed.encode(), lambda line: None, local=client))
        # The parent passes bytes both ways unread (the worker and the client check them).
        assert client.sent == [(5, b"opaque values")]
        assert header == {"op": "local-msg", "msg": {"op": "done"}} and body == "opaque writes"
        pid = supervisor.worker.host_pid
        out_of_turn = _PROBE_CHANNEL + 'ch.send({"op": "local-reply"}, b"")\nch.recv()\n'
        with pytest.raises(JobFailed) as info:
            supervisor.run(out_of_turn.encode(), lambda line: None, local=client)
        assert info.value.category == "internal" and "malformed message" in info.value.traceback_text
        assert supervisor.worker is None or supervisor.worker.host_pid != pid  # replaced
    finally:
        supervisor.close()
