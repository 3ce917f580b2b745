"""Several API replicas on one PostgreSQL job store (`interlace serve --store postgresql://...`).

Real `interlace serve` processes on a real PostgreSQL server (tests/postgres.py); the jobs
are the fake runner's (no model needed: what is under test is the queue). What a user relies
on: a job submitted to any replica runs exactly once and is never lost; its status, events and
result can be read from any replica; a replica that dies mid-job does not lose it.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter

import httpx
import pytest
from websockets.sync.client import connect

from interlace import __version__
from interlace.contract.http import local_frame
from interlace.server.auth import KeyStore
from interlace.server.db import open_database
from interlace.server.store import JobStore
from interlace.server.store_queue import SharedQueueStore
from interlace.testing import Gate, ServerProcess, ThreadedServer, decode_fake_result, fake_payload

JOBS, CLIENTS = 200, 8
GENEROUS_S = 120.0
TERMINAL = {"COMPLETED", "ERROR", "CANCELLED", "EXPIRED"}


def _headers(key: str) -> dict[str, str]:
    return {"X-Interlace-Key": key, "X-Interlace-Version": __version__}


def _make_keys(url: str, tmp_path, count: int) -> list[str]:
    db = open_database(url, tmp_path)
    try:
        return [KeyStore(db).create(f"user{i}")[0] for i in range(count)]
    finally:
        db.close()


@pytest.fixture
def replicas(postgres_url, tmp_path):
    procs = [ServerProcess(tmp_path / f"replica{i}", args=["--store", postgres_url]) for i in range(2)]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def _wait_done(http: httpx.Client, job_id: str, key: str) -> dict:
    deadline = time.monotonic() + GENEROUS_S
    while time.monotonic() < deadline:
        status = http.get(f"/v1/jobs/{job_id}", headers=_headers(key)).json()
        if status["status"] in TERMINAL:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def test_200_jobs_from_8_clients_over_2_replicas_each_run_exactly_once(replicas, postgres_url, tmp_path):
    keys = _make_keys(postgres_url, tmp_path, CLIENTS)
    submitted: list[tuple[str, int, str]] = []  # (job id, echo, key)
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        key = keys[index]
        https = [httpx.Client(base_url=r.url, timeout=60) for r in replicas]
        try:
            mine = []
            for n in range(JOBS // CLIENTS):
                echo = index * 1000 + n
                # Alternate replicas: a load balancer spreading one client's requests.
                response = https[(index + n) % 2].post("/v1/jobs", headers=_headers(key),
                                                       content=fake_payload(echo=echo, log=[f"ran {echo}"]))
                if response.status_code != 202:
                    failures.append(response.text)
                    return
                mine.append((response.json()["id"], echo, key))
            for n, (job_id, echo, _) in enumerate(mine):
                # Read it back from the other replica than the one it was sent to.
                http = https[(index + n + 1) % 2]
                status = _wait_done(http, job_id, key)
                result = http.get(f"/v1/jobs/{job_id}/result", headers=_headers(key))
                if status["status"] != "COMPLETED" or decode_fake_result(result.content)["echo"] != echo:
                    failures.append(f"{job_id}: {status['status']} {status['description']}")
            with lock:
                submitted.extend(mine)
        finally:
            for http in https:
                http.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS_S * 2)
    assert not failures, failures[:5]
    assert len(submitted) == JOBS and len({job for job, _, _ in submitted}) == JOBS

    # The independent count: what the database recorded each job doing.
    db = open_database(postgres_url, tmp_path)
    try:
        rows = db.query("SELECT id, status, attempts, replica FROM jobs")
        runs = Counter(r[0] for r in db.query("SELECT job_id FROM events WHERE status = 'RUNNING'"))
        logs = Counter(r[0] for r in db.query("SELECT job_id FROM events WHERE status = 'LOG'"))
    finally:
        db.close()
    assert len(rows) == JOBS
    assert {r[1] for r in rows} == {"COMPLETED"} and {r[2] for r in rows} == {1}
    assert set(runs.values()) == {1} and len(runs) == JOBS  # started once each
    assert set(logs.values()) == {1} and len(logs) == JOBS  # the job's own code ran once each
    assert len({r[3] for r in rows}) == 2, "both replicas should have run jobs"


def test_events_and_cancel_reach_across_replicas(replicas, postgres_url, tmp_path):
    (key,) = _make_keys(postgres_url, tmp_path, 1)
    a, b = replicas
    gate = Gate(tmp_path)
    with httpx.Client(base_url=a.url, timeout=60) as http_a, httpx.Client(base_url=b.url, timeout=60) as http_b:
        held = http_a.post("/v1/jobs", headers=_headers(key), content=fake_payload(hold=gate.path)).json()
        seen = []
        url = f"{b.url.replace('http', 'ws')}/v1/jobs/{held['id']}/events"
        with connect(url, additional_headers=_headers(key), open_timeout=30) as ws:
            while not seen or seen[-1]["status"] != "RUNNING":
                seen.append(json.loads(ws.recv(timeout=GENEROUS_S)))
            gate.open()  # the job runs on some replica; B's watcher hears how it ends
            while seen[-1]["status"] not in TERMINAL:
                seen.append(json.loads(ws.recv(timeout=GENEROUS_S)))
        assert [e["status"] for e in seen][-1] == "COMPLETED"
        seqs = [e["seq"] for e in seen if e["seq"] is not None]
        assert seqs == sorted(set(seqs))  # each stored event once, in order

        # A cancel on either replica wins only over a job no replica claimed yet.
        blocker_gate = Gate(tmp_path, "blocker")
        jobs = [http_a.post("/v1/jobs", headers=_headers(key), content=fake_payload(hold=blocker_gate.path))
                .json()["id"] for _ in range(3)]  # both replicas' one worker each busy, one waits
        deadline = time.monotonic() + GENEROUS_S
        while time.monotonic() < deadline:
            states = [http_b.get(f"/v1/jobs/{j}", headers=_headers(key)).json()["status"] for j in jobs]
            if states.count("RUNNING") == 2:
                break
            time.sleep(0.05)
        waiting = jobs[states.index("QUEUED")]
        cancelled = http_b.delete(f"/v1/jobs/{waiting}", headers=_headers(key))
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
        running = jobs[states.index("RUNNING")]
        assert http_b.delete(f"/v1/jobs/{running}", headers=_headers(key)).status_code == 409
        blocker_gate.open()
        assert {_wait_done(http_a, j, key)["status"] for j in jobs if j != waiting} == {"COMPLETED"}

        # A local block is served through either replica: the other one forwards to the holder.
        local = http_a.post("/v1/jobs", headers=_headers(key),
                            content=fake_payload(local=[{"line": 3, "values": "v"}])).json()["id"]
        _wait_local_block(http_b, local, key)
        holder_url = _holder(postgres_url, tmp_path, local)
        other = b if holder_url == a.url else a
        with httpx.Client(base_url=other.url, timeout=60) as http_other:
            status = http_other.get(f"/v1/jobs/{local}", headers=_headers(key)).json()
            assert status["local_block"] == {"exchange": 1, "line": 3}  # stored by the holder
            served = http_other.get(f"/v1/jobs/{local}/local/1", headers=_headers(key))
            assert served.status_code == 200 and served.content == b"v"
            read = http_other.post(f"/v1/jobs/{local}/local/1", json={"path": "model.h.0", "kind": "output"},
                                   headers={**_headers(key), "X-Interlace-Local": "read"})
            assert read.status_code == 200 and read.content == b"value of model.h.0.output"
            done = http_other.post(f"/v1/jobs/{local}/local/1", content=b"back",
                                   headers={**_headers(key), "X-Interlace-Local": "done"})
            assert done.status_code == 204
            # Over now: the holder's own answer comes back through the other replica.
            assert http_other.get(f"/v1/jobs/{local}/local/1", headers=_headers(key)).status_code in (404, 409)
            assert _wait_done(http_other, local, key)["status"] == "COMPLETED"
            result = decode_fake_result(http_other.get(f"/v1/jobs/{local}/result", headers=_headers(key)).content)
        assert result["local"] == [{"line": 3, "reads": ["model.h.0.output"], "values": "back"}]
        # Another user's key is refused by the holder exactly as by a single server: 404.
        stranger = _make_named_key(postgres_url, tmp_path, "stranger")
        assert http_b.get(f"/v1/jobs/{local}/local/1", headers=_headers(stranger)).status_code == 404


def _make_named_key(url: str, tmp_path, name: str) -> str:
    db = open_database(url, tmp_path)
    try:
        return KeyStore(db).create(name)[0]
    finally:
        db.close()


def _wait_local_block(http: httpx.Client, job_id: str, key: str) -> dict:
    deadline = time.monotonic() + GENEROUS_S
    while True:
        status = http.get(f"/v1/jobs/{job_id}", headers=_headers(key)).json()
        if status["local_block"] is not None:
            return status
        assert status["status"] not in TERMINAL, status
        assert time.monotonic() < deadline, "the job never reached its local block"
        time.sleep(0.05)


def _holder(url: str, tmp_path, job_id: str) -> str:
    """The advertised URL of the replica that runs `job_id`, from the database."""
    db = open_database(url, tmp_path)
    try:
        return db.query_one("SELECT r.url FROM jobs j JOIN replicas r ON r.id = j.replica WHERE j.id = ?",
                            (job_id,))[0]
    finally:
        db.close()


def test_a_job_whose_replica_died_is_requeued_and_runs(postgres_url, tmp_path):
    """A replica that claimed a job and stopped beating (killed): another replica's lease
    keeper requeues it after the lease, and it runs there, its attempts counted."""
    db = open_database(postgres_url, tmp_path)
    store = JobStore(db)
    (key,) = _make_keys(postgres_url, tmp_path, 1)
    user_key_id = key.split("_")[1]
    payload = fake_payload(echo="survived")
    store.create("orphan", owner="user0", key_id=user_key_id, model_key="fake", payload_size=len(payload),
                 callback=None, client_version=__version__, queue_position=1, payload=payload)
    dead = SharedQueueStore(db, "dead-replica")
    dead.beat("http://127.0.0.1:9")
    assert dead.claim_next("fake").record.id == "orphan"
    with db.transaction() as conn:  # its last beat was long ago
        conn.execute("UPDATE jobs SET heartbeat = heartbeat - 3600 WHERE id = 'orphan'")
    with ThreadedServer(tmp_path / "survivor", store=postgres_url, lease_seconds=1.0) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            status = _wait_done(http, "orphan", key)
            result = http.get("/v1/jobs/orphan/result", headers=_headers(key))
            status_page = http.get("/v1/status", headers=_headers(key)).json()
    assert [m["key"] for m in status_page["models"]] == ["fake"]
    assert status_page["models"][0]["queue_length"] == 0
    assert status["status"] == "COMPLETED" and status["attempts"] == 2
    assert decode_fake_result(result.content)["echo"] == "survived"
    assert [e.status for e in store.events_after("orphan")] == [
        "RECEIVED", "QUEUED", "RUNNING", "QUEUED", "RUNNING", "COMPLETED"]
    db.close()


# -- limits and local blocks across replicas ----------------------------------------------------

IN_FLIGHT, PER_MINUTE, GRACE_S = 3, 20, 2.0


@pytest.fixture
def limited(postgres_url, tmp_path):
    """Two replicas with a small per-key in-flight limit and rate, and a short local grace."""
    args = ["--max-queued-per-key", str(IN_FLIGHT), "--requests-per-minute", str(PER_MINUTE),
            "--local-grace", str(GRACE_S)]
    procs = [ServerProcess(tmp_path / f"limited{i}", args=args, store=postgres_url) for i in range(2)]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def test_per_key_limits_hold_across_replicas(limited, postgres_url, tmp_path):
    a, b = limited
    flooder, caller = a.create_key("flooder"), b.create_key("caller")  # keys written to Postgres
    gate = Gate(tmp_path)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def submit(index: int) -> None:
        with httpx.Client(base_url=limited[index % 2].url, timeout=60) as http:
            response = http.post("/v1/jobs", headers=_headers(flooder), content=fake_payload(hold=gate.path))
        with lock:
            answers.append(response)

    # 12 submissions at once, 6 to each replica: exactly the limit gets in, whichever replica.
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS_S)
    codes = Counter(r.status_code for r in answers)
    assert codes == {202: IN_FLIGHT, 429: 12 - IN_FLIGHT}, [r.text for r in answers if r.status_code != 429]
    refused = next(r for r in answers if r.status_code == 429).json()
    assert refused["limit"] == IN_FLIGHT and "--max-queued-per-key" in refused["detail"]
    db = open_database(postgres_url, tmp_path)
    try:
        assert db.query_one("SELECT COUNT(*) FROM jobs")[0] == IN_FLIGHT
    finally:
        db.close()

    # Requests per minute: one bucket per key for both replicas. Two buckets would let
    # 2 * PER_MINUTE through; one lets PER_MINUTE (and one more each 60/PER_MINUTE s).
    https = [httpx.Client(base_url=r.url, timeout=60) for r in limited]
    try:
        counted = [https[n % 2].get("/v1/jobs", headers=_headers(caller)) for n in range(2 * PER_MINUTE)]
    finally:
        for http in https:
            http.close()
    ok = sum(r.status_code == 200 for r in counted)
    limited_answers = [r for r in counted if r.status_code == 429]
    assert PER_MINUTE <= ok < PER_MINUTE + 10 and len(limited_answers) == 2 * PER_MINUTE - ok
    assert f"more than {PER_MINUTE} requests" in limited_answers[0].json()["detail"]
    assert int(limited_answers[0].headers["Retry-After"]) >= 1
    gate.open()


def test_local_block_through_the_replica_that_does_not_run_it(limited, postgres_url, tmp_path):
    """The client follows the job (WebSocket, `?local=1`) and serves its block through the
    replica that does not run it: it sees the STREAM event, its reads are answered, its final
    frame reaches the block, and the holder keeps waiting past its short grace meanwhile."""
    a, b = limited
    key = a.create_key("local")
    with httpx.Client(base_url=a.url, timeout=60) as http_a:
        job = http_a.post("/v1/jobs", headers=_headers(key),
                          content=fake_payload(local=[{"line": 7, "values": "down"}], echo="ok")).json()["id"]
        _wait_local_block(http_a, job, key)
    holder_url = _holder(postgres_url, tmp_path, job)
    other = b if holder_url == a.url else a
    url = f"{other.url.replace('http', 'ws')}/v1/jobs/{job}/events?local=1"
    with connect(url, additional_headers=_headers(key), open_timeout=30) as ws, \
            httpx.Client(base_url=other.url, timeout=60) as http:
        event = json.loads(ws.recv(timeout=GENEROUS_S))
        while event["status"] != "STREAM":
            event = json.loads(ws.recv(timeout=GENEROUS_S))
        assert event["exchange"] == 1 and event["line"] == 7
        assert base64.b64decode(event["values"]) == b"down"
        # Longer than the holder's grace: the watcher here is what keeps the job waiting.
        time.sleep(GRACE_S * 2)
        read = http.post(f"/v1/jobs/{job}/local/1", json={"path": "model.h.1", "kind": "input"},
                         headers={**_headers(key), "X-Interlace-Local": "read"})
        assert read.status_code == 200 and read.content == b"value of model.h.1.input"
        ws.send(local_frame(1, {"op": "done"}, b"up"))
        while event["status"] not in TERMINAL:
            event = json.loads(ws.recv(timeout=GENEROUS_S))
        assert event["status"] == "COMPLETED", event
        result = decode_fake_result(http.get(f"/v1/jobs/{job}/result", headers=_headers(key)).content)
    assert result["echo"] == "ok"
    assert result["local"] == [{"line": 7, "reads": ["model.h.1.input"], "values": "up"}]


def test_a_real_local_block_served_through_a_replica_that_does_not_run_it(
        postgres_url, tmp_path, tiny_gpt2_path, monkeypatch):
    """`with interlace.local():` in a real trace, the client talking to replica X only while
    replica Y runs the job (X's one worker is busy with another such job, whose block waits on
    this test): the block runs here and its edit reaches the model, as in a run without a server."""
    import torch

    import interlace
    from raw_truth import RawLM  # tests/raw_truth.py: the independent truth

    procs = [ServerProcess(tmp_path / f"real{i}", models=[str(tiny_gpt2_path)], fake=False, store=postgres_url)
             for i in range(2)]
    starting = [threading.Thread(target=p.start, kwargs={"timeout": 180}) for p in procs]
    try:
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        key = procs[0].create_key("hybrid")
        monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", key)
        monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
        monkeypatch.setattr(interlace.CONFIG.API, "HOST", procs[0].url)
        gpt2 = interlace.LanguageModel(str(tiny_gpt2_path))
        bias = torch.linspace(-1.0, 1.0, 128)
        release, outcomes = threading.Event(), {}

        def edit_layer(layer: int, wait: bool, name: str) -> None:
            try:
                with gpt2.trace("The local block", remote=True):
                    hidden = gpt2.transformer.h[layer].output
                    with interlace.local():
                        if wait:
                            release.wait(GENEROUS_S)
                        edited = hidden * 0.5 + bias
                    gpt2.transformer.h[layer].output[:] = edited
                    logits = gpt2.lm_head.output.save()
                outcomes[name] = logits
            except BaseException as exc:  # reported by the assertions below
                outcomes[name] = exc

        # The first job waits in its block on whichever replica (X) claimed it ...
        first = threading.Thread(target=edit_layer, args=(0, True, "first"))
        first.start()
        db = open_database(postgres_url, tmp_path)
        try:
            deadline = time.monotonic() + GENEROUS_S
            while (row := db.query_one("SELECT r.url FROM local_blocks b JOIN replicas r ON r.id = b.replica")) is None:
                assert time.monotonic() < deadline and first.is_alive(), outcomes
                time.sleep(0.05)
            busy = row[0]
            # ... so the second, sent to X, can only be run by the other replica.
            monkeypatch.setattr(interlace.CONFIG.API, "HOST", busy)
            edit_layer(1, False, "second")
            ran_on = db.query("SELECT r.url FROM jobs j JOIN replicas r ON r.id = j.replica ORDER BY j.created")
        finally:
            release.set()
            first.join(GENEROUS_S)
            db.close()
    finally:
        for proc in procs:
            proc.stop()
    assert [r[0] for r in ran_on][1] != busy, "the second job should have run on the other replica"
    raw = RawLM(tiny_gpt2_path)
    for name, layer in (("first", 0), ("second", 1)):
        assert isinstance(outcomes.get(name), torch.Tensor), outcomes.get(name)
        truth, _ = raw.run("The local block", edits={f"transformer.h.{layer}": lambda m, a, out: out * 0.5 + bias})
        torch.testing.assert_close(outcomes[name], truth, rtol=0, atol=1e-5)
