"""Invariant 1 end to end: the corpus gives the same outcome under remote='local' and against a
real `interlace serve` (remote=True): the same values, or the same error category and message."""

from __future__ import annotations

import asyncio

import pytest
import torch

import interlace
from interlace.backends import outbound
from interlace.contract.policy import Policy
from interlace.testing import ServerProcess

import corpus_cases as corpus


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gpt2_path):
    with ServerProcess(tmp_path_factory.mktemp("e2e"), models=[str(tiny_gpt2_path)], fake=False) as proc:
        proc.key = proc.create_key("alice")
        proc.other_key = proc.create_key("bob")
        yield proc


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


@pytest.fixture(autouse=True)
def configured(server, monkeypatch):
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", server.url)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", server.key)
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    return a == b


@pytest.mark.parametrize("case", corpus.PASSING, ids=lambda f: f.__name__)
def test_remote_matches_simulation(model, case):
    simulated = case(model, "local")
    remote = case(model, True)
    assert simulated.keys() == remote.keys()
    for name in simulated:
        assert _same(simulated[name], remote[name]), name


def _outcome(case, model, mode):
    try:
        case(model, mode)
    except interlace.RemoteValidationError as e:
        return "validation", sorted((p.category, p.filename, p.lineno, p.message) for p in e.problems)
    except interlace.RemoteException as e:
        return "remote", e.category, str(e)
    return "passed", None


@pytest.mark.parametrize("case,category", [c for c in corpus.FAILING if c[1] != "payload-too-large"], ids=lambda x: getattr(x, "__name__", x))
def test_remote_fails_like_simulation(model, case, category):
    simulated = _outcome(case, model, "local")
    remote = _outcome(case, model, True)
    assert simulated[0] != "passed"
    assert simulated == remote


def test_server_rejects_what_the_client_would(server, model, monkeypatch):
    """A client that skips its own checks still gets the same problems from the server (422)."""
    from interlace.backends import remote as remote_backend

    monkeypatch.setattr(outbound, "validate_request", lambda *a, **k: [])
    monkeypatch.setattr(remote_backend, "encode_for_remote", _encode_without_client_checks)
    with pytest.raises(interlace.RemoteValidationError) as info:
        corpus.f_file_io(model, True)
    assert "file-io" in info.value.categories


def _encode_without_client_checks(trace, key, policy, *, strict_remote):
    from interlace.backends.outbound import build_request
    from interlace.contract.request import encode_request

    built = build_request(trace, key, policy, strict_remote=strict_remote)
    return encode_request(built), built


def test_non_blocking_reattach_and_async(model):
    with model.trace(corpus.PROMPT, remote=True, blocking=False) as tracer:
        logits = model.lm_head.output.save()
    job = tracer.job
    assert isinstance(job.id, str) and job.status()["status"] in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED")
    again = interlace.attach(job.id)
    values = again.result(timeout=60)
    with model.trace(corpus.PROMPT):
        expected = model.lm_head.output.save()
    assert torch.allclose(values["logits"], expected, atol=1e-6)
    assert torch.allclose(asyncio.run(again.async_result())["logits"], expected, atol=1e-6)


def test_another_users_job_is_invisible(server, model):
    with model.trace(corpus.PROMPT, remote=True, blocking=False) as tracer:
        h = model.transformer.h[0].output.save()
    with pytest.raises(Exception) as info:
        interlace.attach(tracer.job.id, api_key=server.other_key).result(timeout=30)
    assert "404" in str(info.value)


def test_unknown_model_is_refused(server, tiny_llama_path):
    other = interlace.LanguageModel(str(tiny_llama_path))
    with pytest.raises(Exception) as info:
        with other.trace(corpus.PROMPT, remote=True):
            h = other.model.layers[0].output.save()
    assert "404" in str(info.value) and "does not host" in str(info.value)


def test_a_job_cannot_change_the_model_for_the_next_user(server, model):
    with model.trace(corpus.PROMPT, remote=True):
        before = model.lm_head.output.save()
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(corpus.PROMPT, remote=True):
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[:] = 0
            h = model.transformer.h[0].output.save()
    assert info.value.category == "model-modified"
    with model.trace(corpus.PROMPT, remote=True):
        after = model.lm_head.output.save()
    assert torch.equal(before, after), "the server restored the weights"
