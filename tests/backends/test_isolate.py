"""`remote='local', isolate=True`: the simulation runs the job in a confined worker process
(the server's layer 3) on the model loaded from the caller's model's files."""

from __future__ import annotations

import pytest
import torch

import interlace
from interlace.backends.simulation import _WORKERS, close_isolated_workers
from interlace.errors import RemoteException

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    yield model
    close_isolated_workers()


def test_isolated_results_equal_in_process_and_local(model, monkeypatch):
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
    with model.trace(PROMPT, remote="local", isolate=True):
        hidden = model.transformer.h[2].output.save()
        print("from the worker")
    with model.trace(PROMPT, remote="local"):
        simulated = model.transformer.h[2].output.save()
    with model.trace(PROMPT):
        local = model.transformer.h[2].output.save()
    assert torch.equal(hidden, simulated) and torch.equal(hidden, local)
    with model.generate(PROMPT, max_new_tokens=4, do_sample=False, remote="local", isolate=True):
        tokens = model.generator.output.save()
    with model.generate(PROMPT, max_new_tokens=4, do_sample=False):
        expected = model.generator.output.save()
    assert torch.equal(tokens, expected)
    assert len(_WORKERS) == 1  # one worker, reused


def test_job_error_is_the_same_remote_exception(model):
    for isolate in (False, True):
        with pytest.raises(RemoteException) as info:
            with model.trace(PROMPT, remote="local", isolate=isolate):
                x = model.transformer.h[0].output
                y = 1 / 0
        assert "ZeroDivisionError" in str(info.value)


def test_the_worker_cannot_see_the_callers_environment(model, monkeypatch):
    # What the worker process holds: its own environment, not the caller's.
    monkeypatch.setenv("INTERLACE_TEST_CALLER_SECRET", "canary-51c2")
    close_isolated_workers()  # the next worker starts with the secret in our environment
    with model.trace(PROMPT, remote="local", isolate=True):
        out = model.lm_head.output.save()
    (supervisor,) = _WORKERS.values()
    pid = supervisor.worker.host_pid
    assert b"canary-51c2" not in open(f"/proc/{pid}/environ", "rb").read()
    assert out.shape[-1] == model._module.config.vocab_size


def test_a_config_switch_makes_it_the_default(model, monkeypatch):
    monkeypatch.setattr(interlace.CONFIG.APP, "ISOLATE_LOCAL", True)
    close_isolated_workers()
    with model.trace(PROMPT, remote="local"):
        out = model.lm_head.output.save()
    assert len(_WORKERS) == 1 and out.shape[0] == 1


def test_a_model_not_loaded_from_files_is_refused_clearly(tiny_gpt2_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    plain = interlace.NNsight(module)
    with pytest.raises(RemoteException) as info:
        with plain.trace(torch.ones(1, 4), remote="local", isolate=True):
            out = plain.output.save()
    assert "was not loaded from a path or hub id" in str(info.value)
    assert "isolate=True" in str(info.value)


def test_isolate_is_only_for_remote_local(model):
    with pytest.raises(TypeError) as info:
        with model.trace(PROMPT, isolate=True):
            pass
    assert "remote='local'" in str(info.value)
