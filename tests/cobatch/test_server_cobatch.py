"""Co-batching through a real `interlace serve` (issue 19): many users' small jobs on one
hosted model, submitted at once over HTTP, each ending exactly as it would alone.

One server per configuration (module-scoped): co-batching on with a 50 ms gathering wait and
a short per-job wall-clock limit (for the job that times out), and one with `--no-cobatch`.
Both use the default process isolation (the model runs in a confined worker process).
Payloads are the client's own encoding (`cobatch_helpers.Encoder`), posted concurrently by
threads, one HTTP client per API key. The truth is the raw transformers model under hooks,
one job at a time (`cobatch_helpers.RawTruth`).

Batching is made certain by state, not timing: the job that times out is submitted first and
the others only once it is RUNNING, so they queue behind it (for its whole time limit) and
the worker then gathers them.
"""

# The trace bodies bind the names they save, which run on the "server" side only (the
# encoder sends nothing back here): F841 would flag every one.
# ruff: noqa: F841

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import torch

import interlace
from cobatch_helpers import TOL, Encoder, RawTruth, ids_of  # tests/cobatch/cobatch_helpers.py
from interlace._version import __version__
from interlace.contract.policy import DEFAULT_POLICY
from interlace.contract.result import decode_result
from interlace.testing import ServerProcess
from server_flavor import serve_args  # tests/server_flavor.py: embedded, or on Ray

#: The co-batching server's per-job wall-clock limit: what the spinner runs into. The other
#: jobs take milliseconds of their own time (their clocks exclude their neighbours' bodies).
JOB_TIMEOUT_S = 5
GENEROUS_S = 180.0  # how long a test waits for what takes a second (a loaded machine)
FINAL = ("COMPLETED", "ERROR", "CANCELLED", "EXPIRED")


@dataclass
class Job:
    """One submitted job: which key sends it, its payload, and how to check its result."""

    name: str
    payload: bytes
    check: Callable[[dict[str, Any]], None] | None = None  # the values, when it must complete
    fails: str | None = None  # the text its failure must contain, when it must fail
    alone: bool = False  # it cannot share a forward: `batch_rows` must be null
    key: str = ""
    id: str = ""
    status: dict[str, Any] = field(default_factory=dict)


def _close(got: Any, expected: Any) -> None:
    torch.testing.assert_close(got, expected, **TOL)


def _check_equal(got: Any, expected: Any) -> None:
    assert got == expected


def _plus_five_at_last(h: torch.Tensor) -> torch.Tensor:
    h[:, -1] += 5
    return h


