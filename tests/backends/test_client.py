"""RemoteClient and Job against a real server process (fake runner)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

import pytest

import interlace
from interlace import cli
from interlace.backends import client as client_module
from interlace.backends.client import (
    RemoteClient,
    RemoteException,
    RemoteRequestError,
    ServerUnreachableError,
    WaitTimeout,
    fetch_policy,
)
from interlace.backends.display import JobStatusDisplay
from interlace.testing import Gate, ServerProcess, decode_fake_result, fake_payload, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("client")) as proc:
        proc.key = proc.create_key("alice")
        yield proc


@pytest.fixture
def client(server):
    with RemoteClient(server.url, server.key) as remote:
        yield remote


def plain_display():
    return JobStatusDisplay(stream=io.StringIO(), inplace=False, color=False)


def test_submit_and_wait_shows_statuses(client):
    display = plain_display()
    data = client.submit(fake_payload(echo=[1, 2], log=["printed on the server"])).wait(display=display)
    assert decode_fake_result(data)["echo"] == [1, 2]
    lines = display.stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["RECEIVED", "QUEUED", "RUNNING", "LOG", "COMPLETED"]
    assert "printed on the server" in lines[3]


def test_a_client_dropped_without_close_releases_its_connections(server):
    """`RemoteClient(...).info()` and `RemoteClient().job(id).result()` are documented uses;
    the client's keep-alive socket goes with it instead of being reported unclosed."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remote = RemoteClient(server.url, server.key)
        assert remote.info()  # opens a keep-alive connection
        del remote
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_host_and_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("INTERLACE_HOST", server.url)
    monkeypatch.setenv("INTERLACE_API_KEY", server.key)
    remote = RemoteClient()
    assert remote.host == server.url and remote.ws_host.startswith("ws://")
    assert decode_fake_result(remote.submit(fake_payload(echo=3)).result(timeout=10))["echo"] == 3


