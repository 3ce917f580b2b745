"""`mocks=`: a stand-in runs in a module's place (and its whole subtree's) for one run, here
(`remote=False`) and on the simulated server side (`remote='local'`), never on a server.

The truth for every value is a separately loaded copy of the model (`raw_truth.RawLM`) run
under plain PyTorch forward hooks that return the stand-in's output in place of the module's.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import interlace
from interlace import ModuleNotCalledError, RemoteException, TraceOptionError
from interlace.backends.remote import RemoteBackend
from interlace.tracing.mock import MockError
from raw_truth import RawLM

PROMPT = "The Eiffel Tower is in the city of"
TOL = 1e-5
HERE = [False, "local"]


def squash(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The stand-in the tests use: a cheap function of the module's first input."""
    return torch.tanh(hidden) * 0.5


@pytest.fixture(scope="module")
def raw(tiny_gpt2_path: Path) -> RawLM:
    return RawLM(tiny_gpt2_path)


@pytest.fixture(scope="module")
def model(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    return interlace.LanguageModel(str(tiny_gpt2_path))


def replaced_by(stand_in: Any) -> Any:
    """A raw forward hook that returns the stand-in's output for the module's inputs."""
    return lambda module, args, out: stand_in(*args)


def raw_run(raw: RawLM, capture: tuple[str, ...], edits: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    return raw.run(PROMPT, capture=capture, edits=edits)


def no_instance_forwards(model: interlace.LanguageModel) -> list[str]:
    """Modules that still have an instance `forward` (a mock or a wrapper left behind)."""
    return [name for name, m in model._module.named_modules() if "forward" in m.__dict__]


def full_text(error: BaseException) -> str:
    """The error as a user sees it printed: traceback (with the body's lines), message, notes."""
    return "".join(traceback.format_exception(error))


# -- a mock replaces a module's computation --------------------------------------------------

@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_a_mock_replaces_the_modules_computation(model, raw, mode):
    with model.trace(PROMPT, remote=mode, mocks={"transformer.h.0.mlp": squash}):
        attn = model.transformer.h[0].attn.output[0].save()
        mlp_in = model.transformer.h[0].mlp.input.save()
        mlp_out = model.transformer.h[0].mlp.output.save()
        h1 = model.transformer.h[1].output.save()
        logits = model.lm_head.output.save()

    capture = ("transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1")
    want_logits, want = raw_run(raw, capture, edits={"transformer.h.0.mlp": replaced_by(squash)})
    _, real = raw_run(raw, capture)
    # The stand-in's output is the module's, from the module's own input ...
    torch.testing.assert_close(mlp_out, want["transformer.h.0.mlp"], rtol=0, atol=TOL)
    torch.testing.assert_close(mlp_out, squash(mlp_in), rtol=0, atol=TOL)
    # ... the forward goes on from it ...
    torch.testing.assert_close(h1, want["transformer.h.1"], rtol=0, atol=TOL)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=TOL)
    assert not torch.allclose(h1, real["transformer.h.1"], atol=1e-3)  # (the mock did change it)
    # ... and the modules before it ran for real.
    torch.testing.assert_close(attn, real["transformer.h.0.attn"][0], rtol=0, atol=TOL)


@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_the_model_is_as_before_after_a_mocked_run(model, raw, mode):
    with model.trace(PROMPT, remote=mode, mocks={"transformer.h.1": squash}):
        h1 = model.transformer.h[1].output.save()  # (one read: the engine's fastest path)
    _, want = raw_run(raw, ("transformer.h.1",), edits={"transformer.h.1": replaced_by(squash)})
    torch.testing.assert_close(h1, want["transformer.h.1"], rtol=0, atol=TOL)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the stand-in failed")

    with pytest.raises((RuntimeError, RemoteException), match="the stand-in failed"):
        with model.trace(PROMPT, remote=mode, mocks={"transformer.h.2.mlp": boom}):
            model.transformer.h[3].output.save()

    assert no_instance_forwards(model) == []
    with model.trace(PROMPT, remote=mode):
        mlp = model.transformer.h[2].mlp.output.save()
        logits = model.lm_head.output.save()
    want_logits, want = raw_run(raw, ("transformer.h.2.mlp",))
    torch.testing.assert_close(mlp, want["transformer.h.2.mlp"], rtol=0, atol=TOL)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_a_module_stand_in(model, raw, mode):
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(128, 16), torch.nn.ReLU(), torch.nn.Linear(16, 128))
    with model.trace(PROMPT, remote=mode, mocks={"transformer.h.1.mlp": small}):
        out = model.transformer.h[1].mlp.output.save()
        logits = model.lm_head.output.save()

    with torch.no_grad():
        want_logits, want = raw_run(raw, ("transformer.h.1.mlp",), edits={"transformer.h.1.mlp": replaced_by(small)})
    torch.testing.assert_close(out, want["transformer.h.1.mlp"], rtol=0, atol=TOL)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_editing_a_mocked_output(model, raw, mode):
    with model.trace(PROMPT, remote=mode, mocks={"transformer.h.0.mlp": squash}):
        model.transformer.h[0].mlp.output = model.transformer.h[0].mlp.output * 3
        logits = model.lm_head.output.save()

    want_logits, _ = raw_run(raw, (), edits={"transformer.h.0.mlp": lambda m, args, out: squash(*args) * 3})
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=TOL)