def _jobs(model: interlace.LanguageModel, raw: RawTruth, key: str) -> dict[str, Job]:
    """The jobs of the batch and their truths (encoded here, in order; submitted later)."""
    enc = Encoder(key, DEFAULT_POLICY)
    jobs: dict[str, Job] = {}

    def add(name: str, check: Callable[[dict[str, Any]], None] | None = None, **kw: Any) -> None:
        jobs[name] = Job(name, enc.last, check, **kw)

    s = {name: ids_of(100 + i) for i, name in enumerate(
        ["spin", "spin2", "raise", "read", "edit", "assign", "slice", "reader", "input", "zero", "skip", "generate",
         "two", "two_b", "last_a", "short", "probe"])}

    with model.trace(s["spin"], backend=enc):
        h = model.transformer.h[1].output.save()
        spun = 0
        for i in range(10**10):
            spun += i
    # Alone (it runs first), the worker's parent stops it at the limit; in a shared forward
    # (below) its own guard does, at the same limit: the others' clocks exclude its time.
    add("spin", fails=f"limit of {JOB_TIMEOUT_S} s")

    with model.trace(s["spin2"], backend=enc):
        h = model.transformer.h[2].output.save()
        spun = 0
        for i in range(10**10):
            spun += i
    add("spin2", fails=f"wall-time limit of {JOB_TIMEOUT_S} s")

    with model.trace(s["raise"], backend=enc):
        h = model.transformer.h[0].output.save()
        missing = {}["no such key"]
    add("raise", fails="KeyError: 'no such key'")

    with model.trace(s["read"], backend=enc):
        h1 = model.transformer.h[1].output.save()
        ln_in = model.transformer.ln_f.input.save()
    truth_read = raw.run(s["read"], outputs=("transformer.h.1",), inputs=("transformer.ln_f",))
    add("read", lambda v: (_close(v["h1"], truth_read["out:transformer.h.1"]),
                           _close(v["ln_in"], truth_read["in:transformer.ln_f"])))

    with model.trace(s["edit"], backend=enc):
        model.transformer.h[0].output[:, -1] += 5
        logits = model.lm_head.output.save()
    truth_edit = raw.run(s["edit"], edit_out={"transformer.h.0": _plus_five_at_last})
    add("edit", lambda v: _close(v["logits"], truth_edit["logits"]))

    with model.trace(s["assign"], backend=enc):
        model.transformer.h[1].output = model.transformer.h[1].output * 2
        logits = model.lm_head.output.save()
    truth_assign = raw.run(s["assign"], edit_out={"transformer.h.1": lambda h: h * 2})
    add("assign", lambda v: _close(v["logits"], truth_assign["logits"]))

    with model.trace(s["slice"], backend=enc):
        part = model.transformer.h[3].output[:, 2:5, :8].save()
    truth_slice = raw.run(s["slice"], outputs=("transformer.h.3",))
    add("slice", lambda v: _close(v["part"], truth_slice["out:transformer.h.3"][:, 2:5, :8]))

    with model.trace(s["reader"], backend=enc):  # reads what "edit" and "zero" edit: unedited
        h0 = model.transformer.h[0].output.save()
        h2 = model.transformer.h[2].output.save()
        logits = model.lm_head.output.save()
    truth_reader = raw.run(s["reader"], outputs=("transformer.h.0", "transformer.h.2"))
    add("reader", lambda v: (_close(v["h0"], truth_reader["out:transformer.h.0"]),
                             _close(v["h2"], truth_reader["out:transformer.h.2"]),
                             _close(v["logits"], truth_reader["logits"])))

    with model.trace(s["input"], backend=enc):
        model.transformer.h[2].input = model.transformer.h[2].input + 1
        logits = model.lm_head.output.save()
    truth_input = raw.run(s["input"], edit_in={"transformer.h.2": lambda h: h + 1})
    add("input", lambda v: _close(v["logits"], truth_input["logits"]))

    with model.trace(s["zero"], backend=enc):
        model.transformer.h[2].output[:] = 0
        logits = model.lm_head.output.save()
    truth_zero = raw.run(s["zero"], edit_out={"transformer.h.2": lambda h: h * 0})
    add("zero", lambda v: _close(v["logits"], truth_zero["logits"]))

    with model.trace(s["probe"], backend=enc):  # looks for its neighbours' rows: finds none
        h = model.transformer.h[2].output
        rows = interlace.save(h.shape[0])
        flat = interlace.save(h.reshape(-1).shape[0])
        try:
            other = h[1]
            reached = interlace.save(True)
        except IndexError:
            reached = interlace.save(False)
        mine = h[-1].save()
    truth_probe = raw.run(s["probe"], outputs=("transformer.h.2",))["out:transformer.h.2"]
    add("probe", lambda v: (_check_equal((v["rows"], v["flat"], v["reached"]), (1, truth_probe.numel(), False)),
                            _close(v["mine"], truth_probe[-1])))

    with model.trace(s["skip"], backend=enc):
        model.transformer.h[1].skip(model.transformer.h[0].output)
        logits = model.lm_head.output.save()
    h0_skip = raw.run(s["skip"], outputs=("transformer.h.0",))["out:transformer.h.0"]
    truth_skip = raw.run(s["skip"], edit_out={"transformer.h.1": lambda h: h0_skip})
    add("skip", lambda v: _close(v["logits"], truth_skip["logits"]), alone=True)

    with model.generate(s["generate"], max_new_tokens=3, do_sample=False, backend=enc):
        tokens = model.generator.output.save()
    with torch.no_grad():
        truth_tokens = raw.model.generate(torch.tensor([s["generate"]]), attention_mask=torch.ones(1, 8, dtype=torch.long),
                                          max_new_tokens=3, do_sample=False, pad_token_id=0)
    add("generate", lambda v: torch.testing.assert_close(v["tokens"], truth_tokens, rtol=0, atol=0), alone=True)

    with model.trace([s["two"], s["two_b"]], backend=enc):
        h = model.transformer.h[3].output[:, -1].save()
        logits = model.lm_head.output.save()
    truth_two = raw.run([s["two"], s["two_b"]], outputs=("transformer.h.3",))
    add("two", lambda v: (_close(v["h"], truth_two["out:transformer.h.3"][:, -1]),
                          _close(v["logits"], truth_two["logits"])))

    for name in ("last_a",):
        with model.trace(s[name], backend=enc):
            last = model.lm_head.output[:, -1].save()
        truth_last = raw.run(s[name])["logits"][:, -1]
        add(name, lambda v, t=truth_last: _close(v["last"], t))

    short = ids_of(120, n=5)  # another token count: its own forward, still correct
    with model.trace(short, backend=enc):
        logits = model.lm_head.output.save()
    truth_short = raw.run(short)["logits"]
    add("short", lambda v: _close(v["logits"], truth_short))
    assert len(jobs) == 16
    return jobs


@pytest.fixture(scope="module")
def raw(tiny_gpt2_path: Path) -> RawTruth:
    return RawTruth(tiny_gpt2_path)


