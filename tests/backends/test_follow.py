"""The sans-IO follow logic (`backends/follow.py`), driven by a scripted I/O object and a fake
clock: every decision (duplicates, reconnects, fallback to polling, backoff, giving up, the
deadline, the job's failure) without a server, once for the blocking driver and once for the
asyncio one, which must take the same steps."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

import interlace
from interlace.backends import follow as follow_module
from interlace.backends.display import JobStatusDisplay
from interlace.backends.follow import Follow, Head, arun, run
from interlace.errors import RemoteException, RemoteRequestError, ServerUnreachableError, WaitTimeout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(follow_module, "time", fake)
    return fake


class Script:
    """The I/O object: answers each step from `replies` (an exception is raised), in order,
    and records the steps taken. `pause` advances the fake clock, and so does each `receive`
    by `receive_takes` seconds."""

    def __init__(self, clock: Clock, replies: list[tuple[str, Any]], receive_takes: float = 0.0) -> None:
        self.clock = clock
        self.replies = list(replies)
        self.receive_takes = receive_takes
        self.taken: list[tuple[str, tuple[Any, ...]]] = []
        self.closed = False

    def _answer(self, action: str, *args: Any) -> Any:
        self.taken.append((action, args))
        if action == "pause":
            self.clock.now += args[0]
            return None
        if action == "receive":
            self.clock.now += self.receive_takes
        expected, reply = self.replies.pop(0)
        assert expected == action, f"step {len(self.taken)}: expected {expected}, got {action}{args}"
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def __getattr__(self, action: str) -> Any:
        return lambda *args: self._answer(action, *args)

    def close(self) -> None:
        self.closed = True


class AsyncScript(Script):
    def __getattr__(self, action: str) -> Any:
        async def step(*args: Any) -> Any:
            return self._answer(action, *args)
        return step

    async def close(self) -> None:
        self.closed = True


def event(seq: int | None, status: str, description: str = "", **extra: Any) -> str:
    return json.dumps({"id": "j", "seq": seq, "status": status, "description": description, **extra})


def polled(status: str, *events: str) -> dict[str, Any]:
    return {"status": {"id": "j", "status": status, "description": ""}, "events": [json.loads(e) for e in events]}


def display() -> JobStatusDisplay:
    return JobStatusDisplay(stream=io.StringIO(), inplace=False, color=False)


def make(**options: Any) -> Follow:
    return Follow("j", display(), **options)


@pytest.fixture(params=["blocking", "asyncio"])
def drive(request, clock):
    """drive(follow, replies) -> (what wait() returned, the script)."""

    def go(follow: Follow, replies: list[tuple[str, Any]], receive_takes: float = 0.0) -> tuple[Any, Script]:
        if request.param == "blocking":
            script = Script(clock, replies, receive_takes)
            try:
                return run(follow.wait(), script), script
            finally:
                assert script.closed
        script = AsyncScript(clock, replies, receive_takes)
        try:
            return asyncio.run(arun(follow.wait(), script)), script
        finally:
            assert script.closed

    return go


def actions(script: Script) -> list[str]:
    return [action for action, _ in script.taken]


def test_stream_to_completion_drops_repeated_events(drive):
    follow = make()
    data, script = drive(follow, [
        ("listen", None),
        ("receive", event(1, "RECEIVED")),
        ("receive", event(2, "QUEUED", "Next in the queue.")),
        ("receive", event(2, "QUEUED", "Next in the queue.")),  # a duplicate: not shown again
        ("receive", event(None, "QUEUED", "Position 1.")),  # transient: always shown
        ("receive", event(3, "COMPLETED", "Result ready.")),
        ("fetch", Head(200, 5, "OK")),
        ("read", b"bytes"),
    ])
    assert data == b"bytes"
    assert follow.final["status"] == "COMPLETED" and follow.last_seq == 3
    lines = follow.display.stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["RECEIVED", "QUEUED", "QUEUED", "COMPLETED"]


def test_a_stream_closed_early_reconnects_after_the_last_seen_event(drive):
    data, script = drive(make(), [
        ("listen", None),
        ("receive", event(1, "RUNNING")),
        ("receive", None),  # the server restarted
        ("poll", polled("RUNNING")),
        ("listen", None),
        ("receive", event(2, "COMPLETED")),
        ("fetch", Head(200, 1, "OK")),
        ("read", b"x"),
    ])
    assert data == b"x"
    listens = [args for action, args in script.taken if action == "listen"]
    assert listens == [(0,), (1,)]
    polls = [args for action, args in script.taken if action == "poll"]
    assert polls == [(1,)]


def test_failing_websockets_fall_back_to_polling_with_backoff(drive):
    refused = ConnectionRefusedError("no websocket here")
    replies = []
    for _ in range(3):  # three failures in a row while HTTP works
        replies += [("listen", refused), ("poll", polled("QUEUED"))]
    replies += [("poll", polled("RUNNING"))] * 4
    replies += [("poll", polled("COMPLETED", event(7, "LOG", "printed"))), ("fetch", Head(200, 2, "OK")), ("read", b"ok")]
    follow = make(backoff=(0.1, 0.4))
    data, script = drive(follow, replies)
    assert data == b"ok"
    assert actions(script).count("listen") == 3  # then polling for good
    # The pauses between polls double, up to the maximum.
    waits, current = [], 0.0
    for action, args in script.taken:
        if action == "pause":
            current += args[0]
        elif action == "poll" and current:
            waits.append(round(current, 6))
            current = 0.0
    assert waits == [0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4]
    assert "printed" in follow.display.stream.getvalue()


def test_a_server_down_is_retried_then_reported(drive):
    down = ServerUnreachableError("Could not reach the Interlace server")
    follow = make(reconnect_timeout=1.0, backoff=(0.1, 0.2), ws_failures_before_polling=0)
    with pytest.raises(ServerUnreachableError):
        drive(follow, [("poll", down)] * 20)


def test_a_server_back_up_in_time_is_followed_to_the_end(drive):
    down = ServerUnreachableError("Could not reach the Interlace server")
    follow = make(reconnect_timeout=1.0, backoff=(0.1, 0.2), ws_failures_before_polling=0)
    data, _ = drive(follow, [("poll", down)] * 4 + [("poll", polled("COMPLETED")), ("fetch", Head(200, 1, "OK")),
                                                    ("read", b"x")])
    assert data == b"x"


def test_the_deadline_ends_waiting_but_not_the_job(drive, clock):
    follow = make(deadline=clock.now + 0.5)
    replies = [("listen", None)] + [("receive", TimeoutError())] * 3  # each waits 0.2 s in vain
    with pytest.raises(WaitTimeout, match="keeps running on the server") as info:
        drive(follow, replies, receive_takes=0.2)
    assert "RemoteClient().job('j').wait()" in str(info.value)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, interlace.InterlaceError)


def test_the_receive_timeout_follows_the_display_and_the_deadline(clock):
    quiet = Follow("j", JobStatusDisplay(enabled=False))
    assert quiet._receive_timeout() is None  # nothing to animate: block until a message
    shown = Follow("j", display(), tick=0.1)
    assert shown._receive_timeout() == 0.1
    soon = Follow("j", JobStatusDisplay(enabled=False), deadline=clock.now + 0.03)
    assert soon._receive_timeout() == pytest.approx(0.03)


def test_a_refused_stream_is_not_retried(drive):
    refusal = json.dumps({"error": "The API key is unknown or revoked.", "code": 401})
    with pytest.raises(RemoteRequestError) as info:
        drive(make(), [("listen", None), ("receive", refusal)])
    assert info.value.status_code == 401 and "revoked" in str(info.value)


@pytest.mark.parametrize("final, error, text", [
    (event(4, "ERROR", "Traceback ... IndexError: list index out of range", error_category="IndexError"),
     IndexError, "IndexError"),
    (event(4, "CANCELLED"), RemoteException, "was cancelled"),
    (event(4, "EXPIRED", "The result expired."), RemoteRequestError, "expired"),
])
def test_a_job_that_ends_without_a_result_raises(drive, final, error, text):
    with pytest.raises(error, match=text) as info:
        drive(make(), [("listen", None), ("receive", final)])
    assert isinstance(info.value, interlace.InterlaceError)
    if isinstance(info.value, RemoteException):
        assert info.value.job_id == "j"


def test_an_error_event_shows_no_traceback_in_the_status_line(drive):
    follow = make()
    with pytest.raises(RemoteException):
        drive(follow, [("listen", None), ("receive", event(1, "ERROR", "Traceback (most recent call last)"))])
    assert "Traceback" not in follow.display.stream.getvalue()


def test_a_refused_download_says_why(drive):
    body = json.dumps({"detail": "Job j ended in ERROR and has no result."}).encode()
    with pytest.raises(RemoteRequestError, match="no result") as info:
        drive(make(), [("listen", None), ("receive", event(1, "COMPLETED")), ("fetch", Head(409, 0, "Conflict")),
                       ("read", body)])
    assert info.value.status_code == 409


def test_a_large_result_is_read_in_chunks(drive):
    size = follow_module.PROGRESS_MIN_BYTES + 10
    parts = [b"a" * (size - 10), b"b" * 10]
    data, script = drive(make(), [("listen", None), ("receive", event(1, "COMPLETED")), ("fetch", Head(200, size, "OK")),
                                  ("chunk", parts[0]), ("chunk", parts[1]), ("chunk", b"")])
    assert data == b"".join(parts)
    assert "read" not in actions(script)


def test_refusal_reads_detail_and_problems_or_falls_back_to_the_text():
    body = json.dumps({"detail": "2 problems", "problems": [{"message": "bad", "filename": "f.py", "lineno": 3}]})
    error = follow_module.refusal(422, body.encode(), "Unprocessable")
    assert error.status_code == 422 and error.problems[0]["message"] == "bad" and "f.py:3: bad" in str(error)
    assert follow_module.refusal(502, b"<html>Bad gateway</html>", "Bad Gateway").detail == "<html>Bad gateway</html>"
    assert follow_module.refusal(503, b"", "Service Unavailable").detail == "Service Unavailable"