# -- a submodule tree ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_a_subtree_mock_replaces_the_whole_block(model, raw, mode):
    calls = {"attn": 0, "mlp": 0}
    block = model._module.transformer.h[1]
    handles = [
        block.attn.register_forward_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1)),
        block.mlp.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1)),
    ]
    try:
        with model.trace(PROMPT, remote=mode, mocks={"transformer.h.1": squash}):
            h1 = model.transformer.h[1].output.save()
            logits = model.lm_head.output.save()
    finally:
        for handle in handles:
            handle.remove()

    want_logits, want = raw_run(raw, ("transformer.h.1",), edits={"transformer.h.1": replaced_by(squash)})
    torch.testing.assert_close(h1, want["transformer.h.1"], rtol=0, atol=TOL)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=TOL)
    assert calls == {"attn": 0, "mlp": 0}  # the block's inside never ran


@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_reading_inside_a_mocked_block_names_the_mock(model, raw, mode):
    with pytest.raises((ModuleNotCalledError, RemoteException)) as info:
        with model.trace(PROMPT, remote=mode, mocks={"transformer.h.1": squash}):
            inner = model.transformer.h[1].mlp.output.save()  # the line the error points at
    text = full_text(info.value)
    assert "inside `transformer.h.1`, which this run mocks" in text, text
    assert "model.transformer.h[1].mlp.output.save()  # the line the error points at" in text, text
    # Afterwards the block's inside runs again.
    with model.trace(PROMPT, remote=mode):
        inner = model.transformer.h[1].mlp.output.save()
    _, want = raw_run(raw, ("transformer.h.1.mlp",))
    torch.testing.assert_close(inner, want["transformer.h.1.mlp"], rtol=0, atol=TOL)


# -- generation, sessions, aliases ---------------------------------------------------------------

@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_generation_and_sessions_run_mocked(model, raw, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode,
                        mocks={"transformer.h.2.mlp": squash}):
        tokens = model.generator.output.save()
    with model.session(remote=mode, mocks={"transformer.h.2.mlp": squash}):
        with model.trace(PROMPT):
            first = model.lm_head.output.save()
        with model.trace(PROMPT):
            second = model.lm_head.output.save()

    ids = raw.encode(PROMPT)
    with raw.hooks({"transformer.h.2.mlp": replaced_by(squash)}), torch.no_grad():
        want_tokens = raw.model.generate(**ids, max_new_tokens=3, do_sample=False,
                                         pad_token_id=raw.tokenizer.eos_token_id)
    want_logits, _ = raw_run(raw, (), edits={"transformer.h.2.mlp": replaced_by(squash)})
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(first, want_logits, rtol=0, atol=TOL)
    torch.testing.assert_close(second, want_logits, rtol=0, atol=TOL)


def test_paths_by_alias_and_by_envoy(tiny_gpt2_path, raw):
    renamed = interlace.LanguageModel(str(tiny_gpt2_path), rename={"transformer.h": "layers"})
    want_logits, _ = raw_run(raw, (), edits={"transformer.h.3.mlp": replaced_by(squash)})
    for key in ("layers.3.mlp", "model.layers.3.mlp", renamed.transformer.h[3].mlp):
        with renamed.trace(PROMPT, mocks={key: squash}):
            logits = renamed.lm_head.output.save()
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=TOL)


# -- never on a server -------------------------------------------------------------------------

