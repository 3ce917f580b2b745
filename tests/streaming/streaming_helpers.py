"""Helpers for the hybrid-execution tests: truth comparisons, job polling, source lines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

import interlace
from raw_truth import RawLM  # tests/raw_truth.py

__all__ = ["PROMPT", "JOB_WAIT_SECONDS", "BLOCK_LIMIT_S", "GRACE_S", "assert_same", "assert_runs_a_normal_job", "wait_until_final", "line_of"]

PROMPT = "The Eiffel Tower is in the city of"

#: How long a test waits for a job to reach a final state: a bound for a machine busy with
#: other test runs, not a margin the test relies on (the wait ends when the state arrives).
JOB_WAIT_SECONDS = 120.0

#: The limits of the failure tests' server and simulation: seconds per local block, and seconds
#: a job waits for a client that is not there (shorter, so the two cannot be confused).
BLOCK_LIMIT_S = 2
GRACE_S = 1


def assert_same(mine: Any, truth: torch.Tensor, mode: Any) -> None:
    """`mine` is the raw model's value: bitwise when it was computed in this process (the
    local run and the simulation use this process's threads, as the raw copy does); to float
    rounding when a server computed it, whose matmuls may split work over other thread
    counts. (Transport itself is checked bitwise elsewhere: against the body's own copy.)"""
    assert isinstance(mine, torch.Tensor), type(mine)
    if mode is True:
        torch.testing.assert_close(mine, truth, rtol=0, atol=1e-6)
    else:
        assert torch.equal(mine, truth), (mine - truth).abs().max()


def assert_runs_a_normal_job(model: interlace.LanguageModel, raw: RawLM, **options: Any) -> None:
    """After a failed job: the same server (or simulation) runs an ordinary trace right, so the
    failure freed the worker and left the model as it was."""
    with model.trace(PROMPT, **options):
        hidden = model.transformer.h[2].output.save()
        logits = model.lm_head.output.save()
    expected, seen = raw.run(PROMPT, capture=("transformer.h.2",))
    torch.testing.assert_close(hidden, seen["transformer.h.2"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def wait_until_final(job: Any) -> dict[str, Any]:
    """Poll a submitted job's status until it is final (never attaching as its client)."""
    from interlace.contract.http import TERMINAL

    final = {state.value for state in TERMINAL}
    deadline = time.monotonic() + JOB_WAIT_SECONDS
    while time.monotonic() < deadline:
        status = job.status()
        if status["status"] in final:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} still {status['status']} after {JOB_WAIT_SECONDS:.0f} s: {status}")


def line_of(path: str, marker: str) -> int:
    """The number of the one line of `path` that holds `marker` (a comment beside the code)."""
    lines = [n for n, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1)
             if marker in text and "line_of(" not in text]
    assert len(lines) == 1, (marker, lines)
    return lines[0]
