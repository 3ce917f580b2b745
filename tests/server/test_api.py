"""The HTTP/WebSocket API against a real server process (fake runner)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from websockets.sync.client import connect
from http.server import BaseHTTPRequestHandler, HTTPServer

from interlace._version import __version__
from interlace.testing import Gate, decode_fake_result, fake_payload


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


def headers(key):
    return {"X-Interlace-Key": key, "X-Interlace-Version": __version__}


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def submit(api, key, **spec):
    response = api.post("/v1/jobs", content=fake_payload(**spec), headers=headers(key))
    assert response.status_code == 202, response.text
    return response.json()


def events(server, job_id, key, after=0, in_first_message=False, on_first=None):
    """Every event until the server closes the stream; `on_first()` runs once the first has
    arrived (the server subscribes before it replays, so nothing later can be missed)."""
    url = f"{server.url.replace('http', 'ws')}/v1/jobs/{job_id}/events?after={after}"
    out = []
    with connect(url, additional_headers={} if in_first_message else headers(key), open_timeout=30) as ws:
        if in_first_message:
            ws.send(json.dumps({"key": key, "version": __version__}))
        while True:
            try:
                out.append(json.loads(ws.recv(timeout=60)))
            except Exception:  # closed by the server after the final status
                return out
            if on_first is not None and len(out) == 1:
                on_first()


def test_submit_poll_result(server, api):
    accepted = submit(api, server.alice, echo={"x": 1})
    assert accepted["status"] == "QUEUED" and accepted["queue_position"] >= 1
    done = events(server, accepted["id"], server.alice)
    assert done[-1]["status"] == "COMPLETED"
    status = api.get(f"/v1/jobs/{accepted['id']}", headers=headers(server.alice)).json()
    assert status["status"] == "COMPLETED" and status["model_key"] == "fake" and status["result_size"] > 0
    result = api.get(f"/v1/jobs/{accepted['id']}/result", headers=headers(server.alice))
    assert result.status_code == 200
    assert int(result.headers["content-length"]) == len(result.content) == status["result_size"]
    assert decode_fake_result(result.content)["echo"] == {"x": 1}


def test_status_sequence_over_websocket(server, api, tmp_path):
    gate = Gate(tmp_path)
    blocker = submit(api, server.alice, hold=gate.path)
    ahead = submit(api, server.alice)
    job = submit(api, server.alice, log=["hello", "world"], echo=2)
    # Positions count waiting jobs (1 = next to run).
    assert job["queue_position"] == ahead["queue_position"] + 1
    # The blocker runs until the watcher is connected, so its queue moves are seen live.
    seen = events(server, job["id"], server.alice, in_first_message=True, on_first=gate.open)
    statuses = [e["status"] for e in seen]
    # RECEIVED and QUEUED are replayed from the store, the rest arrive live.
    assert statuses[:2] == ["RECEIVED", "QUEUED"]
    assert statuses[-4:] == ["RUNNING", "LOG", "LOG", "COMPLETED"]
    assert seen[1]["queue_position"] == job["queue_position"]
    # While waiting, the watcher hears its position change when the jobs ahead start.
    positions = [e["queue_position"] for e in seen if e["status"] == "QUEUED"]
    assert positions[0] == job["queue_position"] and positions[-1] == 1
    assert [e["description"] for e in seen if e["status"] == "LOG"] == ["hello", "world"]
    stored = [e["seq"] for e in seen if e["seq"] is not None]
    assert stored == sorted(set(stored))
    assert all({"status", "description", "queue_position", "time"} <= e.keys() for e in seen)
    # Reconnecting with `after` sends only what is new (here: the current state once more).
    again = events(server, job["id"], server.alice, after=stored[-1])
    assert [e["status"] for e in again] == ["COMPLETED"]
    events(server, blocker["id"], server.alice)
    events(server, ahead["id"], server.alice)


def test_error_status(server, api):
    job = submit(api, server.alice, fail="ValueError: boom")
    seen = events(server, job["id"], server.alice)
    assert seen[-1]["status"] == "ERROR" and "ValueError: boom" in seen[-1]["description"]
    status = api.get(f"/v1/jobs/{job['id']}", headers=headers(server.alice)).json()
    assert status["error_category"] == "user"
    result = api.get(f"/v1/jobs/{job['id']}/result", headers=headers(server.alice))
    assert result.status_code == 409 and "ERROR" in result.json()["detail"]


@pytest.mark.parametrize("key", [None, "il_deadbeef_nope", "garbage"])
def test_every_job_endpoint_needs_a_key(server, api, key):
    job = submit(api, server.alice)
    hdrs = {"X-Interlace-Key": key} if key else {}
    calls = [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job['id']}"),
             ("GET", f"/v1/jobs/{job['id']}/events"), ("GET", f"/v1/jobs/{job['id']}/result"),
             ("DELETE", f"/v1/jobs/{job['id']}")]
    for method, path in calls:
        response = api.request(method, path, headers=hdrs, content=fake_payload() if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert "X-Interlace-Key" in response.json()["detail"]
        assert "interlace keys create" in response.json()["detail"]
    url = f"{server.url.replace('http', 'ws')}/v1/jobs/{job['id']}/events"
    with connect(url, additional_headers=hdrs, open_timeout=5) as ws:
        if not key:
            ws.send(json.dumps({"version": __version__}))
        message = json.loads(ws.recv(timeout=5))
    assert message["code"] == 401 and "X-Interlace-Key" in message["error"]


def test_other_users_jobs_are_invisible(server, api):
    job = submit(api, server.alice)
    for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/jobs/{job['id']}/result"),
                         ("GET", f"/v1/jobs/{job['id']}/events"), ("DELETE", f"/v1/jobs/{job['id']}"),
                         ("GET", "/v1/jobs/does-not-exist")]:
        response = api.request(method, path, headers=headers(server.bob))
        assert response.status_code == 404, (method, path)
    # The same answer as for an id that does not exist: existence is not revealed.
    assert (api.get(f"/v1/jobs/{job['id']}", headers=headers(server.bob)).json()["detail"].replace(job["id"], "X")
            == api.get("/v1/jobs/X", headers=headers(server.bob)).json()["detail"])
    assert job["id"] not in {j["id"] for j in api.get("/v1/jobs", headers=headers(server.bob)).json()["jobs"]}
    assert job["id"] in {j["id"] for j in api.get("/v1/jobs", headers=headers(server.alice)).json()["jobs"]}
    with connect(f"{server.url.replace('http', 'ws')}/v1/jobs/{job['id']}/events",
                 additional_headers=headers(server.bob), open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["code"] == 404


def test_cancel_queued_job(server, api, tmp_path):
    gate = Gate(tmp_path)
    blocker = submit(api, server.alice, hold=gate.path, model_key="other")
    queued = submit(api, server.alice, model_key="other")
    response = api.delete(f"/v1/jobs/{queued['id']}", headers=headers(server.alice))
    assert response.status_code == 200 and response.json()["status"] == "CANCELLED"
    assert events(server, queued["id"], server.alice)[-1]["status"] == "CANCELLED"
    again = api.delete(f"/v1/jobs/{queued['id']}", headers=headers(server.alice))
    assert again.status_code == 409
    gate.open()
    assert events(server, blocker["id"], server.alice)[-1]["status"] == "COMPLETED"


def test_public_info_policy_openapi(server, api):
    info = api.get("/v1/info").json()
    assert info["version"] == __version__ and info["models"] == ["fake", "other"]
    assert info["supported_client_versions"] == ">=0.0.0,<1.0.0"
    assert api.get("/v1/policy").json()["runner"] == "fake"
    spec = api.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}/result" in spec["paths"]
    assert api.get("/docs").status_code == 200


def test_version_mismatch(server, api):
    hdrs = {**headers(server.alice), "X-Interlace-Version": "7.0.0"}
    response = api.post("/v1/jobs", content=fake_payload(), headers=hdrs)
    assert response.status_code == 426
    assert "7.0.0" in response.json()["detail"] and ">=0.0.0,<1.0.0" in response.json()["detail"]
    job = submit(api, server.alice)
    with connect(f"{server.url.replace('http', 'ws')}/v1/jobs/{job['id']}/events",
                 additional_headers=hdrs, open_timeout=5) as ws:
        message = json.loads(ws.recv(timeout=5))
    assert message["code"] == 426 and ">=0.0.0,<1.0.0" in message["error"]


def test_callback_receives_final_status(server, api):
    received: list[dict] = []
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()
            done.set()

        def log_message(self, *args):
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        response = api.post("/v1/jobs", content=fake_payload(echo=1),
                             headers={**headers(server.alice), "X-Interlace-Callback": url})
        assert response.status_code == 202
        assert done.wait(10)
        assert received[0]["id"] == response.json()["id"] and received[0]["status"] == "COMPLETED"
        bad = api.post("/v1/jobs", content=fake_payload(),
                        headers={**headers(server.alice), "X-Interlace-Callback": "file:///etc/passwd"})
        assert bad.status_code == 400 and "http" in bad.json()["detail"]
    finally:
        receiver.shutdown()
