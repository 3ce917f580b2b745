"""Local blocks over HTTP: the server's side (STREAM events, `GET/POST /v1/jobs/{id}/local/{n}`,
the per-block limit and the grace period) and the client's driver (`Job.wait(local=runner)`),
against a real server whose fake runner scripts the job's side of a block (`FakeRunner`'s
`local` spec: it starts the block, answers each read `value of <path>.<kind>`, and reports
what the client sent back)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest
from websockets.sync.client import connect

from interlace import RemoteException
from interlace._version import __version__
from interlace.backends.client import RemoteClient
from interlace.backends.follow import LocalBlockUnserved
from interlace.contract.local_block import (
    CATEGORY_CLIENT_GONE,
    CATEGORY_RAISED,
    CATEGORY_TIMEOUT,
    BlockDone,
    BlockFailed,
    ReadRequest,
)
from interlace.contract.policy import Policy
from interlace.server.local_exchange import INLINE_VALUES_BYTES
from interlace.testing import ServerProcess, ThreadedServer, decode_fake_result, fake_payload

LONG = 120.0  # a limit a test does not reach


def headers(key: str) -> dict[str, str]:
    return {"X-Interlace-Key": key, "X-Interlace-Version": __version__}


def served(tmp_path, *, block: float = LONG, grace: float = LONG, **policy) -> ThreadedServer:
    return ThreadedServer(tmp_path / "data", models=["fake", "other"],
                          policy=Policy(local_block_seconds=block, local_grace_seconds=grace, **policy))


_open: list = []  # clients a test made, closed after it (no unclosed sockets left for the GC)


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _open:
        _open.pop().close()


def remote_client(server) -> RemoteClient:
    client = RemoteClient(server.url, server.create_key("alice"))
    _open.append(client)
    return client


class Client:
    """Raw HTTP for one user of a test server."""

    def __init__(self, server, name: str = "alice") -> None:
        self.server = server
        self.key = server.create_key(name)
        self.http = httpx.Client(base_url=server.url, headers=headers(self.key), timeout=30)
        _open.append(self.http)

    def submit(self, **spec) -> str:
        answer = self.http.post("/v1/jobs", content=fake_payload(**spec))
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    def status(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def local(self, job_id: str, n, op: str | None = None, body: bytes | dict = b"") -> httpx.Response:
        url = f"/v1/jobs/{job_id}/local/{n}"
        if op is None:
            return self.http.get(url)
        content = json.dumps(body).encode() if isinstance(body, dict) else body
        return self.http.post(url, content=content, headers={"X-Interlace-Local": op})

    def wait_for(self, job_id: str, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(job_id)
            if predicate(status):
                return status
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} never got there: {status}")

    def finished(self, job_id: str) -> dict:
        return self.wait_for(job_id, lambda s: s["status"] in ("COMPLETED", "ERROR"))

    def ws(self, job_id: str, serves_local: bool = True):
        """The job's event stream; `serves_local`: as a client that runs its local blocks (`?local=1`)."""
        url = f"{self.server.url.replace('http', 'ws')}/v1/jobs/{job_id}/events" + ("?local=1" if serves_local else "")
        return connect(url, additional_headers=headers(self.key), open_timeout=30)


