"""`interlace serve --ray auto`: hosted models as Ray replica actors (issue 20).

One real server hosts the tiny GPT-2 and the tiny Llama, two replicas each, on a local Ray
instance of 2 CPUs (half a CPU per replica). Jobs go to the right model (values equal to the
raw transformers model under hooks, loaded here on its own), both replicas of a model take
jobs, and a replica actor killed during a job (SIGKILL to its process, as the OOM killer or a
lost node ends it) costs no job: it completes on another replica, and the killed one
is replaced. Eviction (`--max-hot-models 1`) is in test_ray_eviction.py; local blocks,
streaming, limits and co-batching through Ray are the embedded suites run again
(test_suites_on_ray.py).
"""

# The trace bodies bind names that run on the server only: F841 would flag them.
# ruff: noqa: F841

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import interlace
from interlace.testing import ServerProcess
from ray_helpers import RAY_AUTO, Encoder, model_state, result_of, submit, wait_for, wait_job
from raw_truth import RawLM  # tests/raw_truth.py

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (scripts/setup.sh does)")

PROMPTS = ["The quick brown fox", "Hello world, and then some", "Ray replicas share the load", "A tiny model"]
# A body that spins this many rounds of a Python loop after its reads: long enough to be
# killed in (seconds), far under the job limits. The kill waits for the job to be running.
SPIN = 4 * 10**6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_path: Path, tiny_llama_path: Path) -> Iterator[Any]:
    proc = ServerProcess(tmp_path_factory.mktemp("ray-two-models"), models=[str(tiny_gpt2_path), str(tiny_llama_path)],
                         fake=False, args=[*RAY_AUTO, "--replicas", "2"])
    proc.start(timeout=240)
    try:
        proc.key = proc.create_key("ray-tests")
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def on_server(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", server.url)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", server.key)
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
    return server


def _hidden_and_logits(model: interlace.LanguageModel, prompt: str, layers: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with model.trace(prompt, remote=True):
        hidden = layers(model)[0].output.save()
        logits = model.lm_head.output.save()
    return hidden, logits


def test_two_models_at_once_each_job_runs_on_its_own_model(on_server, tiny_gpt2_path, tiny_llama_path):
    gpt2, llama = interlace.LanguageModel(str(tiny_gpt2_path)), interlace.LanguageModel(str(tiny_llama_path))
    cases = [(gpt2, RawLM(tiny_gpt2_path), "transformer.h.0", lambda m: m.transformer.h),
             (llama, RawLM(tiny_llama_path), "model.layers.0", lambda m: m.model.layers)]
    with ThreadPoolExecutor(4) as pool:  # both models' jobs in flight together
        futures = [(case, prompt, pool.submit(_hidden_and_logits, case[0], prompt, case[3]))
                   for case in cases for prompt in PROMPTS[:2]]
        for (model, raw, layer, _), prompt, future in futures:
            hidden, logits = future.result()
            truth_logits, seen = raw.run(prompt, capture=(layer,))
            torch.testing.assert_close(logits, truth_logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(hidden, seen[layer][0] if isinstance(seen[layer], tuple) else seen[layer],
                                       rtol=0, atol=1e-5)
    for path in (tiny_gpt2_path, tiny_llama_path):
        state = model_state(on_server, on_server.key, str(path))
        assert state["state"] == "hot" and state["isolation"] == "ray", state
        assert len(state["replicas"]) == 2 and all(r["node"] and r["id"] for r in state["replicas"]), state


def test_two_replicas_of_a_model_share_its_jobs(on_server, tiny_gpt2_path):
    gpt2, raw = interlace.LanguageModel(str(tiny_gpt2_path)), RawLM(tiny_gpt2_path)
    before = {r["name"]: r["jobs"] for r in model_state(on_server, on_server.key, str(tiny_gpt2_path))["replicas"]}
    with ThreadPoolExecutor(4) as pool:
        futures = [(prompt, pool.submit(_hidden_and_logits, gpt2, prompt, lambda m: m.transformer.h))
                   for prompt in PROMPTS * 2]
        for prompt, future in futures:
            torch.testing.assert_close(future.result()[1], raw.run(prompt)[0], rtol=0, atol=1e-5)
    after = {r["name"]: r["jobs"] for r in model_state(on_server, on_server.key, str(tiny_gpt2_path))["replicas"]}
    ran = {name: after[name] - before.get(name, 0) for name in after}
    assert len(ran) == 2 and all(n > 0 for n in ran.values()), ran  # both replicas ran some of them
    assert sum(ran.values()) == len(futures), ran


def test_a_replica_killed_mid_job_loses_no_job(server, tiny_gpt2_path):
    key = str(tiny_gpt2_path)
    gpt2, raw = interlace.LanguageModel(key), RawLM(tiny_gpt2_path)
    encoder = Encoder(key)
    with gpt2.trace(PROMPTS[2], backend=encoder):
        hidden = gpt2.transformer.h[1].output.save()
        spun = 0
        for i in range(SPIN):
            spun += i
        total = interlace.save(spun)
    job = submit(server, server.key, encoder.payload)
    wait_job(server, job, ("RUNNING",))
    busy = wait_for(lambda: next((r for r in model_state(server, server.key, key)["replicas"] if r["busy"]), None),
                    server, "a busy replica")
    # Its actor's process dies as the kernel's OOM killer or a lost node would end it.
    os.kill(busy["pid"], signal.SIGKILL)
    final = wait_job(server, job)
    assert final["status"] == "COMPLETED", final  # run again on the other replica
    values = result_of(server, job)
    _, seen = raw.run(PROMPTS[2], capture=("transformer.h.1",))
    truth = seen["transformer.h.1"]
    torch.testing.assert_close(values["hidden"], truth[0] if isinstance(truth, tuple) else truth, rtol=0, atol=1e-5)
    assert values["total"] == SPIN * (SPIN - 1) // 2
    # The killed replica is replaced by a fresh actor under the same name.
    replaced = wait_for(lambda: next((r for r in model_state(server, server.key, key)["replicas"]
                                      if r["name"] == busy["name"] and r["id"] != busy["id"]), None),
                        server, f"a replacement for {busy['name']}")
    assert replaced["node"]
    assert "died during a job (attempt 1)" in server.log()  # the job was running when it died
