"""`interlace serve --ray auto --max-hot-models 1`, one replica a model: models load on demand
and the least recently used one is stopped to load another; GET /v1/status says which is hot,
loading or cold, and where (the replica actor's id and node). Also on this server: a model that
cannot load fails its job with the reason, and a co-batch whose replica dies runs again on the
replacement. Values are checked against the raw transformers model, loaded here on its own."""

# ruff: noqa: F841

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

import interlace
from interlace._version import __version__
from interlace.contract.http import MODEL_META, path
from interlace.testing import ServerProcess
from ray_helpers import GENEROUS_S, RAY_AUTO, Encoder, model_state, result_of, submit, wait_for, wait_job
from raw_truth import RawLM  # tests/raw_truth.py

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (scripts/setup.sh does)")

PROMPT = "Only one model fits"
# Rounds of a Python loop a job spins after its forward: seconds, far under the job limits.
SPIN = 3 * 10**6


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose config is not a model's (a third hosted model, never loadable)."""
    folder = tmp_path_factory.mktemp("broken-model")
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_path: Path, tiny_llama_path: Path,
           broken_model: Path) -> Iterator[Any]:
    proc = ServerProcess(tmp_path_factory.mktemp("ray-lru"),
                         models=[str(tiny_gpt2_path), str(tiny_llama_path), str(broken_model)],
                         fake=False, args=[*RAY_AUTO, "--max-hot-models", "1"])
    proc.start(timeout=240)
    try:
        proc.key = proc.create_key("ray-lru")
        yield proc
    finally:
        proc.stop()


def _meta(server: Any, key: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}{path(MODEL_META, model_key=key)}", timeout=GENEROUS_S,
                         headers={"X-Interlace-Key": server.key, "X-Interlace-Version": __version__})
    assert response.status_code == 200, response.text
    return response.json()