@pytest.fixture(scope="module")
def jobs(tiny_gpt2_path: Path, raw: RawTruth) -> dict[str, Job]:
    return _jobs(interlace.LanguageModel(str(tiny_gpt2_path)), raw, str(tiny_gpt2_path))


def _serve(data_dir: Path, model: Path, *args: str) -> ServerProcess:
    server = ServerProcess(data_dir, models=[str(model)], fake=False, args=serve_args(*args)).start()
    server.keys = [server.create_key(f"user-{i}") for i in range(4)]  # type: ignore[attr-defined]
    return server


@pytest.fixture(scope="module")
def cobatching(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_path: Path):
    server = _serve(tmp_path_factory.mktemp("cobatch-on"), tiny_gpt2_path,
                    "--batch-wait-ms", "50", "--job-timeout", str(JOB_TIMEOUT_S))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_path: Path):
    server = _serve(tmp_path_factory.mktemp("cobatch-off"), tiny_gpt2_path, "--no-cobatch")
    yield server
    server.stop()


def _headers(key: str) -> dict[str, str]:
    return {"X-Interlace-Key": key, "X-Interlace-Version": __version__, "Content-Type": "application/octet-stream"}


def _submit(server: ServerProcess, key: str, batch: list[Job]) -> None:
    """One user's jobs, posted one after the other on that user's own connection."""
    with httpx.Client(base_url=server.url, headers=_headers(key), timeout=60) as http:
        for job in batch:
            response = http.post("/v1/jobs", content=job.payload)
            assert response.status_code in (200, 201, 202), response.text
            job.key, job.id = key, response.json()["id"]


def _status(server: ServerProcess, job: Job) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/jobs/{job.id}", headers=_headers(job.key), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _wait(server: ServerProcess, job: Job, states: tuple[str, ...] = FINAL) -> dict[str, Any]:
    deadline = time.monotonic() + GENEROUS_S
    while time.monotonic() < deadline:
        status = _status(server, job)
        if status["status"] in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job.name} did not reach {states} in {GENEROUS_S} s: {status}\n{server.log()[-3000:]}")


def _run_all(server: ServerProcess, jobs: list[Job], first: Job | None = None) -> None:
    """Submit `first` alone and wait until it runs; then the rest, concurrently from the four
    keys (job i from key i % 4); wait for every job to end and record its status."""
    keys = server.keys  # type: ignore[attr-defined]
    if first is not None:
        _submit(server, keys[0], [first])
        _wait(server, first, ("RUNNING", *FINAL))
    per_key = [[job for i, job in enumerate(jobs) if i % 4 == k] for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(_submit, server, keys[k], per_key[k]) for k in range(4)]:
            done.result()
    for job in ([first] if first is not None else []) + jobs:
        job.status = _wait(server, job)


def _check(server: ServerProcess, job: Job) -> None:
    status = job.status
    if job.fails is not None:
        assert status["status"] == "ERROR", (job.name, status)
        assert job.fails in status["description"], (job.name, status["description"])
        return
    assert status["status"] == "COMPLETED", (job.name, status.get("description"))
    data = httpx.get(f"{server.url}/v1/jobs/{job.id}/result", headers=_headers(job.key), timeout=60)
    assert data.status_code == 200, data.text
    assert job.check is not None
    job.check(decode_result(data.content))


def test_concurrent_jobs_of_four_users_share_forwards_and_each_gets_its_alone_result(cobatching, jobs):
    first = jobs["spin"]
    rest = [job for name, job in jobs.items() if name != "spin"]
    _run_all(cobatching, rest, first)
    for job in jobs.values():
        _check(cobatching, job)
    rows = {name: job.status["batch_rows"] for name, job in jobs.items()}
    # Jobs that cannot share ran alone; what could share did (they queued behind the spinner).
    assert rows["skip"] is None and rows["generate"] is None and rows["short"] is None, rows
    shared = [name for name, n in rows.items() if n is not None and n > 1]
    assert len(shared) >= 2, rows
    assert all(n is None or n > 1 for n in rows.values()), rows
    # The failing jobs' errors are their own: the right category, the line of their body.
    assert jobs["raise"].status["error_category"] == "KeyError", jobs["raise"].status
    assert 'missing = {}["no such key"]' in jobs["raise"].status["description"]
    assert rows["spin2"] is not None and rows["spin2"] > 1, rows  # it timed out in a shared forward
    assert jobs["spin2"].status["error_category"] == "JobLimitExceeded", jobs["spin2"].status
    assert "for i in range(10**10):" in jobs["spin2"].status["description"]


def test_with_cobatching_off_every_job_runs_alone_with_the_same_results(solo, jobs):
    names = ["read", "edit", "reader", "slice", "two", "last_a", "raise", "skip"]
    _run_all(solo, [jobs[name] for name in names])
    for name in names:
        _check(solo, jobs[name])
        assert jobs[name].status["batch_rows"] is None, jobs[name].status
