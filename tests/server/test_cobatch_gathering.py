"""Co-batching, the server's side: which queued jobs a model's worker hands to the runner
together, how each job of a batch ends, the job record's `batch_rows`, its schema migration,
the `interlace serve` flags, and real traces through a server that co-batches.

The rule for which jobs may share a forward is `execution/cobatch.py`'s (tested there); here
a small fake runner says each job's key and rows itself and records the batches it got.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any, Callable

import httpx
import pytest
import torch

import interlace
from interlace.cli import build_parser
from interlace.contract.http import JobStatus
from interlace.execution.cobatch import BatchLimits, JobOutcome
from interlace.execution.errors import JobFailed
from interlace.server.db import SCHEMA_VERSION, Database
from interlace.server.service import JobService
from interlace.server.settings import ServerSettings
from interlace.server.status import server_status
from interlace.server.store import JobStore
from interlace.server.types import BatchingJobRunner
from interlace.server.workers import ModelWorker, QueuedJob
from interlace.testing import FakeJob, FakeRunner, Gate, ServerProcess, decode_fake_result, fake_payload

GENEROUS_S = 60.0  # how long a test waits for what should take milliseconds (a loaded machine)


class BatchingFake(FakeRunner):
    """`FakeRunner` that co-batches: a job's spec says its `key` (None: it runs alone) and
    `rows`; `batches` records each call in order, as the jobs' `echo` names (a job run alone
    is a batch of one). A batch job's `fail` fails only that job; `logs` are its printed lines;
    `crash_batch` makes the whole `run_batch` raise."""

    def __init__(self, policy: Any = None) -> None:
        super().__init__(["fake"], policy)
        self.batches: list[list[str]] = []
        self.limits: list[BatchLimits] = []

    def share_key(self, job: FakeJob) -> Any:
        return job.spec.get("key")

    def rows(self, job: FakeJob) -> int:
        return int(job.spec.get("rows", 1))

    def run(self, job: FakeJob, log: Callable[[str], None], local: Any = None) -> bytes:
        self.batches.append([job.spec["echo"]])
        return super().run(job, log, local)

    def run_batch(self, jobs: list[FakeJob], limits: BatchLimits) -> list[JobOutcome]:
        self.batches.append([job.spec["echo"] for job in jobs])
        self.limits.append(limits)
        if any(job.spec.get("crash_batch") for job in jobs):
            raise RuntimeError("the shared forward broke")
        outcomes = []
        for job in jobs:
            outcome = JobOutcome(logs=[str(line) for line in job.spec.get("log", [])], rows=len(jobs))
            try:
                outcome.result = super().run(FakeJob(job.model_key, {**job.spec, "log": []}), lambda line: None)
            except JobFailed as failed:
                outcome.failure = failed
            outcomes.append(outcome)
        return outcomes


def _service(tmp_path, runner: Any = None, **settings: Any) -> JobService:
    service = JobService(ServerSettings(data_dir=tmp_path, **{"batch_wait_ms": 0, **settings}),
                         runner or BatchingFake())
    service.start()
    return service


def _user(service: JobService, name: str = "alice") -> Any:
    return service.keys.verify(service.keys.create(name)[0])


def _submit(service: JobService, user: Any, echo: str, **spec: Any) -> str:
    job_id, _ = service.accept(user, fake_payload(echo=echo, **spec), callback=None, client_version=None)
    return job_id


def _wait_finished(service: JobService, job_ids: list[str]) -> dict[str, Any]:
    deadline = time.monotonic() + GENEROUS_S
    while True:
        records = {job_id: service.store.get(job_id) for job_id in job_ids}
        if all(record is not None and record.terminal for record in records.values()):
            return records
        assert time.monotonic() < deadline, f"jobs did not finish: {[r.status for r in records.values()]}"
        time.sleep(0.01)


def _queue_behind_a_held_job(service: JobService, tmp_path, user: Any, jobs: list[tuple[str, dict]]) -> list[str]:
    """Submit a job the worker holds (it runs alone), then `jobs` (echo, spec), which wait in
    the queue until the held one ends: the worker then finds them all queued at once."""
    gate = Gate(tmp_path, "held")
    held = _submit(service, user, "held", hold=gate.path)
    deadline = time.monotonic() + GENEROUS_S
    while service.store.get(held).status != JobStatus.RUNNING.value:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ids = [_submit(service, user, echo, **spec) for echo, spec in jobs]
    gate.open()
    _wait_finished(service, [held, *ids])
    return ids


# -- gathering ---------------------------------------------------------------------------------


def test_jobs_share_only_with_equal_keys_and_the_rest_keep_their_order(tmp_path):
    runner = BatchingFake()
    service = _service(tmp_path, runner)
    try:
        user = _user(service)
        _queue_behind_a_held_job(service, tmp_path, user, [
            ("a1", {"key": "A"}), ("b1", {"key": "B"}), ("a2", {"key": "A"}), ("solo1", {}),
            ("b2", {"key": "B"}), ("a3", {"key": "A"}), ("solo2", {}),
        ])
        assert runner.batches == [["held"], ["a1", "a2", "a3"], ["b1", "b2"], ["solo1"], ["solo2"]]
        assert runner.limits == [service.settings.batch_limits] * 2
    finally:
        service.stop()


def test_a_batch_holds_at_most_max_rows_rows(tmp_path):
    runner = BatchingFake()
    service = _service(tmp_path, runner, batch_rows=3)
    try:
        user = _user(service)
        _queue_behind_a_held_job(service, tmp_path, user, [
            ("a1", {"key": "A", "rows": 2}), ("a2", {"key": "A", "rows": 2}), ("a3", {"key": "A", "rows": 1}),
            ("a4", {"key": "A", "rows": 1}), ("big", {"key": "A", "rows": 5}),
        ])
        # a2 does not fit beside a1 and waits (first in line) while a3 fills the room; a job
        # larger than the limit still runs, alone.
        assert runner.batches == [["held"], ["a1", "a3"], ["a2", "a4"], ["big"]]
    finally:
        service.stop()


def test_with_cobatching_off_every_job_runs_alone(tmp_path):
    runner = BatchingFake()
    service = _service(tmp_path, runner, cobatch=False)
    try:
        assert service.batch_limits is None
        user = _user(service)
        ids = _queue_behind_a_held_job(service, tmp_path, user, [(f"a{i}", {"key": "A"}) for i in range(3)])
        assert runner.batches == [["held"], ["a0"], ["a1"], ["a2"]]
        assert all(service.store.get(job_id).batch_rows is None for job_id in ids)
    finally:
        service.stop()


def test_a_runner_that_does_not_batch_runs_every_job_alone(tmp_path):
    service = _service(tmp_path, FakeRunner(["fake"]))
    try:
        assert not isinstance(service.runner, BatchingJobRunner) and service.batch_limits is None
        assert "does not batch" in service.cobatch_summary()
        user = _user(service)
        records = _wait_finished(service, [_submit(service, user, f"j{i}", key="A") for i in range(3)])
        assert {r.status for r in records.values()} == {"COMPLETED"} and {r.batch_rows for r in records.values()} == {None}
    finally:
        service.stop()


def test_a_job_cancelled_while_queued_is_not_run(tmp_path):
    runner = BatchingFake()
    service = _service(tmp_path, runner)
    try:
        user = _user(service)
        gate = Gate(tmp_path, "held")
        held = _submit(service, user, "held", hold=gate.path)
        ids = [_submit(service, user, f"a{i}", key="A") for i in range(3)]
        assert service.cancel(user, ids[1]).status == JobStatus.CANCELLED.value
        gate.open()
        records = _wait_finished(service, [held, *ids])
        assert ["a1"] not in runner.batches and all("a1" not in batch for batch in runner.batches)
        assert [records[i].status for i in ids] == ["COMPLETED", "CANCELLED", "COMPLETED"]
    finally:
        service.stop()


def _worker(limits: BatchLimits) -> tuple[ModelWorker, list[list[str]], threading.Event]:
    """A worker alone (no service): `batches` gets the ids of each batch it hands over."""
    batches: list[list[str]] = []
    handed = threading.Event()

    def execute(jobs: list[QueuedJob]) -> None:
        batches.append([job.job_id for job in jobs])
        handed.set()

    worker = ModelWorker("fake", execute, lambda key, waiting: None, limits)
    worker.start()
    return worker, batches, handed


def test_a_lone_job_waits_for_company_at_most_the_wait():
    worker, batches, handed = _worker(BatchLimits(max_rows=8, wait_seconds=0.05))
    try:
        worker.enqueue(QueuedJob("lone", None, share_key="A"))
        assert handed.wait(GENEROUS_S), "a lone job waited far longer than --batch-wait-ms"
        assert batches == [["lone"]]
    finally:
        worker.stop(GENEROUS_S)


def test_jobs_that_arrive_during_the_wait_join_the_batch():
    # A wait far longer than the test: the batch goes as soon as it is full (max_rows).
    worker, batches, handed = _worker(BatchLimits(max_rows=3, wait_seconds=3600))
    try:
        for name in ("a1", "b1", "a2", "a3", "a4"):
            worker.enqueue(QueuedJob(name, None, share_key=name[0]))
        assert handed.wait(GENEROUS_S)
        assert batches[0] == ["a1", "a2", "a3"]
    finally:
        worker.stop(GENEROUS_S)


def test_stopping_ends_the_wait_and_leaves_the_jobs_queued():
    worker, batches, _ = _worker(BatchLimits(max_rows=8, wait_seconds=3600))
    worker.enqueue(QueuedJob("a1", None, share_key="A"))
    worker.enqueue(QueuedJob("a2", None, share_key="A"))
    worker.stop(GENEROUS_S)
    assert not worker._thread.is_alive(), "stop() did not end the co-batching wait"
    assert batches == [] and worker.position("a1") == 1 and worker.position("a2") == 2


def test_a_job_cancelled_while_its_batch_gathers_drops_out():
    worker, batches, handed = _worker(BatchLimits(max_rows=8, wait_seconds=3600))
    try:
        worker.enqueue(QueuedJob("a1", None, share_key="A"))
        worker.enqueue(QueuedJob("a2", None, share_key="A"))
        # Queued or already gathered (the worker waits for more): either way it can go.
        assert worker.remove("a1") and worker.remove("a2")
        worker.enqueue(QueuedJob("b1", None, share_key=None))
        assert handed.wait(GENEROUS_S)
        assert batches == [["b1"]]
    finally:
        worker.stop(GENEROUS_S)


# -- how the jobs of a batch end --------------------------------------------------------------


def test_each_job_of_a_batch_ends_as_if_it_ran_alone(tmp_path):
    runner = BatchingFake()
    service = _service(tmp_path, runner)
    try:
        user = _user(service)
        good, bad, chatty = _queue_behind_a_held_job(service, tmp_path, user, [
            ("good", {"key": "A"}), ("bad", {"key": "A", "fail": "ValueError: boom"}),
            ("chatty", {"key": "A", "log": ["one", "two"]}),
        ])
        assert runner.batches[1] == ["good", "bad", "chatty"]
        records = {job_id: service.store.get(job_id) for job_id in (good, bad, chatty)}
        assert records[good].status == "COMPLETED" and records[chatty].status == "COMPLETED"
        assert decode_fake_result(service.results.read(good))["echo"] == "good"
        assert records[bad].status == "ERROR" and records[bad].error_category == "user"
        assert "ValueError: boom" in records[bad].description
        logs = [e.description for e in service.store.events_after(chatty) if e.status == "LOG"]
        assert logs == ["one", "two"]
        assert {r.batch_rows for r in records.values()} == {3}
        status = service.status_json(records[good])
        assert status["batch_rows"] == 3
        state = server_status(service, user)
        assert state["jobs"][0]["batch_rows"] == 3
        assert state["cobatch"] == {"enabled": True, "max_rows": 64, "max_tokens": 8192, "wait_ms": 0.0}
    finally:
        service.stop()


def test_a_batch_job_s_printed_text_is_bounded_like_a_live_job_s(tmp_path):
    from interlace.contract.policy import DEFAULT_POLICY

    runner = BatchingFake(DEFAULT_POLICY.model_copy(update={"max_log_bytes": 10}))
    service = _service(tmp_path, runner)
    try:
        user = _user(service)
        _, chatty = _queue_behind_a_held_job(service, tmp_path, user, [
            ("quiet", {"key": "A"}), ("chatty", {"key": "A", "log": ["0123456789abcdef", "more"]}),
        ])
        logs = [e.description for e in service.store.events_after(chatty) if e.status == "LOG"]
        assert len(logs) == 1 and logs[0].startswith("0123456789") and "abcdef" not in logs[0]
    finally:
        service.stop()


def test_a_failing_run_batch_ends_every_job_of_it_as_an_internal_error(tmp_path):
    runner = BatchingFake()
    service = _service(tmp_path, runner)
    try:
        user = _user(service)
        ids = _queue_behind_a_held_job(service, tmp_path, user, [
            ("a1", {"key": "A"}), ("a2", {"key": "A", "crash_batch": True}), ("b1", {"key": "B"}),
        ])
        records = [service.store.get(job_id) for job_id in ids]
        assert [(r.status, r.error_category) for r in records[:2]] == [("ERROR", "internal")] * 2
        assert all("RuntimeError: the shared forward broke" in r.description for r in records[:2])
        assert records[2].status == "COMPLETED"  # the next batch runs as usual
    finally:
        service.stop()


# -- settings, flags, start-up report ---------------------------------------------------------


def test_serve_flags_default_to_batch_limits_and_reach_the_settings():
    args = build_parser().parse_args(["serve"])
    defaults = BatchLimits()
    assert (args.batch_rows, args.batch_tokens, args.batch_wait_ms / 1000, args.no_cobatch) == \
        (defaults.max_rows, defaults.max_tokens, defaults.wait_seconds, False)
    assert ServerSettings().batch_limits == defaults
    args = build_parser().parse_args(["serve", "--batch-rows", "8", "--batch-tokens", "512",
                                      "--batch-wait-ms", "0", "--no-cobatch"])
    settings = ServerSettings(cobatch=not args.no_cobatch, batch_rows=args.batch_rows,
                              batch_tokens=args.batch_tokens, batch_wait_ms=args.batch_wait_ms)
    assert settings.batch_limits == BatchLimits(max_rows=8, max_tokens=512, wait_seconds=0.0, enabled=False)


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-rows", "0", "must be > 0"),
    ("--batch-rows", "1.5", "must be a whole number"),
    ("--batch-tokens", "-3", "must be > 0"),
    ("--batch-tokens", "many", "must be a whole number"),
    ("--batch-wait-ms", "-1", "between 0 and 1000"),
    ("--batch-wait-ms", "1001", "between 0 and 1000"),
    ("--batch-wait-ms", "soon", "a number of milliseconds"),
])
def test_serve_refuses_bad_cobatch_flags(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err


def test_the_start_up_report_says_whether_cobatching_is_on(tmp_path):
    on = JobService(ServerSettings(data_dir=tmp_path / "on", batch_rows=16, batch_tokens=1024, batch_wait_ms=5),
                    BatchingFake())
    off = JobService(ServerSettings(data_dir=tmp_path / "off", cobatch=False), BatchingFake())
    assert on.cobatch_summary().startswith("Co-batching: on") and "16 rows" in on.cobatch_summary()
    assert "1024 tokens" in on.cobatch_summary() and "5 ms" in on.cobatch_summary()
    assert off.cobatch_summary().startswith("Co-batching: off (--no-cobatch)")


# -- the job record: batch_rows and the schema migration --------------------------------------

# The jobs table of schema version 1, as released (before co-batching).
_V1_JOBS = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, key_id TEXT, model_key TEXT NOT NULL,
    status TEXT NOT NULL, description TEXT NOT NULL DEFAULT '', error_category TEXT, callback TEXT,
    client_version TEXT, payload_size INTEGER NOT NULL DEFAULT 0, result_size INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0, log_count INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    updated REAL NOT NULL, started REAL, finished REAL, expires_at REAL
);
INSERT INTO jobs (id, owner, model_key, status, description, created, updated)
    VALUES ('old', 'alice', 'fake', 'COMPLETED', 'Result ready (3 bytes).', 1.0, 2.0);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_gets_batch_rows_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "interlace.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_V1_JOBS)
    db = Database(path)
    try:
        assert db.query_one("PRAGMA user_version")[0] == SCHEMA_VERSION == 2
        store = JobStore(db)
        old = store.get("old")
        assert old.status == "COMPLETED" and old.batch_rows is None
        assert old.to_json()["batch_rows"] is None
        store.transition("old", JobStatus.COMPLETED, "again", batch_rows=4)
        assert store.get("old").batch_rows == 4
    finally:
        db.close()
    again = Database(path)  # opening it again migrates nothing twice
    try:
        assert JobStore(again).get("old").batch_rows == 4
    finally:
        again.close()


def test_a_new_database_has_batch_rows(tmp_path):
    db = Database(tmp_path / "interlace.db")
    try:
        columns = {row["name"] for row in db.query("PRAGMA table_info(jobs)")}
        assert "batch_rows" in columns and db.query_one("PRAGMA user_version")[0] == SCHEMA_VERSION
    finally:
        db.close()


# -- end to end: real traces on a server that co-batches --------------------------------------

PROMPTS = ["The Eiffel Tower is in the city of", "Madison Square Garden is located in the city of",
           "The capital of France is", "Rome is the capital of", "The largest ocean is the",
           "A cat sat on the", "Water boils at one hundred", "The first month of the year is"]


@pytest.fixture(scope="module")
def local_gpt2(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def test_concurrent_traces_on_a_cobatching_server_equal_local_runs(tmp_path, tiny_gpt2_path, local_gpt2):
    """Eight small traces from two API keys, submitted without waiting, on the thread runner
    with a long co-batching wait: each ends COMPLETED with exactly what a local trace of its
    prompt saves, and its status carries `batch_rows`."""
    model = local_gpt2
    args = ["--isolation", "thread", "--batch-wait-ms", "1000", "--batch-rows", "64"]
    with ServerProcess(tmp_path / "data", models=[str(tiny_gpt2_path)], fake=False, args=args) as server:
        keys = [server.create_key("alice"), server.create_key("bob")]
        submitted = []
        for index, prompt in enumerate(PROMPTS):
            key = keys[index % 2]
            backend = interlace.backends.RemoteBackend(model, blocking=False, host=server.url, api_key=key)
            with model.trace(prompt, backend=backend) as tracer:
                hidden = model.transformer.h[1].output.save()
                logits = model.lm_head.output.save()
            submitted.append((prompt, key, tracer.job))
        assert "Co-batching: " in server.log()
        for prompt, key, job in submitted:
            values = interlace.attach(job.id, host=server.url, api_key=key).result(timeout=GENEROUS_S * 3)
            with model.trace(prompt):
                hidden = model.transformer.h[1].output.save()
                logits = model.lm_head.output.save()
            # Tight, not bitwise: the server's process may use another thread count (another
            # summation order), and a shared forward multiplies more rows at once.
            torch.testing.assert_close(values["hidden"], hidden, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values["logits"], logits, rtol=1e-5, atol=1e-5)
            status = httpx.get(f"{server.url}/v1/jobs/{job.id}", headers={"X-Interlace-Key": key}, timeout=30).json()
            assert status["status"] == "COMPLETED"
            assert "batch_rows" in status
            # Whether a job shared a forward is the runner's to say (its outcome's rows): None
            # when it ran alone, else the rows of the shared forward.
            assert status["batch_rows"] is None or status["batch_rows"] >= 2