def test_non_blocking_submit_then_reattach_from_another_process(client, server, tmp_path):
    gate = Gate(tmp_path)
    job = client.submit(fake_payload(echo="later", hold=gate.path))
    assert job.status()["status"] in {"QUEUED", "RUNNING"}
    gate.open()
    code = (
        "import sys; from interlace.backends.client import RemoteClient;"
        "from interlace.testing import decode_fake_result;"
        f"sys.stdout.write(decode_fake_result(RemoteClient({server.url!r}, {server.key!r}).job({job.id!r}).result(timeout=20))['echo'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "later"
    fresh = RemoteClient(server.url, server.key).job(job.id)
    assert fresh.status()["status"] == "COMPLETED"
    assert decode_fake_result(fresh.result())["echo"] == "later"


def test_async_api(server):
    async def scenario():
        async with RemoteClient(server.url, server.key) as remote:
            jobs = [await remote.asubmit(fake_payload(echo=i)) for i in range(4)]
            results = await asyncio.gather(*(job.await_result(display=False, timeout=10) for job in jobs))
            assert [decode_fake_result(r)["echo"] for r in results] == [0, 1, 2, 3]
            assert (await jobs[0].astatus())["status"] == "COMPLETED"
            failing = await remote.asubmit(fake_payload(fail="KeyError: 'x'"))
            with pytest.raises(RemoteException, match="KeyError"):
                await failing.await_result(display=False, timeout=10)

    asyncio.run(scenario())


def test_failed_job_raises_remote_exception(client):
    display = plain_display()
    with pytest.raises(RemoteException) as info:
        client.submit(fake_payload(fail="ZeroDivisionError: division by zero")).wait(display=display)
    assert "ZeroDivisionError" in str(info.value) and info.value.category == "user"
    assert "ERROR" in display.stream.getvalue()


def test_connection_error_names_host_and_fix():
    remote = RemoteClient(f"http://127.0.0.1:{free_port()}", "il_x_y")
    with pytest.raises(ConnectionError) as info:
        remote.submit(b"{}")
    assert remote.host in str(info.value) and "interlace serve" in str(info.value)
    assert isinstance(info.value, ServerUnreachableError) and isinstance(info.value, interlace.InterlaceError)


def test_interlace_error_catches_a_failed_job_and_a_refused_request(client, server):
    caught = []
    for attempt in (
        lambda: client.submit(fake_payload(fail="IndexError: list index out of range")).result(timeout=10),
        lambda: RemoteClient(server.url, "il_bad_key").submit(fake_payload()),
        lambda: client.submit(b'{"sleep": "x"}'),
    ):
        try:
            attempt()
        except interlace.InterlaceError as error:
            caught.append(error)
    assert [type(e).__name__ for e in caught] == ["RemoteException", "RemoteRequestError", "RemoteRequestError"]
    assert isinstance(caught[0], interlace.RemoteException)
    assert [e.status_code for e in caught[1:]] == [401, 422]


def test_bad_key_and_version_are_explained(server, monkeypatch):
    with pytest.raises(RemoteRequestError) as info:
        RemoteClient(server.url, "il_bad_key").submit(fake_payload())
    assert info.value.status_code == 401 and "interlace keys create" in str(info.value)
    monkeypatch.setattr(client_module, "__version__", "5.0.0")
    with pytest.raises(RemoteRequestError) as info:
        RemoteClient(server.url, server.key).submit(fake_payload())
    assert info.value.status_code == 426 and ">=0.0.0,<1.0.0" in str(info.value)


def test_validation_problems_are_listed(client):
    with pytest.raises(RemoteRequestError) as info:
        client.submit(b'{"sleep": "x"}')
    assert info.value.status_code == 422 and len(info.value.problems) == 2
    assert "model_key must be a string" in str(info.value)


def test_wait_timeout_leaves_job_running(client, tmp_path):
    gate = Gate(tmp_path)
    job = client.submit(fake_payload(hold=gate.path, echo="slow"))
    with pytest.raises(WaitTimeout, match="keeps running"):
        job.wait(display=False, timeout=0.1)
    assert job.status()["status"] in {"QUEUED", "RUNNING"}
    gate.open()
    assert decode_fake_result(job.result(timeout=10))["echo"] == "slow"


def test_cancel(client, tmp_path):
    gate = Gate(tmp_path)
    blocker = client.submit(fake_payload(hold=gate.path))
    queued = client.submit(fake_payload())
    assert queued.cancel()["status"] == "CANCELLED"
    with pytest.raises(RemoteException, match="cancelled"):
        queued.result(timeout=10)
    gate.open()
    blocker.result(timeout=10)


def test_large_result_streams_with_progress_bar(client):
    display = JobStatusDisplay(stream=io.StringIO(), inplace=True, color=False)
    data = client.submit(fake_payload(random_bytes=1_500_000)).wait(display=display)
    assert len(decode_fake_result(data)["random"]) == 2_000_000
    assert "Downloading" in display.stream.getvalue()


def test_falls_back_to_polling_when_websockets_fail(client):
    client.ws_host = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    client.BACKOFF_MAX = 0.2
    display = plain_display()
    data = client.submit(fake_payload(echo="polled", log=["still logged"])).wait(display=display, timeout=10)
    assert decode_fake_result(data)["echo"] == "polled"
    assert "still logged" in display.stream.getvalue()


def test_cli_env_reports_server(server, monkeypatch, capsys):
    monkeypatch.setenv("INTERLACE_HOST", server.url)
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "Interlace" in out and "models: fake" in out and '"runner": "fake"' in out


def test_shared_client_is_reused(server):
    from interlace.backends.client import shared_client

    first = shared_client(server.url, server.key)
    assert shared_client(server.url, server.key) is first
    assert shared_client(server.url, "il_other_key") is not first
    assert first.policy(cached=True) is first.policy(cached=True)


def test_fetch_policy_asks_the_shared_client_once(server):
    policy = fetch_policy(server.url, server.key)
    assert policy is not None and policy["runner"] == "fake"
    assert fetch_policy(server.url, server.key) is policy  # cached by the host's shared client
    assert client_module.shared_client(server.url, server.key).policy(cached=True) is policy


def test_fetch_policy_is_none_without_a_server_and_asks_once(monkeypatch):
    host = f"http://127.0.0.1:{free_port()}"
    assert fetch_policy(host, timeout=0.2) is None
    asked = []
    monkeypatch.setattr(RemoteClient, "policy", lambda self, **kw: asked.append(kw))
    assert fetch_policy(host, timeout=0.2) is None and asked == []  # the silence is remembered
    assert fetch_policy("not-a-url") is None
