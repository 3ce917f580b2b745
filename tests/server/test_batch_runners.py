"""Co-batching in the job runners: `run_batch` gives each job the outcome it gets alone.

Both runners (`DefaultJobRunner`, models in this process; `ProcessJobRunner`, one worker
process per model) run a batch of prepared jobs, built by the client's own encoder (the
simulation backend's payload), with different bodies: a saved slice of a layer's output, an
in-place edit then saved logits, one that raises, one that prints, another prompt, two rows.
Each outcome must equal what `run` gives the same job alone, and the values must equal a
separately loaded transformers model under raw PyTorch hooks (`tests/raw_truth.py`). The
process runner must also survive its worker being killed during a batch: every other job
still completes, and the job that killed it fails alone with the usual reason.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest
import torch

import interlace
from interlace.backends.outbound import encode_for_remote
from interlace.contract.policy import DEFAULT_POLICY
from interlace.contract.result import decode_result
from interlace.execution.cobatch import BatchLimits, JobOutcome
from interlace.execution.errors import JobFailed
from interlace.execution.process import WorkerSpec
from interlace.server.runner import DefaultJobRunner, PayloadJob, ProcessJobRunner
from interlace.server.types import BatchingJobRunner
from raw_truth import RawLM  # tests/raw_truth.py

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Paris is the capital of a country called"
# Each job's CPU allowance in the worker: far above what a job on the tiny GPT-2 takes, and
# CPU time is not stretched by a loaded machine as a wall clock is. The killing job below
# burns CPU in one C call, where no guard in the worker can stop it: only the parent can.
CPU_SECONDS = 3.0
POLICY = DEFAULT_POLICY.model_copy(update={"cpu_seconds": CPU_SECONDS, "timeout_seconds": 120.0})
TOL = {"rtol": 1e-5, "atol": 1e-5}
LIMITS = BatchLimits()


@dataclass
class Job:
    """One job of the batch: its payload and what it must give (values, lines, or a failure)."""

    payload: bytes
    truth: dict[str, torch.Tensor]
    logs: list[str]
    raises: str | None = None


class Encoder:
    """A backend that only encodes: the client's own request encoder (`encode_for_remote`,
    which the HTTP client and the simulation call), without running the job here."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.payload: bytes | None = None

    def __call__(self, trace) -> dict:
        self.payload, _ = encode_for_remote(trace, self.key, POLICY, strict_remote=False)
        return {}


def _payload(model, backend: Encoder, write) -> bytes:
    backend.payload = None
    write(model, backend)
    assert backend.payload is not None
    return backend.payload