def _run(server: Any, model_path: Path) -> tuple[list[str], torch.Tensor]:
    """Submit one job on the model at `model_path`; the model's states seen until it ended, and its logits."""
    key = str(model_path)
    model = interlace.LanguageModel(key)
    encoder = Encoder(key)
    with model.trace(PROMPT, backend=encoder):
        logits = model.lm_head.output.save()
    job = submit(server, server.key, encoder.payload)
    seen: list[str] = []

    def ended() -> dict[str, Any] | None:
        state = model_state(server, server.key, key)["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        final = wait_job(server, job, ("COMPLETED", "ERROR", "QUEUED", "RUNNING"))
        return final if final["status"] in ("COMPLETED", "ERROR") else None

    final = wait_for(ended, server, f"the job on {key}")
    assert final["status"] == "COMPLETED", final
    return seen, result_of(server, job)["logits"]


def test_a_cold_models_description_loads_it(server, tiny_gpt2_path, tiny_llama_path):
    """GET /v1/models/{key}/meta (what a client builds the model from, without weights) works
    for a cold model: it is loaded for it, as for a job, and the least recently used stopped."""
    from transformers import AutoConfig

    llama = str(tiny_llama_path)
    assert model_state(server, server.key, llama)["state"] == "cold"  # never loaded (the module's first test)
    meta = _meta(server, llama)
    assert meta["architecture"] == AutoConfig.from_pretrained(llama).architectures[0], meta["architecture"]
    assert model_state(server, server.key, llama)["state"] == "hot"
    assert model_state(server, server.key, str(tiny_gpt2_path))["state"] == "cold"


def test_models_load_on_demand_and_the_least_recently_used_is_stopped(server, tiny_gpt2_path, tiny_llama_path):
    gpt2, llama = str(tiny_gpt2_path), str(tiny_llama_path)
    assert model_state(server, server.key, gpt2)["state"] == "cold"

    seen, logits = _run(server, tiny_gpt2_path)
    torch.testing.assert_close(logits, RawLM(tiny_gpt2_path).run(PROMPT)[0], rtol=0, atol=1e-5)
    assert "loading" in seen, seen  # its first job started its replica
    hot = model_state(server, server.key, gpt2)
    assert hot["state"] == "hot" and hot["replicas"][0]["node"] and hot["replicas"][0]["id"], hot
    assert model_state(server, server.key, llama)["state"] == "cold"

    seen, logits = _run(server, tiny_llama_path)
    torch.testing.assert_close(logits, RawLM(tiny_llama_path).run(PROMPT)[0], rtol=0, atol=1e-5)
    assert "loading" in seen, seen
    assert model_state(server, server.key, llama)["state"] == "hot"
    stopped = model_state(server, server.key, gpt2)
    assert stopped["state"] == "cold" and stopped["replicas"] == [], stopped  # the least recently used

    # Back to the first model: loaded again, the same answer.
    seen, logits = _run(server, tiny_gpt2_path)
    torch.testing.assert_close(logits, RawLM(tiny_gpt2_path).run(PROMPT)[0], rtol=0, atol=1e-5)
    assert model_state(server, server.key, gpt2)["state"] == "hot"
    assert model_state(server, server.key, llama)["state"] == "cold"
    # A model described once keeps its description: asking again does not load it.
    assert _meta(server, llama)["architecture"] == "LlamaForCausalLM"
    assert model_state(server, server.key, llama)["state"] == "cold"



def test_a_model_that_cannot_load_fails_its_job_with_the_reason(server, broken_model, tiny_gpt2_path):
    """A hosted model whose files do not load (found at its first job, not at start: models
    load on demand) fails that job with the worker's reason, and stays cold."""
    key = str(broken_model)
    model = interlace.LanguageModel(str(tiny_gpt2_path))  # only encodes; the key is the broken model's
    encoder = Encoder(key)
    with model.trace(PROMPT, backend=encoder):
        logits = model.lm_head.output.save()
    job = submit(server, server.key, encoder.payload)
    final = wait_job(server, job)
    assert final["status"] == "ERROR", final
    assert "could not start" in final["description"] and "server problem" in final["description"], final
    assert model_state(server, server.key, key)["state"] == "cold"


def _ids(seed: int) -> list[int]:
    """Eight token ids of the tiny models' vocabulary, different per seed, the same length (so
    the jobs may share a forward)."""
    return [(seed * 37 + 11 * i) % 500 + 1 for i in range(8)]


def test_a_co_batch_whose_replica_dies_runs_again_on_its_replacement(server, tiny_gpt2_path):
    """One replica (this server's): a job holds it while three more queue with equal share keys;
    the three then run as one co-batch, and the replica's process is killed during it. The
    batch runs again on the replacement replica: every job completes with its own values."""
    key = str(tiny_gpt2_path)
    model, raw = interlace.LanguageModel(key), RawLM(tiny_gpt2_path)
    payloads = []
    for seed in range(4):
        encoder = Encoder(key)
        with model.trace([_ids(seed)], backend=encoder):
            logits = model.lm_head.output.save()
            spun = 0
            for i in range(SPIN):
                spun += i
        payloads.append(encoder.payload)
    first = submit(server, server.key, payloads[0])
    wait_job(server, first, ("RUNNING",))
    rest = [submit(server, server.key, payload) for payload in payloads[1:]]
    for job in rest:  # taken together once the first ends
        wait_job(server, job, ("RUNNING", "COMPLETED", "ERROR"))
    replica = model_state(server, server.key, key)["replicas"][0]
    os.kill(replica["pid"], signal.SIGKILL)  # as the OOM killer or a lost node ends it
    for seed, job in enumerate([first, *rest]):
        final = wait_job(server, job)
        assert final["status"] == "COMPLETED", final
        with torch.no_grad():
            truth = raw.model(input_ids=torch.tensor([_ids(seed)])).logits
        torch.testing.assert_close(result_of(server, job)["logits"], truth, rtol=0, atol=1e-5)
    rows = [wait_job(server, job)["batch_rows"] for job in rest]
    assert all(n is not None and n > 1 for n in rows), rows  # they shared a forward
    assert "died during a co-batch of 3 jobs (attempt 1)" in server.log()
