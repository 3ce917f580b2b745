"""The job store on both databases: the embedded SQLite file and a real PostgreSQL server
(tests/postgres.py starts one). One suite, parametrized: what a server relies on must hold on
either. Then what only a shared (PostgreSQL) queue does: claims with row locks, fairness
across API keys, co-batching claims, leases; and the in-memory queue's fairness and threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from interlace import cli
from interlace.contract.http import JobStatus
from interlace.execution.cobatch import BatchLimits
from interlace.server.auth import KeyStore
from interlace.server.db import open_database, redact_url
from interlace.server.results import DatabaseResultStore, ResultStore
from interlace.server.store import JobStore
from interlace.server.store_queue import SharedQueueStore
from interlace.server.workers import ModelWorker, QueuedJob
from interlace.testing import free_port

GENEROUS_S = 30.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        database = open_database(None, tmp_path)
    else:
        database = open_database(request.getfixturevalue("postgres_url"), tmp_path)
    yield database
    database.close()


@pytest.fixture
def pg(postgres_url, tmp_path):
    database = open_database(postgres_url, tmp_path)
    yield database
    database.close()


def _create(store: JobStore, job_id: str, key: str = "k1", model: str = "m", **extra) -> None:
    store.create(job_id, owner=f"user-{key}", key_id=key, model_key=model, payload_size=3, callback=None,
                 client_version="1", queue_position=1, **extra)


# -- both databases ------------------------------------------------------------------------


def test_create_and_read_back(db):
    store = JobStore(db)
    events = store.create("j1", owner="alice", key_id="k1", model_key="m", payload_size=7, callback=None,
                          client_version="1.0", queue_position=3)
    assert [e.status for e in events] == ["RECEIVED", "QUEUED"]
    assert events[0].seq < events[1].seq and events[1].queue_position == 3
    record = store.get("j1")
    assert record.status == "QUEUED" and record.owner == "alice" and record.payload_size == 7
    assert store.get_owned("j1", "alice") == record and store.get_owned("j1", "bob") is None
    assert store.count_in_flight("k1") == 1 and store.count_in_flight("other") == 0
    assert [r.id for r in store.list_jobs("alice")] == ["j1"] and store.list_jobs("bob") == []


def test_transitions_agree_on_a_race(db):
    store = JobStore(db)
    _create(store, "j1")
    running = store.transition("j1", JobStatus.RUNNING, "Running.", expect=(JobStatus.QUEUED,), started=1.0,
                               attempts=1)
    assert running is not None and running.status == "RUNNING"
    # A cancel that expected QUEUED loses against the worker that started the job.
    assert store.transition("j1", JobStatus.CANCELLED, expect=(JobStatus.QUEUED,)) is None
    done = store.transition("j1", JobStatus.COMPLETED, "ok", expect=(JobStatus.RUNNING,), result_size=5)
    assert done.seq > running.seq
    record = store.get("j1")
    assert (record.status, record.result_size, record.attempts) == ("COMPLETED", 5, 1)
    assert store.latest_event("j1").status == "COMPLETED"


def test_events_logs_and_timelines(db):
    store = JobStore(db)
    _create(store, "j1")
    _create(store, "j2")
    logged = [store.add_log("j1", f"line {i}", limit=2) for i in range(4)]
    assert [e.description for e in logged[:2]] == ["line 0", "line 1"]
    assert "more than 2 log lines" in logged[2].description and logged[3] is None
    assert [e.status for e in store.events_after("j1")] == ["RECEIVED", "QUEUED", "LOG", "LOG", "LOG"]
    first_log = store.events_after("j1")[2].seq
    assert [e.description for e in store.events_after("j1", first_log)][:1] == ["line 1"]
    timelines = store.timelines(["j1", "j2"])
    assert [e.status for e in timelines["j1"]] == ["RECEIVED", "QUEUED"] == [e.status for e in timelines["j2"]]


def test_keys(db):
    keys = KeyStore(db)
    key, info = keys.create("alice")
    user = keys.verify(key)
    assert user is not None and user.name == "alice" and user.key_id == info.id
    assert keys.verify(key[:-1] + ("x" if key[-1] != "x" else "y")) is None
    assert keys.count_active() == 1 and [k.name for k in keys.list_keys()] == ["alice"]
    assert keys.revoke(info.id) and not keys.revoke(info.id)
    assert keys.verify(key) is None and keys.count_active() == 0


def test_expiry_drops_the_history(db):
    store = JobStore(db)
    _create(store, "j1")
    _create(store, "j2")
    store.transition("j1", JobStatus.COMPLETED, "ok", finished=10.0, expires_at=20.0)
    store.add_log("j1", "printed", limit=10)
    assert [r.id for r in store.expired(19.0)] == [] and [r.id for r in store.expired(20.0)] == ["j1"]
    event = store.expire("j1")
    assert event.status == "EXPIRED" and store.get("j1").status == "EXPIRED"
    assert [e.status for e in store.events_after("j1")] == ["EXPIRED"]
    assert store.expire("j1") is None and store.expire("j2") is None  # j2 never finished


def test_recovery_finds_unfinished_jobs_oldest_first(db):
    store = JobStore(db)
    for name in ("a", "b", "c", "d"):
        _create(store, name)
    store.transition("b", JobStatus.RUNNING, expect=(JobStatus.QUEUED,))
    store.transition("c", JobStatus.COMPLETED, expires_at=1.0)
    assert [r.id for r in store.pending()] == ["a", "b", "d"]


def test_results_where_every_replica_reads_them(db, tmp_path):
    results = DatabaseResultStore(db) if db.shared_queue else ResultStore(str(tmp_path / "results"))
    data = bytes(range(256)) * 1000
    results.put("j1", data)
    assert results.exists("j1") and results.size("j1") == len(data) and results.read("j1") == data
    assert b"".join(results.iter_chunks("j1", 4096)) == data
    results.delete("j1")
    assert not results.exists("j1")
    results.delete("j1")  # twice: a second replica's sweep


# -- the shared queue (PostgreSQL) ---------------------------------------------------------


def test_the_schema_is_created_once_and_reopened(postgres_url, tmp_path):
    first = open_database(postgres_url, tmp_path)
    _create(JobStore(first), "j1")
    again = open_database(postgres_url, tmp_path)  # a second replica starting later
    assert JobStore(again).get("j1").status == "QUEUED"
    rows = again.query("SELECT version FROM schema_version")
    assert [r[0] for r in rows] == [1]
    with again.transaction() as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="newer Interlace"):
        open_database(postgres_url, tmp_path)
    first.close()
    again.close()


def test_a_claim_runs_the_job_once_with_its_payload(pg):
    store = JobStore(pg)
    _create(store, "j1", payload=b"payload-1")
    queue = SharedQueueStore(pg, "replica-a")
    claim = queue.claim_next("m")
    assert claim.record.status == "RUNNING" and claim.record.attempts == 1 and claim.payload == b"payload-1"
    assert claim.event.status == "RUNNING" and store.latest_event("j1").seq == claim.event.seq
    assert queue.claim_next("m") is None and SharedQueueStore(pg, "replica-b").claim_next("m") is None
    assert queue.holder("j1")[0] == "replica-a" and queue.running("m") == ["j1"]


def test_concurrent_claims_take_every_job_exactly_once(pg):
    store = JobStore(pg)
    for i in range(60):
        _create(store, f"j{i:02d}", key=f"k{i % 3}", payload=b"x")
    taken: list[tuple[str, str]] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        queue = SharedQueueStore(pg, name)
        while (claim := queue.claim_next("m")) is not None:
            with lock:
                taken.append((claim.record.id, name))

    threads = [threading.Thread(target=claimer, args=(f"r{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENEROUS_S)
    counts = Counter(job for job, _ in taken)
    assert len(counts) == 60 and set(counts.values()) == {1}
    assert {r.status for r in store.list_jobs(limit=100)} == {"RUNNING"}
    running = pg.query("SELECT COUNT(*) FROM events WHERE status = 'RUNNING'")[0][0]
    assert running == 60


def test_claims_take_turns_between_api_keys(pg):
    store = JobStore(pg)
    for i in range(4):
        _create(store, f"a{i}", key="ka", payload=b"x")
    _create(store, "b0", key="kb", payload=b"x")
    _create(store, "b1", key="kb", payload=b"x")
    _create(store, "c0", key="kc", payload=b"x")
    queue = SharedQueueStore(pg, "r")
    order = []
    while (claim := queue.claim_next("m")) is not None:
        order.append(claim.record.id)
    # The heavy user's later jobs wait for every other user's next one.
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_cobatch_claims_take_company_with_equal_keys_within_rows(pg):
    store = JobStore(pg)
    _create(store, "h", payload=b"x", share_key="K", share_rows=2)
    _create(store, "other", payload=b"x", share_key="L", share_rows=1)
    _create(store, "big", payload=b"x", share_key="K", share_rows=5)
    _create(store, "fits", payload=b"x", share_key="K", share_rows=2)
    queue = SharedQueueStore(pg, "r")
    head = queue.claim_next("m")
    assert head.record.id == "h" and head.share_key == "K"
    company = queue.claim_company("m", "K", room=4 - head.share_rows)
    assert [c.record.id for c in company] == ["fits"]
    assert {r.id: r.status for r in store.list_jobs()} == {"h": "RUNNING", "fits": "RUNNING",
                                                           "other": "QUEUED", "big": "QUEUED"}


def test_a_dead_replicas_job_is_requeued_by_another(pg):
    store = JobStore(pg)
    _create(store, "j1", payload=b"x")
    dead, alive = SharedQueueStore(pg, "dead"), SharedQueueStore(pg, "alive")
    dead.beat("http://dead", now=100.0)
    claim = dead.claim_next("m")
    pg_time = claim.record.started
    dead.beat("http://dead", now=pg_time)  # its last beat
    alive.beat("http://alive")
    assert alive.stale_running(pg_time - 1) == []
    stale = alive.stale_running(pg_time + 1)
    assert [(r.id, replica) for r, replica in stale] == [("j1", "dead")]
    # Only the replica that still holds it is replaced: a stale view requeues nothing.
    assert alive.requeue_stale("j1", "someone-else", "requeued") is None
    event = alive.requeue_stale("j1", "dead", "requeued")
    assert event.status == "QUEUED" and store.get("j1").status == "QUEUED"
    again = alive.claim_next("m")
    assert again.record.attempts == 2 and alive.holder("j1")[0] == "alive"


# -- the in-memory queue (the embedded default) ---------------------------------------------


def _held_worker(threads: int = 1):
    """A worker whose jobs wait on `release`; returns (worker, run order, release, started)."""
    order: list[str] = []
    release = threading.Event()
    started = threading.Semaphore(0)

    def execute(jobs: list[QueuedJob]) -> None:
        order.extend(job.job_id for job in jobs)
        started.release()
        release.wait(GENEROUS_S)

    worker = ModelWorker("m", execute, lambda key, waiting: None, BatchLimits(enabled=False), threads)
    return worker, order, release, started


def test_the_in_memory_queue_takes_turns_between_api_keys():
    worker, order, release, started = _held_worker()
    worker.start()
    worker.enqueue(QueuedJob("a0", None, fair_key="ka"))
    assert started.acquire(timeout=GENEROUS_S)  # a0 runs, holding the worker
    for i in range(1, 4):
        worker.enqueue(QueuedJob(f"a{i}", None, fair_key="ka"))
    position = worker.enqueue(QueuedJob("b0", None, fair_key="kb"))
    assert position == 1 and worker.position("a1") == 2  # the other user is next, not fifth
    release.set()
    deadline = time.monotonic() + GENEROUS_S
    while len(order) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop(GENEROUS_S)
    assert order == ["a0", "b0", "a1", "a2", "a3"]


def test_a_model_with_replicas_runs_that_many_jobs_at_once():
    worker, order, release, started = _held_worker(threads=2)
    worker.start()
    for name in ("j1", "j2", "j3"):
        worker.enqueue(QueuedJob(name, None, fair_key="k"))
    assert started.acquire(timeout=GENEROUS_S) and started.acquire(timeout=GENEROUS_S)
    assert sorted(worker.running) == ["j1", "j2"] and len(worker) == 1
    release.set()
    worker.stop(GENEROUS_S)


# -- choosing the store ---------------------------------------------------------------------


def test_store_urls_are_checked_and_passwords_never_shown(tmp_path):
    with pytest.raises(ValueError, match="postgresql://"):
        open_database("mysql://db/interlace", tmp_path)
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(RuntimeError, match="Cannot connect to the PostgreSQL job store postgresql://u:\\*\\*\\*@"):
        open_database(f"postgresql://u:secret@127.0.0.1:{free_port()}/db", tmp_path)


def test_the_cli_manages_keys_and_lists_jobs_in_the_postgres_store(postgres_url, tmp_path, capsys):
    assert cli.main(["keys", "create", "--name", "carol", "--store", postgres_url]) == 0
    key = capsys.readouterr().out.strip()
    db = open_database(postgres_url, tmp_path)
    try:
        assert KeyStore(db).verify(key).name == "carol"
        _create(JobStore(db), "job-in-pg")
    finally:
        db.close()
    assert cli.main(["keys", "list", "--store", postgres_url]) == 0
    assert "carol" in capsys.readouterr().out
    assert cli.main(["jobs", "list", "--store", postgres_url]) == 0
    assert "job-in-pg" in capsys.readouterr().out