def _save_slice(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.transformer.h[0].output[:, -1, :8].save()  # noqa: F841 - a saved name


def _edit_then_logits(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.transformer.h[1].output[:, 2] = 0
        logits = model.lm_head.output.save()  # noqa: F841 - a saved name


def _raises(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.transformer.h[0].output.save()  # noqa: F841 - a saved name
        missing = {}["no such key"]  # noqa: F841 - raises here


def _prints(model, backend):
    with model.trace(PROMPT, backend=backend):
        print("hello from the printing job")
        print("its rows:", model.transformer.h[2].output.shape)
        norm = model.transformer.h[2].output.norm().save()  # noqa: F841 - a saved name


def _other_prompt(model, backend):
    with model.trace(OTHER, backend=backend):
        last = model.lm_head.output[:, -1].save()  # noqa: F841 - a saved name


def _two_rows(model, backend):
    with model.trace([PROMPT, PROMPT], backend=backend):
        h = model.transformer.h[3].output[:, -1, :4].save()  # noqa: F841 - a saved name


def _burns_cpu(model, backend):
    with model.trace(PROMPT, backend=backend):
        h = model.transformer.h[0].output[:, -1, :8].save()  # noqa: F841 - a saved name
        total = sum(range(10**13))  # noqa: F841 - one C call: no guard tick until it returns


def _generates(model, backend):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False, backend=backend):
        out = model.generator.output.save()  # noqa: F841 - a saved name


@pytest.fixture(scope="module")
def key(tiny_gpt2_path) -> str:
    return str(tiny_gpt2_path)


@pytest.fixture(scope="module")
def jobs(tiny_gpt2_path) -> dict[str, Job]:
    """The batch's jobs, and the truth for each from a transformers model under raw hooks."""
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    backend = Encoder(str(tiny_gpt2_path))
    raw = RawLM(tiny_gpt2_path)
    n = raw.n_tokens(PROMPT)

    def zero_position_2(module, args, out):
        out = out.clone()
        out[:, 2] = 0
        return out

    logits, seen = raw.run(PROMPT, capture=("transformer.h.0", "transformer.h.2"))
    edited, _ = raw.run(PROMPT, edits={"transformer.h.1": zero_position_2})
    other, _ = raw.run(OTHER)
    with torch.no_grad(), raw.hooks({"transformer.h.3": lambda m, a, out: seen.__setitem__("h3", out.clone())}):
        raw.model(**raw.tokenizer([PROMPT, PROMPT], return_tensors="pt"))
    return {
        "slice": Job(_payload(model, backend, _save_slice), {"h": seen["transformer.h.0"][:, -1, :8]}, []),
        "edit": Job(_payload(model, backend, _edit_then_logits), {"logits": edited}, []),
        "raises": Job(_payload(model, backend, _raises), {}, [], raises="KeyError"),
        "prints": Job(_payload(model, backend, _prints), {"norm": seen["transformer.h.2"].norm()},
                      ["hello from the printing job", f"its rows: torch.Size([1, {n}, 128])"]),
        "other": Job(_payload(model, backend, _other_prompt), {"last": other[:, -1]}, []),
        "two_rows": Job(_payload(model, backend, _two_rows), {"h": seen["h3"][:, -1, :4]}, []),
        "burns_cpu": Job(_payload(model, backend, _burns_cpu), {}, [], raises="cpu-limit"),
        "generates": Job(_payload(model, backend, _generates), {}, []),
    }


@pytest.fixture(scope="module")
def thread_runner(key) -> DefaultJobRunner:
    return DefaultJobRunner({key: interlace.LanguageModel(key, dispatch=True)}, policy=POLICY)


@pytest.fixture(scope="module")
def process_runner(key):
    runner = ProcessJobRunner({key: WorkerSpec(key, {"kind": "language_model", "path": key}, read_paths=(key,))},
                              policy=POLICY)
    yield runner
    runner.close()


@pytest.fixture(params=["thread", "process"])
def runner(request) -> BatchingJobRunner:
    return request.getfixturevalue(f"{request.param}_runner")


BATCH = ("slice", "edit", "raises", "prints", "other", "two_rows")


def _alone(runner, job) -> JobOutcome:
    outcome = JobOutcome()
    try:
        outcome.result = runner.run(job, outcome.logs.append)
    except JobFailed as failed:
        outcome.failure = failed
    return outcome


def _check(outcome: JobOutcome, job: Job, alone: JobOutcome | None = None) -> None:
    """`outcome` is what `job` must give; and, given, the same as its run alone."""
    assert outcome.logs == job.logs
    if job.raises is not None:
        assert outcome.result is None and outcome.failure is not None
        assert outcome.failure.category == job.raises, outcome.failure.traceback_text
    else:
        assert outcome.failure is None, outcome.failure.traceback_text
        values = decode_result(outcome.result)
        assert sorted(values) == sorted(job.truth)
        for name, expected in job.truth.items():
            torch.testing.assert_close(values[name], expected, **TOL)
    if alone is not None:
        assert outcome.logs == alone.logs
        if alone.failure is not None:
            assert outcome.failure is not None
            assert (outcome.failure.category, outcome.failure.traceback_text) == (
                alone.failure.category, alone.failure.traceback_text)
        else:
            got, expected = decode_result(outcome.result), decode_result(alone.result)
            assert sorted(got) == sorted(expected)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], **TOL)


