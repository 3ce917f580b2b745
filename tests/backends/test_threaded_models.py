"""Several threads, each tracing its own lazily loaded `LanguageModel` of one path, at once.

Each model loads its weights at its first run (no `dispatch=True`), so the loads meet in
threads: transformers patches classes while it builds (`PreTrainedModel.tie_weights` made a
no-op), and two builds at once used to leave it a no-op for the process, every later model's
`lm_head` on the meta device, and the simulation's guard recursing until `RecursionError`
(`execution/integrity.py`: `BUILD_LOCK`). The truth is a separately loaded transformers copy
run under raw hooks (`tests/raw_truth.py`), never Interlace.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import interlace
from raw_truth import RawLM  # tests/raw_truth.py

THREADS = 4
TRACES = 3
PROMPTS = (
    "The Eiffel Tower is in the city of",
    "Madison Square Garden is located in the city of",
    "The capital of Japan is",
    "Water boils at one hundred degrees",
)


@pytest.fixture(scope="module")
def truth(tiny_gpt2_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    raw = RawLM(tiny_gpt2_path)
    out = {}
    for prompt in PROMPTS:
        logits, seen = raw.run(prompt, capture=("transformer.h.1",))
        out[prompt] = (logits, seen["transformer.h.1"][0])
    return out


def _run_threads(path: Path, remotes: list[list[Any]]) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Thread k builds its own model from `path` and traces `PROMPTS[k]` once per entry of
    `remotes[k]` (the `remote=` of that trace); all start their first trace together."""
    results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    errors: list[tuple[int, BaseException]] = []
    start = threading.Barrier(len(remotes))

    def work(k: int) -> None:
        try:
            model = interlace.LanguageModel(str(path))
            start.wait(timeout=120)
            for i, remote in enumerate(remotes[k]):
                with model.trace(PROMPTS[k], remote=remote):
                    hidden = model.transformer.h[1].output[0].save()
                    logits = model.lm_head.output.save()
                results[(k, i)] = (logits, hidden)
        except BaseException as error:  # noqa: BLE001 - reported below, with the thread
            errors.append((k, error))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(remotes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, [(k, repr(e)) for k, e in errors]
    return results


def _check(results: dict, remotes: list[list[Any]], truth: dict) -> None:
    assert set(results) == {(k, i) for k in range(len(remotes)) for i in range(len(remotes[k]))}
    for (k, i), (logits, hidden) in results.items():
        want_logits, want_hidden = truth[PROMPTS[k]]
        assert logits.device.type == "cpu" and hidden.device.type == "cpu", (k, i, remotes[k][i])
        torch.testing.assert_close(hidden, want_hidden, msg=lambda m: f"thread {k} trace {i}: {m}")
        torch.testing.assert_close(logits, want_logits, msg=lambda m: f"thread {k} trace {i}: {m}")


def test_lazy_models_in_threads_simulated(tiny_gpt2_path: Path, truth) -> None:
    remotes = [["local"] * TRACES for _ in range(THREADS)]
    _check(_run_threads(tiny_gpt2_path, remotes), remotes, truth)


def test_lazy_models_in_threads_simulated_and_local_mixed(tiny_gpt2_path: Path, truth) -> None:
    # Half the threads load at a local run, half at a simulated one; each then alternates.
    remotes = [[("local", False)[(k + i) % 2] for i in range(TRACES + 1)] for k in range(THREADS)]
    _check(_run_threads(tiny_gpt2_path, remotes), remotes, truth)


def test_lazy_models_in_threads_simulated_without_history(tiny_gpt2_path: Path, truth,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interlace.CONFIG.APP, "HISTORY", False)
    remotes = [["local"] * TRACES for _ in range(THREADS)]
    _check(_run_threads(tiny_gpt2_path, remotes), remotes, truth)


def test_models_in_threads_on_the_server(tiny_gpt2_path: Path, truth, use_server) -> None:
    remotes = [[True] * 2 for _ in range(THREADS)]
    _check(_run_threads(tiny_gpt2_path, remotes), remotes, truth)