def next_stream(ws, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if event["status"] == "STREAM":
            return event
        assert event["status"] not in ("COMPLETED", "ERROR"), event


def test_stream_event_and_a_read_then_done_round_trip(tmp_path):
    with served(tmp_path) as server:
        alice = Client(server)
        job = alice.submit(local=[{"line": 7, "values": "down"}])
        with alice.ws(job) as ws:
            event = next_stream(ws)
        # Over the WebSocket: a transient event naming the block; in the polled status too.
        assert event["exchange"] == 1 and event["line"] == 7 and event["seq"] is None
        assert "line 7" in event["description"]
        assert base64.b64decode(event["values"]) == b"down"  # small values ride along
        assert alice.status(job)["local_block"] == {"exchange": 1, "line": 7}
        values = alice.local(job, 1)
        assert values.status_code == 200 and values.content == b"down"
        answer = alice.local(job, 1, "read", {"path": "model.layers.0", "kind": "output"})
        assert answer.status_code == 200 and answer.content == b"value of model.layers.0.output"
        assert alice.local(job, 1, "done", b"up").status_code == 204
        assert alice.finished(job)["status"] == "COMPLETED"
        result = decode_fake_result(alice.http.get(f"/v1/jobs/{job}/result").content)
        assert result["local"] == [{"line": 7, "reads": ["model.layers.0.output"], "values": "up"}]
        # Served once: the exchange is over, and the job says so.
        late = alice.local(job, 1, "done", b"again")
        assert late.status_code == 409 and "ended" in late.json()["detail"]
        assert alice.status(job)["local_block"] is None


def test_several_blocks_are_numbered_and_a_failed_block_fails_the_job(tmp_path):
    with served(tmp_path) as server:
        alice = Client(server)
        job = alice.submit(local=[3, 9])
        alice.wait_for(job, lambda s: s["local_block"] == {"exchange": 1, "line": 3})
        assert alice.local(job, 1, "done", b"").status_code == 204
        alice.wait_for(job, lambda s: s["local_block"] == {"exchange": 2, "line": 9})
        assert alice.local(job, 1, "done", b"").status_code == 409  # an earlier block is over
        failed = alice.local(job, 2, "failed", {"text": "ZeroDivisionError: in my block", "category": CATEGORY_RAISED})
        assert failed.status_code == 204
        status = alice.finished(job)
        assert status["status"] == "ERROR" and status["error_category"] == CATEGORY_RAISED
        assert "in my block" in status["description"]


def test_only_the_owner_reaches_a_block_and_bad_messages_are_named(tmp_path):
    with served(tmp_path, max_upload_bytes=64 * 1024) as server:
        alice, bob = Client(server), Client(server, "bob")
        job = alice.submit(local=[5])
        alice.wait_for(job, lambda s: s["local_block"] is not None)
        assert bob.local(job, 1).status_code == 404
        assert bob.local(job, 1, "done", b"").status_code == 404
        assert httpx.get(f"{server.url}/v1/jobs/{job}/local/1").status_code == 401
        cases = [
            (alice.local(job, "one"), 400, "whole number"),
            (alice.local(job, 2), 404, "no local block number 2"),
            (alice.local(job, 1, "shout", b""), 400, "X-Interlace-Local"),
            (alice.local(job, 1, "read", b"not json"), 400, "not JSON"),
            (alice.local(job, 1, "read", {"path": "model.x", "kind": "grad"}), 400, "output"),
            (alice.local(job, 1, "failed", {"text": "x", "category": "user"}), 400, "local-block"),
            (alice.local(job, 1, "done", b"x" * (65 * 1024)), 413, "--max-upload-mb"),
        ]
        for answer, status, words in cases:
            assert answer.status_code == status, answer.text
            assert words in answer.json()["detail"], answer.text
        # None of it touched the block: it still answers.
        assert alice.local(job, 1, "done", b"fine").status_code == 204
        assert alice.finished(job)["status"] == "COMPLETED"


def test_a_block_past_its_limit_fails_the_job(tmp_path):
    with served(tmp_path, block=0.5) as server:
        alice = Client(server)
        job = alice.submit(local=[4])
        with alice.ws(job) as ws:  # watched all along: only the block's own limit applies
            next_stream(ws)
            status = alice.finished(job)
        assert status["status"] == "ERROR" and status["error_category"] == CATEGORY_TIMEOUT
        assert "line 4" in status["description"] and "--local-block-timeout" in status["description"]
        late = alice.local(job, 1, "done", b"")
        assert late.status_code == 409


def test_no_client_for_the_grace_period_fails_the_job(tmp_path):
    with served(tmp_path, grace=0.5) as server:
        alice = Client(server)
        job = alice.submit(local=[6])
        # Watching without running the blocks (a plain poll, a plain stream) does not count ...
        with alice.ws(job, serves_local=False) as ws:
            next_stream(ws)
            status = alice.wait_for(job, lambda s: s["status"] == "ERROR")
        assert status["error_category"] == CATEGORY_CLIENT_GONE
        assert "line 6" in status["description"] and "--local-grace" in status["description"]
        # ... a poll of a client that runs them (`?local=1`) does.
        job = alice.submit(local=[6])
        alice.wait_for(job, lambda s: s["local_block"] is not None)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            assert alice.http.get(f"/v1/jobs/{job}/events", params={"local": 1}).json()["status"]["status"] == "RUNNING"
            time.sleep(0.1)
        assert alice.local(job, 1, "done", b"").status_code == 204
        assert alice.finished(job)["status"] == "COMPLETED"


def test_a_client_that_comes_back_within_the_grace_period_goes_on(tmp_path):
    with served(tmp_path, grace=3.0) as server:
        alice = Client(server)
        job = alice.submit(local=[{"line": 8, "values": "v"}])
        with alice.ws(job) as ws:
            first = next_stream(ws)
        time.sleep(1.0)  # gone for a while, nobody asking
        with alice.ws(job) as ws:  # re-attached: the STREAM event is announced again
            again = next_stream(ws)
            assert again["exchange"] == first["exchange"] == 1
            assert alice.local(job, 1).content == b"v"
            assert alice.local(job, 1, "done", b"back").status_code == 204
        status = alice.finished(job)
        assert status["status"] == "COMPLETED"


def test_a_waiting_block_pauses_only_its_own_model(tmp_path):
    with served(tmp_path) as server:
        alice = Client(server)
        waiting = alice.submit(local=[2])
        alice.wait_for(waiting, lambda s: s["local_block"] is not None)
        other = alice.submit(model_key="other", echo="meanwhile")
        assert alice.finished(other)["status"] == "COMPLETED"
        assert alice.status(waiting)["status"] == "RUNNING"
        assert alice.local(waiting, 1, "done", b"").status_code == 204
        assert alice.finished(waiting)["status"] == "COMPLETED"


def test_limits_come_from_the_serve_flags(tmp_path):
    args = ["--local-grace", "0.5", "--local-block-timeout", "7"]
    with ServerProcess(tmp_path / "data", args=args) as server:
        policy = httpx.get(f"{server.url}/v1/policy").json()
        assert policy["local_grace_seconds"] == 0.5 and policy["local_block_seconds"] == 7
        alice = httpx.Client(base_url=server.url, headers=headers(server.create_key("alice")), timeout=30)
        _open.append(alice)
        job = alice.post("/v1/jobs", content=fake_payload(local=[3])).json()["id"]
        time.sleep(2.5)
        status = alice.get(f"/v1/jobs/{job}").json()
        assert status["status"] == "ERROR" and status["error_category"] == CATEGORY_CLIENT_GONE


# -- the client's driver -------------------------------------------------------------------------


class ScriptedRunner:
    """A `LocalPeer` standing in for `LocalBlockRunner`: reads `model.layers.0.output` once, then
    sends back what it read, or fails with `failure`."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.calls: list[tuple] = []
        self.failure: Exception | None = None
        self._fail_with = failure

    def start(self, line: int, values: bytes):
        self.calls.append(("start", line, values))
        return ReadRequest("model.layers.0", "output")

    def reply(self, value: bytes):
        self.calls.append(("reply", value))
        if self._fail_with is not None:
            self.failure = self._fail_with
            return BlockFailed(f"Traceback ...\n{self._fail_with!r}", CATEGORY_RAISED)
        return BlockDone(b"sent back " + value)


def test_the_client_serves_its_blocks_while_it_waits(tmp_path):
    big = "b" * (INLINE_VALUES_BYTES + 1)  # too large to ride in the event: fetched
    with served(tmp_path) as server:
        client = remote_client(server)
        runner = ScriptedRunner()
        job = client.submit(fake_payload(local=[{"line": 3, "values": "a"}, {"line": 5, "values": big}]))
        result = decode_fake_result(job.wait(display=False, local=runner))
        assert [c[0] for c in runner.calls] == ["start", "reply", "start", "reply"]
        assert runner.calls[0] == ("start", 3, b"a") and runner.calls[2] == ("start", 5, big.encode())
        assert [b["values"] for b in result["local"]] == ["sent back value of model.layers.0.output"] * 2


def test_a_streamed_job_is_not_slowed_by_the_request_rate_limit(tmp_path):
    # Twenty blocks answered under a limit of 5 requests a minute: the messages a job waits
    # for are not counted (its own pace bounds them), the other requests are.
    with served(tmp_path, requests_per_minute=5) as server:
        client = remote_client(server)
        started = time.monotonic()
        job = client.submit(fake_payload(local=list(range(1, 21))))
        result = decode_fake_result(job.wait(display=False, local=ScriptedRunner()))
        assert len(result["local"]) == 20 and time.monotonic() - started < 10
        alice = Client(server, "mallory")
        answers = [alice.local(job.id, 1, "done", b"") for _ in range(7)]
        assert answers[-1].status_code == 429  # refused ones count


def test_the_polling_client_serves_its_blocks_too(tmp_path):
    with served(tmp_path) as server:
        client = remote_client(server)
        client.WS_FAILURES_BEFORE_POLLING = 0  # poll from the start
        runner = ScriptedRunner()
        job = client.submit(fake_payload(local=[4]))
        result = decode_fake_result(job.wait(display=False, local=runner))
        assert result["local"][0]["reads"] == ["model.layers.0.output"]


def test_the_asyncio_client_serves_its_blocks(tmp_path):
    with served(tmp_path) as server:
        client = remote_client(server)
        runner = ScriptedRunner()

        async def main():
            try:
                job = await client.asubmit(fake_payload(local=[2]))
                return await job.await_result(display=False, local=runner)
            finally:
                await client.aclose()

        result = decode_fake_result(asyncio.run(main()))
        assert result["local"][0]["values"] == "sent back value of model.layers.0.output"


def test_a_block_that_raised_here_raises_that_exception(tmp_path):
    with served(tmp_path) as server:
        client = remote_client(server)
        mine = ZeroDivisionError("from my block")
        job = client.submit(fake_payload(local=[3]))
        with pytest.raises(ZeroDivisionError) as info:
            job.wait(display=False, local=ScriptedRunner(failure=mine))
        assert info.value is mine


def test_a_reattached_client_without_the_runner_says_it_cannot_serve(tmp_path):
    with served(tmp_path, grace=0.5) as server:
        job = remote_client(server).submit(fake_payload(local=[11]))
        again = remote_client(server).job(job.id)
        with pytest.warns(LocalBlockUnserved, match="line 11"):
            with pytest.raises(RemoteException) as info:
                # Following without serving: the client gives up after the grace period, as
                # no one answers.
                again.wait(display=False)
        assert info.value.category == CATEGORY_CLIENT_GONE


def test_an_exchange_is_served_once_however_often_it_is_announced():
    """Sans-IO: a reconnect replays the STREAM event, a poll shows the block again: one serve."""
    from interlace.backends.display import JobStatusDisplay
    from interlace.backends.follow import Follow, Head, run

    stream = json.dumps({"id": "j", "seq": None, "status": "STREAM", "description": "", "exchange": 1, "line": 4,
                         "values": base64.b64encode(b"v").decode()})
    replies = [
        ("listen", None), ("receive", json.dumps({"id": "j", "seq": 1, "status": "RUNNING"})),
        ("receive", stream), ("local", None),
        ("receive", None),  # the stream closed: a poll, then reconnect
        ("poll", {"status": {"id": "j", "status": "RUNNING", "local_block": {"exchange": 1, "line": 4}},
                  "events": []}),  # shown again in the status: not served again
        ("listen", None), ("receive", stream),  # announced again on connect: not served again
        ("receive", json.dumps({"id": "j", "seq": 2, "status": "COMPLETED"})),
        ("fetch", Head(200, 2, "OK")), ("read", b"ok"),
    ]
    taken = []

    class Script:
        def __getattr__(self, action):
            def step(*args):
                if action == "pause":
                    return time.sleep(args[0])
                taken.append((action, args))
                expected, reply = replies.pop(0)
                assert expected == action, (expected, action)
                return reply
            return step

        def close(self):
            pass

    runner = ScriptedRunner()
    follow = Follow("j", JobStatusDisplay(enabled=False), local=runner)
    assert run(follow.wait(), Script()) == b"ok"
    served_steps = [args for action, args in taken if action == "local"]
    assert served_steps == [(1, 4, runner, b"v")]
