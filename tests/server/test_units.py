"""In-process checks of the server's parts (no HTTP)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

from interlace.contract.http import JobStatus
from interlace.server import versions
from interlace.server.auth import KeyStore
from interlace.server.db import Database
from interlace.server.events import EventHub
from interlace.server.results import ResultStore
from interlace.server.service import JobService
from interlace.server.settings import ServerSettings
from interlace.server.store import Event, JobStore
from interlace.testing import FakeRunner, fake_payload


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "interlace.db")
    yield database
    database.close()


def test_keys_are_stored_hashed_and_can_be_revoked(db):
    keys = KeyStore(db)
    key, info = keys.create("alice")
    assert key.startswith(f"il_{info.id}_")
    assert keys.verify(key).name == "alice"
    raw = sqlite3.connect(db.path).execute("SELECT * FROM api_keys").fetchall()
    assert key.split("_", 2)[2].encode() not in repr(raw).encode()
    assert keys.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert keys.verify("il_nothing") is None and keys.verify(None) is None
    assert keys.revoke(info.id) and not keys.revoke(info.id)
    assert keys.verify(key) is None
    other, _ = keys.create()
    assert keys.verify(other).name.startswith("user-")


def test_transitions_are_conditional(db):
    store = JobStore(db)
    events = store.create("j1", owner="a", key_id=None, model_key="m", payload_size=3, callback=None,
                          client_version=None, queue_position=1)
    assert [e.status for e in events] == ["RECEIVED", "QUEUED"]
    assert store.transition("j1", JobStatus.COMPLETED, expect=(JobStatus.RUNNING,)) is None
    running = store.transition("j1", JobStatus.RUNNING, expect=(JobStatus.QUEUED,))
    assert running.seq > events[-1].seq
    assert store.get("j1").status == "RUNNING"
    assert store.get_owned("j1", "b") is None
    for i in range(5):
        store.add_log("j1", f"l{i}", limit=2)
    logs = [e.description for e in store.events_after("j1") if e.status == "LOG"]
    assert logs[:2] == ["l0", "l1"] and "dropped" in logs[2] and len(logs) == 3
    assert store.latest_event("j1").status == "RUNNING"


@pytest.mark.parametrize("url", ["memory://interlace-test-results", None])
def test_result_store(tmp_path, url):
    store = ResultStore(url or str(tmp_path / "results"))
    store.put("a", b"x" * 600_000)
    assert store.exists("a") and store.size("a") == 600_000
    assert b"".join(store.iter_chunks("a")) == store.read("a") == b"x" * 600_000
    store.delete("a")
    store.delete("a")  # idempotent
    assert not store.exists("a")
    assert (store.local_path("a") is None) == bool(url)


def make_service(tmp_path, **settings):
    return JobService(ServerSettings(data_dir=tmp_path, **settings), FakeRunner(["fake"]))


def test_recovery_gives_up_on_jobs_that_keep_crashing_the_server(tmp_path):
    service = make_service(tmp_path, max_attempts=2)
    user = service.keys.verify(service.keys.create("a")[0])
    job_id, _ = service.accept(user, fake_payload(), callback=None, client_version=None)
    # Pretend the server died twice while running it.
    service.store.transition(job_id, JobStatus.RUNNING, attempts=2)
    lost_payload, _ = service.accept(user, fake_payload(), callback=None, client_version=None)
    (tmp_path / "payloads" / f"{lost_payload}.bin").unlink()
    service.db.close()

    restarted = make_service(tmp_path, max_attempts=2)
    restarted.recover()
    crashed = restarted.store.get(job_id)
    assert crashed.status == "ERROR" and crashed.error_category == "interrupted"
    assert "2 times" in crashed.description
    missing = restarted.store.get(lost_payload)
    assert missing.status == "ERROR" and "payload file is missing" in missing.description


def test_sweep_expires_finished_jobs(tmp_path):
    service = make_service(tmp_path, result_ttl=10)
    user = service.keys.verify(service.keys.create("a")[0])
    job_id, _ = service.accept(user, fake_payload(), callback=None, client_version=None)
    service.start()
    try:
        deadline = time.monotonic() + 60
        while (status := service.store.get(job_id).status) != "COMPLETED":
            assert status in {"RECEIVED", "QUEUED", "RUNNING"} and time.monotonic() < deadline, status
            time.sleep(0.01)
        assert service.results.exists(job_id)
        assert service.sweep() == 0
        assert service.sweep(now=service.store.get(job_id).expires_at + 1) == 1
        assert service.store.get(job_id).status == "EXPIRED" and not service.results.exists(job_id)
        assert [e.status for e in service.store.events_after(job_id)] == ["EXPIRED"]
    finally:
        service.stop()


def test_hub_subscriber_that_lags_is_told_to_catch_up():
    async def scenario():
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        sub = hub.subscribe("j")
        for i in range(1005):
            hub.publish(Event("j", "LOG", str(i), None, 0.0, i + 1))
        assert await sub.get() is None  # lagged: read the store instead
        sub.take_lag()
        hub.publish(Event("j", "COMPLETED", "", None, 0.0, 2000))
        assert (await sub.get()).seq == 2000
        hub.unsubscribe(sub)
        assert not hub.has_subscribers("j")

    asyncio.run(scenario())


def test_version_rule():
    assert versions.incompatibility("0.9.3", "0.1.0") is None
    assert versions.incompatibility(None) is None
    message = versions.incompatibility("1.0.0", "0.1.0")
    assert "1.0.0" in message and ">=0.0.0,<1.0.0" in message
    assert "Unreadable" in versions.incompatibility("banana", "0.1.0")


def test_config_file_and_env(tmp_path, monkeypatch):
    from interlace.config import Config, config_path

    monkeypatch.setenv("INTERLACE_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("INTERLACE_API_KEY", raising=False)
    monkeypatch.setenv("INTERLACE_HOST", "http://example:1")
    config = Config.load()
    assert config.API.HOST == "http://example:1" and config.API.APIKEY is None
    assert config.API.COMPRESS and config.APP.REMOTE_LOGGING and not config.APP.DEBUG
    path = config.set_default_api_key("il_x_y")
    assert path == config_path() and str(tmp_path) in str(path)
    stored = json.loads(path.read_text())
    assert stored["API"]["APIKEY"] == "il_x_y"
    assert stored["API"]["HOST"] != "http://example:1"  # env values are not frozen into the file
    monkeypatch.delenv("INTERLACE_HOST")
    assert Config.load().API.APIKEY == "il_x_y"
    monkeypatch.setenv("INTERLACE_API_KEY", "from-env")
    assert Config.load().API.APIKEY == "from-env"


def test_recovery_removes_orphan_payload_files(tmp_path):
    service = make_service(tmp_path)
    user = service.keys.verify(service.keys.create("a")[0])
    job_id, _ = service.accept(user, fake_payload(), callback=None, client_version=None)
    orphan = tmp_path / "payloads" / "never-committed.bin"
    orphan.write_bytes(b"x")
    (tmp_path / "payloads" / "half-written.tmp").write_bytes(b"x")
    service.recover()
    assert sorted(p.name for p in (tmp_path / "payloads").iterdir()) == [f"{job_id}.bin"]


def test_the_app_serves_the_protocols_paths(tmp_path):
    """The routes are the paths of `contract.http`, which the client uses too: one home."""
    from interlace.contract import http
    from interlace.server.app import create_app

    app = create_app(ServerSettings(data_dir=tmp_path), FakeRunner(["fake"]))
    app.state.service.db.close()
    routes = {(getattr(r, "path", None), frozenset(getattr(r, "methods", None) or {"WS"})) for r in app.routes}
    for path, method in [(http.INFO, "GET"), (http.POLICY, "GET"), (http.JOBS, "POST"), (http.JOBS, "GET"),
                         (http.JOB, "GET"), (http.JOB, "DELETE"), (http.JOB_EVENTS, "GET"), (http.JOB_RESULT, "GET"),
                         (http.JOB_EVENTS, "WS"), (http.MODEL_META.replace("}", ":path}"), "GET"),
                         (http.JOB_LOCAL, "GET"), (http.JOB_LOCAL, "POST")]:
        assert any(p == path and method in methods for p, methods in routes), (path, method)
    spec = app.openapi()
    after = [p["name"] for p in spec["paths"][http.JOB_EVENTS]["get"]["parameters"] if p["in"] == "query"]
    assert after == [http.AFTER_QUERY, http.LOCAL_QUERY]
    assert http.path(http.MODEL_META, model_key="org/model") == "/v1/models/org%2Fmodel/meta"
    assert http.path(http.JOB_EVENTS, job_id="3f2c") == "/v1/jobs/3f2c/events"


def test_auth_messages_name_the_header_and_the_fix():
    from interlace.contract.http import KEY_HEADER
    from interlace.server.auth import MSG_INVALID_KEY, MSG_MISSING_KEY

    for message in (MSG_MISSING_KEY, MSG_INVALID_KEY):
        assert KEY_HEADER in message and "interlace keys create --name" in message