def test_remote_true_is_refused_before_anything_is_sent(model, monkeypatch):
    def contacted(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a mocked run contacted a server")

    monkeypatch.setattr(RemoteBackend, "__call__", contacted)
    monkeypatch.setattr(httpx.Client, "send", contacted)
    mocks = {"transformer.h.0.mlp": squash}
    refusals = []
    with pytest.raises(TraceOptionError) as info:
        with model.trace(PROMPT, remote=True, mocks=mocks):
            model.lm_head.output.save()
    refusals.append(str(info.value))
    with pytest.raises(TraceOptionError) as info:
        with model.generate(PROMPT, max_new_tokens=2, remote=True, mocks=mocks):
            model.lm_head.output.save()
    refusals.append(str(info.value))
    with pytest.raises(TraceOptionError) as info:
        with model.session(remote=True, mocks=mocks):
            with model.trace(PROMPT):
                model.lm_head.output.save()
    refusals.append(str(info.value))
    for message in refusals:
        assert "`mocks=` applies only with remote=False or remote='local', not with remote=True" in message
        assert "A mocked run never goes to a server" in message


def test_isolate_is_refused(model):
    with pytest.raises(TraceOptionError, match=r"`mocks=` cannot be used with `isolate=True`"):
        model.trace(PROMPT, remote="local", isolate=True, mocks={"transformer.h.0.mlp": squash})


# -- mistakes, caught when the trace is made ---------------------------------------------------

@pytest.mark.parametrize("mocks, words", [
    ({"transformer.h.0.mpl": squash}, "`transformer.h.0.mpl`, which is not a module of this model (closest: `transformer.h.0.mlp`"),
    ({"transformer.h.9": squash}, "`transformer.h.9`, which is not a module"),
    ({"transformer.h.0.mlp.c_fc.weight": squash}, "not a module of this model"),
    ({"transformer.h.0.mlp": 3}, "is of type int, which cannot run in the module's place"),
    ({"transformer.h.0.mlp": torch.nn.Linear}, "is the class Linear"),
    ({"transformer.h.0": squash, "transformer.h.0.mlp": squash}, "`transformer.h.0.mlp`, which is inside `transformer.h.0`"),
    ({"model": squash}, "the whole model"),
    (["transformer.h.0.mlp"], "mocks= takes a dict"),
])
def test_a_mistake_fails_at_the_trace_call(model, mocks, words):
    with pytest.raises(MockError) as info:
        model.trace(PROMPT, mocks=mocks)  # before any `with` body
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("mode", HERE, ids=["here", "simulated"])
def test_a_stand_in_of_the_wrong_structure_fails_at_the_bodys_line(model, raw, mode):
    def as_tuple(hidden: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.tanh(hidden),)  # the real MLP returns a tensor

    with pytest.raises((TypeError, RemoteException)) as info:
        with model.trace(PROMPT, remote=mode, mocks={"transformer.h.0.mlp": as_tuple}):
            last = model.transformer.h[0].mlp.output[:, -1].save()  # reads it as a tensor
    text = full_text(info.value)
    assert "model.transformer.h[0].mlp.output[:, -1].save()  # reads it as a tensor" in text, text
    n = raw.n_tokens(PROMPT)
    assert f"`transformer.h.0.mlp`: its stand-in returned tuple(Tensor(1, {n}, 128) float32)" in text, text
    assert no_instance_forwards(model) == []


# -- the job history ------------------------------------------------------------------------------

def test_the_record_names_the_mocked_modules(model, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERLACE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(interlace.CONFIG.APP, "HISTORY", True)
    with model.trace(PROMPT, remote="local", mocks={"transformer.h.0.mlp": squash, "transformer.h.2": squash}):
        model.lm_head.output.save()
    with model.trace(PROMPT, remote="local"):
        model.lm_head.output.save()
    unmocked, mocked = interlace.jobs.list()
    assert sorted(mocked.mocked) == ["transformer.h.0.mlp", "transformer.h.2"]
    assert unmocked.mocked == ()


# -- a dry run (fake tensors, no weights) ---------------------------------------------------------

def test_a_dry_run_runs_the_stand_ins_on_fake_tensors_without_loading_weights(tiny_gpt2_path, raw):
    lazy = interlace.LanguageModel(str(tiny_gpt2_path))  # meta until a real run loads it
    n = raw.n_tokens(PROMPT)
    with pytest.warns(UserWarning):  # (the dry run says its values are fake)
        with lazy.trace(PROMPT, remote="local", dry_run=True, mocks={"transformer.h.0.mlp": squash}):
            mlp = lazy.transformer.h[0].mlp.output.save()
    assert tuple(mlp.shape) == (1, n, 128)

    def too_narrow(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden[..., :5]

    with pytest.raises(RemoteException) as info:
        with lazy.trace(PROMPT, remote="local", dry_run=True, mocks={"transformer.h.0.mlp": too_narrow}):
            logits = lazy.lm_head.output.save()
    assert f"`transformer.h.0.mlp`: its stand-in returned Tensor(1, {n}, 5) float32" in full_text(info.value)
    assert all(p.is_meta for p in lazy._module.parameters())  # never loaded
    assert no_instance_forwards(lazy) == []
