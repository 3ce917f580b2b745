"""Layer 5 of the sandbox: limits per job and per key, set by `interlace serve` flags, served in
the policy (GET /v1/policy), and answered 413/429 with messages that say the limit, the amount
and the flag that changes it."""

from __future__ import annotations

import time

import httpx
import pytest

from interlace._version import __version__
from interlace.cli import _policy_from_args, build_parser
from interlace.contract.policy import Policy
from interlace.server.limits import RateLimiter, TooManyRequests
from interlace.testing import Gate, ServerProcess, ThreadedServer, fake_payload


def headers(key):
    return {"X-Interlace-Key": key, "X-Interlace-Version": __version__}


def _wait_done(api, key, job_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.get(f"/v1/jobs/{job_id}", headers=headers(key)).json()["status"]
        if status in ("COMPLETED", "ERROR", "CANCELLED"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_serve_flags_make_the_policy():
    args = build_parser().parse_args([
        "serve", "--max-upload-mb", "2", "--max-result-mb", "3", "--job-timeout", "5", "--job-cpu-seconds", "4",
        "--job-memory-mb", "512", "--max-log-kb", "8", "--max-queued-per-key", "7", "--requests-per-minute", "90",
    ])
    policy = _policy_from_args(args)
    assert (policy.max_upload_bytes, policy.max_result_bytes) == (2 * 2**20, 3 * 2**20)
    assert (policy.timeout_seconds, policy.cpu_seconds, policy.max_memory_bytes) == (5.0, 4.0, 512 * 2**20)
    assert (policy.max_log_bytes, policy.max_queued_per_key, policy.requests_per_minute) == (8192, 7, 90)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--requests-per-minute", "0"])


def test_a_real_server_serves_the_limits_its_flags_set(tmp_path):
    flags = ["--max-upload-mb", "0.5", "--job-timeout", "12", "--job-cpu-seconds", "11", "--job-memory-mb", "300",
             "--max-log-kb", "3", "--max-queued-per-key", "4", "--requests-per-minute", "120", "--max-result-mb", "9"]
    with ServerProcess(tmp_path / "data", args=flags) as server:
        policy = httpx.get(f"{server.url}/v1/policy").json()
        info = httpx.get(f"{server.url}/v1/info").json()
    assert policy["max_upload_bytes"] == info["max_upload_bytes"] == 2**19  # one number, one source
    assert policy["timeout_seconds"] == 12 and policy["cpu_seconds"] == 11
    assert policy["max_memory_bytes"] == 300 * 2**20 and policy["max_result_bytes"] == 9 * 2**20
    assert policy["max_log_bytes"] == 3072 and policy["max_queued_per_key"] == 4
    assert policy["requests_per_minute"] == 120


@pytest.fixture
def limited(tmp_path):
    policy = Policy(requests_per_minute=1000, max_queued_per_key=2, max_upload_bytes=20_000, max_log_bytes=100)
    with ThreadedServer(tmp_path / "data", policy=policy) as server:
        server.alice = server.create_key("alice")
        server.bob = server.create_key("bob")
        with httpx.Client(base_url=server.url, timeout=10) as api:
            yield server, api


def test_the_upload_limit_is_the_policys(limited):
    server, api = limited
    response = api.post("/v1/jobs", content=b"x" * 25_000, headers=headers(server.alice))
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "25000" in detail and "20000" in detail and "interlace serve --max-upload-mb" in detail
    assert api.get("/v1/info").json()["max_upload_bytes"] == 20_000


def test_a_key_with_its_limit_of_jobs_in_flight_gets_429_others_do_not(limited, tmp_path):
    server, api = limited
    gate = Gate(tmp_path)
    first = api.post("/v1/jobs", content=fake_payload(hold=str(gate.path)), headers=headers(server.alice))
    second = api.post("/v1/jobs", content=fake_payload(echo=2), headers=headers(server.alice))
    assert first.status_code == second.status_code == 202
    third = api.post("/v1/jobs", content=fake_payload(echo=3), headers=headers(server.alice))
    assert third.status_code == 429
    body = third.json()
    assert body["limit"] == 2 and body["count"] == 2
    assert "has 2 jobs queued or running" in body["detail"] and "at most 2 per key" in body["detail"]
    assert "interlace serve --max-queued-per-key" in body["detail"]
    # Another key is not held up by alice's jobs.
    assert api.post("/v1/jobs", content=fake_payload(echo=4), headers=headers(server.bob)).status_code == 202
    gate.open()
    for job in (first, second):
        assert _wait_done(api, server.alice, job.json()["id"]) == "COMPLETED"
    assert api.post("/v1/jobs", content=fake_payload(echo=5), headers=headers(server.alice)).status_code == 202


def test_printing_without_bound_is_truncated_with_a_notice(limited):
    server, api = limited
    lines = [f"line {i:03d} " + "y" * 20 for i in range(200)]  # 5.8 KB printed, limit 100 bytes
    job = api.post("/v1/jobs", content=fake_payload(log=lines), headers=headers(server.alice)).json()
    assert _wait_done(api, server.alice, job["id"]) == "COMPLETED"
    events = api.get(f"/v1/jobs/{job['id']}/events", headers=headers(server.alice)).json()["events"]
    logs = [e["description"] for e in events if e["status"] == "LOG"]
    assert logs[:3] == lines[:3]
    assert "output truncated" in logs[-1] and "100 bytes" in logs[-1] and "--max-log-kb" in logs[-1]
    assert sum(len(text) for text in logs[:-1]) <= 100 + 300  # the limit, plus the notice's own line


def test_requests_beyond_the_rate_get_429_with_retry_after(tmp_path):
    with ThreadedServer(tmp_path / "data", policy=Policy(requests_per_minute=5)) as server:
        alice, bob = server.create_key("alice"), server.create_key("bob")
        with httpx.Client(base_url=server.url, timeout=10) as api:
            answers = [api.get("/v1/jobs", headers=headers(alice)) for _ in range(6)]
            assert [r.status_code for r in answers] == [200] * 5 + [429]
            refused = answers[-1]
            retry = int(refused.headers["Retry-After"])
            assert 1 <= retry <= 12  # one request's worth of a 5-a-minute bucket
            detail = refused.json()["detail"]
            assert "more than 5 requests in the last minute" in detail
            assert "interlace serve --requests-per-minute" in detail and f"Retry after {retry} s" in detail
            assert api.get("/v1/jobs", headers=headers(bob)).status_code == 200  # per key
            assert api.get("/v1/policy").status_code == 200  # public endpoints need no key, count for none


def test_the_rate_limiter_refills_at_the_rate():
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one a second, 60 at once
    for _ in range(60):
        limiter.take("k")
    with pytest.raises(TooManyRequests) as info:
        limiter.take("k")
    assert info.value.retry_after == 1
    now[0] += 1.0
    limiter.take("k")
    with pytest.raises(TooManyRequests):
        limiter.take("k")
    now[0] += 120.0  # a long pause refills to the limit, never beyond
    for _ in range(60):
        limiter.take("k")
    with pytest.raises(TooManyRequests):
        limiter.take("k")


def test_the_client_waits_out_a_rate_limit_instead_of_failing(tmp_path):
    # 60 a minute: one a second once the burst is spent. The client sees 429 + Retry-After
    # and sends again after the pause, so a loop of requests slows down but never fails.
    from interlace.backends.client import RemoteClient

    with ThreadedServer(tmp_path / "data", policy=Policy(requests_per_minute=60)) as server:
        key = server.create_key("alice")
        with httpx.Client(base_url=server.url, timeout=10) as api:
            while api.get("/v1/jobs", headers=headers(key)).status_code != 429:
                pass  # spend the burst
        with RemoteClient(server.url, key) as client:
            assert client.jobs() == []  # answered after waiting, not a RemoteRequestError