def test_a_batch_gives_each_job_its_outcome_alone(runner, jobs):
    assert isinstance(runner, BatchingJobRunner)
    prepared = [runner.prepare(jobs[name].payload) for name in BATCH]
    assert len({runner.share_key(job) for job in prepared}) == 1 and runner.share_key(prepared[0]) is not None
    assert [runner.rows(job) for job in prepared] == [1, 1, 1, 1, 1, 2]
    outcomes = runner.run_batch(prepared, LIMITS)
    assert len(outcomes) == len(BATCH)
    for name, job, outcome in zip(BATCH, prepared, outcomes):
        _check(outcome, jobs[name], _alone(runner, job))
    # The raising job fails alone, with its own line and error.
    failed = outcomes[BATCH.index("raises")].failure
    assert failed is not None and failed.traceback_text.endswith("KeyError: 'no such key'")
    assert 'missing = {}["no such key"]' in failed.traceback_text and __file__ in failed.traceback_text


def test_a_batch_of_one_is_a_run(runner, jobs):
    for name in ("prints", "raises"):
        job = runner.prepare(jobs[name].payload)
        (outcome,) = runner.run_batch([job], LIMITS)
        _check(outcome, jobs[name], _alone(runner, job))


def test_share_keys_come_from_the_request_without_decoding_again(process_runner, thread_runner, jobs):
    for name in ("slice", "two_rows", "generates"):
        payload = jobs[name].payload
        job = process_runner.prepare(payload)
        assert isinstance(job, PayloadJob) and job.payload == payload
        same = thread_runner.prepare(payload)
        assert (process_runner.share_key(job), process_runner.rows(job)) == (
            thread_runner.share_key(same), thread_runner.rows(same))
    assert process_runner.share_key(process_runner.prepare(jobs["generates"].payload)) is None


def test_a_payload_the_worker_refuses_fails_alone(process_runner, jobs, key):
    good = process_runner.prepare(jobs["slice"].payload)
    outcomes = process_runner.run_batch([good, PayloadJob(key, b"not a payload"), good], LIMITS)
    _check(outcomes[0], jobs["slice"])
    _check(outcomes[2], jobs["slice"])
    assert outcomes[1].failure is not None and outcomes[1].failure.category == "invalid-request"
    assert "could not be decoded" in outcomes[1].failure.traceback_text


def test_a_worker_killed_during_a_batch_loses_no_job(process_runner, jobs):
    """The CPU-burning job holds the batch until the parent kills the worker at the batch's
    allowance (3 jobs x 3 s); then each job runs alone on a fresh worker: the burning one is
    killed at its own 3 s and says so, the others complete with their right values and lines."""
    supervisor = process_runner.supervisors[next(iter(process_runner.supervisors))]
    restarts = supervisor.restarts
    names = ("slice", "burns_cpu", "prints")
    outcomes = process_runner.run_batch([process_runner.prepare(jobs[name].payload) for name in names], LIMITS)
    for name, outcome in zip(names, outcomes):
        _check(outcome, jobs[name])
    killed = outcomes[1].failure
    assert killed is not None and killed.traceback_text.startswith("WorkerDied:")
    assert f"CPU-time limit of {CPU_SECONDS:g} s" in killed.traceback_text
    assert supervisor.restarts >= restarts + 2  # the batch's worker, then the burning job's


def test_a_batch_whose_worker_was_already_gone_runs_on_a_fresh_one(process_runner, jobs):
    supervisor = process_runner.supervisors[next(iter(process_runner.supervisors))]
    supervisor.start()
    worker = supervisor.worker
    assert worker is not None and worker.host_pid is not None
    os.kill(worker.host_pid, signal.SIGKILL)
    worker.proc.wait(10)
    restarts = supervisor.restarts
    names = ("slice", "prints", "edit")
    outcomes = process_runner.run_batch([process_runner.prepare(jobs[name].payload) for name in names], LIMITS)
    for name, outcome in zip(names, outcomes):
        _check(outcome, jobs[name])
    assert supervisor.restarts == restarts + 1
