"""The real engine behind a real server: durability across kill -9 and bad input, with
payloads built by the client (not the fake runner)."""

from __future__ import annotations

import httpx
import pytest
import torch

import interlace
from interlace._version import __version__
from interlace.testing import ServerProcess

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


@pytest.fixture
def server(tmp_path, tiny_gpt2_path, monkeypatch):
    proc = ServerProcess(tmp_path / "data", models=[str(tiny_gpt2_path)], fake=False, args=["--max-upload-mb", "1"]).start()
    proc.key = proc.create_key("alice")
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", proc.url)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", proc.key)
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
    try:
        yield proc
    finally:
        proc.stop() if hasattr(proc, "stop") else proc.kill()


def _payload(model):
    backend = interlace.backends.LocalSimulationBackend(model)
    with model.trace(PROMPT, backend=backend):
        h = model.transformer.h[0].output.save()
    return backend.get_last_payload()


def test_kill_9_and_restart_lose_no_real_job(server, model):
    jobs = []
    for layer in range(4):
        with model.generate(PROMPT, max_new_tokens=12, do_sample=False, remote=True, blocking=False) as tracer:
            out = model.transformer.h[layer].output.save()
        jobs.append((layer, tracer.job.id))
    server.kill()
    server.start()
    for layer, job_id in jobs:
        values = interlace.attach(job_id).result(timeout=120)
        with model.generate(PROMPT, max_new_tokens=12, do_sample=False):
            expected = model.transformer.h[layer].output.save()
        assert torch.allclose(values["out"], expected, atol=1e-6)


def test_bad_input_gets_4xx_and_server_stays_healthy(server, model):
    headers = {"X-Interlace-Key": server.key, "X-Interlace-Version": __version__}
    good = _payload(model)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        garbage = http.post("/v1/jobs", content=b"\x00garbage" * 10, headers=headers)
        assert garbage.status_code == 400 and "could not be decoded" in garbage.json()["detail"]
        truncated = http.post("/v1/jobs", content=good[: len(good) // 2], headers=headers)
        assert truncated.status_code == 400
        oversize = http.post("/v1/jobs", content=b"\x00" * (2 * 1024 * 1024), headers=headers)
        assert oversize.status_code == 413
        unauthenticated = http.post("/v1/jobs", content=good, headers={"X-Interlace-Version": __version__})
        assert unauthenticated.status_code == 401
    with model.trace(PROMPT, remote=True):
        h = model.transformer.h[0].output.save()
    assert h.shape[0] == 1
