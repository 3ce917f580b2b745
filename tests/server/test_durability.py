"""The server never loses a job: kill -9 and restart; results expire on schedule."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from interlace._version import __version__
from interlace.backends.client import RemoteClient, RemoteRequestError
from interlace.testing import Gate, ServerProcess, ThreadedServer, decode_fake_result, fake_payload


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_kill_9_loses_no_job(tmp_path):
    server = ServerProcess(tmp_path / "data", models=["fake", "other"]).start()
    try:
        key = server.create_key("alice")
        client = RemoteClient(server.url, key, reconnect_timeout=30)
        # Gates, not sleeps: both jobs are certainly still running when the server dies.
        gate, never = Gate(tmp_path, "gate"), Gate(tmp_path, "never-opened")
        running = client.submit(fake_payload(hold=gate.path, echo="first"))
        queued = [client.submit(fake_payload(echo=i, log=[f"line {i}"])) for i in range(3)]
        doomed_running = client.submit(fake_payload("other", hold=never.path))
        doomed_queued = client.submit(fake_payload("other", echo="never"))
        wait_for(lambda: running.status()["status"] == "RUNNING")
        wait_for(lambda: doomed_running.status()["status"] == "RUNNING")

        # A client waiting on a queued job, across the crash.
        got: dict = {}

        def waiter():
            try:
                got["result"] = RemoteClient(server.url, key, reconnect_timeout=30).job(queued[1].id).wait(display=False)
            except Exception as exc:  # reported below
                got["error"] = exc

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.2)
        server.kill()
        gate.open()  # the rerun after the restart finishes at once
        # Restart without the "other" model: its jobs must end in a clear ERROR, not vanish.
        server.models = ["fake"]
        server.start()

        thread.join(30)
        assert "error" not in got, got.get("error")
        assert decode_fake_result(got["result"])["echo"] == 1
        assert decode_fake_result(running.result(timeout=15))["echo"] == "first"
        for i, job in enumerate(queued):
            assert decode_fake_result(job.result(timeout=15))["echo"] == i
        assert running.status()["attempts"] == 2  # interrupted once, run again
        for job in (doomed_running, doomed_queued):
            status = job.status()
            assert status["status"] == "ERROR"
            assert "can no longer run" in status["description"] and "'other'" in status["description"]
        listed = {j["id"]: j["status"] for j in client.jobs()}
        assert len(listed) == 6
        # The log line printed during the rerun is in the job's history.
        events = httpx.get(f"{server.url}/v1/jobs/{queued[2].id}/events",
                           headers={"X-Interlace-Key": key, "X-Interlace-Version": __version__}).json()["events"]
        assert [e["description"] for e in events if e["status"] == "LOG"] == ["line 2"]
        assert "Requeued after a server restart" in " ".join(e["description"] for e in events)
    finally:
        server.stop()


def test_results_expire(tmp_path):
    with ThreadedServer(tmp_path / "data", result_ttl=1, sweep_interval=0.2) as server:
        key = server.create_key()
        client = RemoteClient(server.url, key)
        job = client.submit(fake_payload(echo="soon gone"))
        assert decode_fake_result(job.result(timeout=10))["echo"] == "soon gone"
        result_file = tmp_path / "data" / "results" / f"{job.id}.bin"
        assert result_file.exists()
        wait_for(lambda: job.status()["status"] == "EXPIRED", timeout=10)
        assert not result_file.exists()
        with pytest.raises(RemoteRequestError) as info:
            job.result(timeout=10)
        assert info.value.status_code == 410 and "expired" in str(info.value)
        response = client.http.get(f"/v1/jobs/{job.id}/result")
        assert response.status_code == 410


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_result_store_url(tmp_path, scheme):
    url = f"memory://results-{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path / 'elsewhere'}"
    with ThreadedServer(tmp_path / "data", result_store=url) as server:
        client = RemoteClient(server.url, server.create_key())
        job = client.submit(fake_payload(echo=scheme, random_bytes=1_200_000))
        assert decode_fake_result(job.result(timeout=10))["echo"] == scheme
    assert not (tmp_path / "data" / "results").exists()
    if scheme == "file":
        assert (tmp_path / "elsewhere" / f"{job.id}.bin").exists()
