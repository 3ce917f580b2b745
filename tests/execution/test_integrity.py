"""Layer 4 of the sandbox (model integrity): whatever a job changes on the hosted model or in
the process, the next job (another user's on a server, the caller's own under the simulation)
gets exactly what a fresh model gives.

The truth is a separately loaded copy of the model run with raw torch (`RawLM`), never the
model under test. Unit tests change the model the way an escaped job would (directly, past
layers 1 and 2, which refuse these paths) between `begin()` and `verify_and_restore()`; the
end-to-end tests do it through a shipped body, under `remote='local'` and on a real server.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import interlace
from interlace.execution import process_state
from interlace.execution.integrity import ModelGuard, guard_for, needs_recycle
from interlace.testing import ServerProcess

from raw_truth import RawLM

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def raw(tiny_gpt2_path):
    return RawLM(tiny_gpt2_path)


@pytest.fixture(scope="module")
def truth(raw):
    with torch.no_grad():
        return raw.model(**raw.encode(PROMPT)).logits


@pytest.fixture
def lm(tiny_gpt2_path):
    # A fresh model per test: a test that fails half-way must not leak into the next.
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def _logits(model) -> torch.Tensor:
    with model.trace(PROMPT):
        out = model.lm_head.output.save()
    return out


def _guarded(lm) -> ModelGuard:
    return ModelGuard(lm._module, pristine=True, follow_caller=False)


# -- what an escaped job could change, each undone ----------------------------------------------


def _set_eps(m):
    m.transformer.ln_f.eps = 10.0


def _replace_activation(m):
    m.transformer.h[0].mlp.act = torch.nn.ReLU()


def _replace_forward(m):
    m.transformer.h[1].attn.forward = lambda *a, **k: (torch.zeros(1), None)


def _forward_hook(m):
    m.transformer.h[2].register_forward_hook(lambda mod, i, o: (o[0] * 0, *o[1:]) if isinstance(o, tuple) else o * 0)


def _pre_hook(m):
    m.transformer.wte.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))


def _global_hook(m):
    torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: o)


def _tensor_hook(m):
    m.transformer.wte.weight.register_hook(lambda grad: grad * 1000)
    m.transformer.wpe.weight.register_post_accumulate_grad_hook(lambda p: p.data.zero_())


def _train_mode(m):
    m.train()


def _append_block(m):
    m.transformer.h.append(m.transformer.h[0])


def _weight_via_data(m):
    m.transformer.h[0].mlp.c_fc.weight.data.zero_()  # no `_version` bump


def _weight_via_numpy(m):
    m.transformer.h[3].attn.c_attn.weight.detach().numpy()[...] = 7.0  # no `_version` bump


def _weight_in_place(m):
    with torch.no_grad():
        m.lm_head.weight.mul_(2)  # the tied embedding too


def _weight_swapped(m):
    m.transformer.h[0].ln_1.weight.data = torch.full_like(m.transformer.h[0].ln_1.weight, 3.0)


def _weight_resized(m):
    with torch.no_grad():
        m.transformer.h[1].ln_2.bias.set_(torch.zeros(3))  # other memory, other shape


def _weight_replaced(m):
    m.transformer.h[0].ln_1.weight = torch.nn.Parameter(torch.zeros(128))


def _requires_grad(m):
    m.transformer.wpe.weight.requires_grad_(False)


def _class_patch(m):
    type(m.transformer.h[0].mlp).forward = lambda self, x: x * 0


def _class_swap(m):
    m.transformer.ln_f.__class__ = torch.nn.Identity


def _config(m):
    m.config.output_hidden_states = True
    m.config.id2label[99] = "x"


def _torch_namespace(m):
    torch.nn.functional.layer_norm = lambda x, *a, **k: x


def _process_state(m):
    torch.set_default_dtype(torch.float64)
    torch.set_float32_matmul_precision("medium")
    torch.set_printoptions(precision=1)
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    torch.backends.mkldnn.enabled = False
    torch.set_grad_enabled(True)
    torch.device("meta").__enter__()  # entered, never left: every later tensor on meta


CHANGES = [
    _set_eps, _replace_activation, _replace_forward, _forward_hook, _pre_hook, _global_hook, _tensor_hook, _train_mode,
    _append_block, _weight_via_data, _weight_via_numpy, _weight_in_place, _weight_swapped, _weight_resized,
    _weight_replaced, _requires_grad, _class_patch, _class_swap, _config, _torch_namespace, _process_state,
]


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__.lstrip("_") for c in CHANGES])
def test_what_a_job_changed_is_undone_and_the_next_job_gets_fresh_values(lm, truth, change):
    torch.set_grad_enabled(False)
    try:
        guard = _guarded(lm)
        torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
        before = guard.begin()
        change(lm._module)
        report = guard.verify_and_restore(before)
        assert not report.clean, f"{change.__name__} went unnoticed"
        assert not report.needs_recycle, report
        assert torch.equal(_logits(lm), truth)
        assert torch.get_default_dtype() == torch.float32 and torch.get_default_device().type == "cpu"
        assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == py_rng
        assert np.array_equal(np.random.get_state()[1], np_rng)
        assert guard.verify_and_restore(before).clean  # and the model is back to its baseline
        for p in lm._module.parameters():
            assert p._backward_hooks is None and p._post_accumulate_grad_hooks is None
    finally:
        torch.set_grad_enabled(True)


def test_a_changed_weight_without_a_copy_to_restore_from_asks_for_a_new_worker(lm):
    guard = ModelGuard(lm._module, pristine=False, follow_caller=False)
    before = guard.begin()
    with torch.no_grad():
        lm._module.transformer.h[0].mlp.c_fc.weight.add_(1)
    report = guard.verify_and_restore(before)
    assert report.weights == ["transformer.h.0.mlp.c_fc.weight"] and report.needs_recycle
    assert guard.tainted


def test_an_attribute_that_cannot_be_put_back_asks_for_a_new_worker(lm):
    guard = _guarded(lm)
    before = guard.begin()
    torch.nn.Module.__call__  # noqa: B018 (reachable)
    # A mode a job left *below* the ones it found cannot be put back in place.
    mode = torch.device("meta")
    mode.__enter__()
    try:
        guard2_before = process_state.capture()
    finally:
        mode.__exit__(None, None, None)
    unrestored: list[str] = []
    process_state.restore(guard2_before, unrestored)
    assert unrestored == ["torch function modes"]
    assert guard.verify_and_restore(before).clean


def test_a_source_rewritten_module_does_not_taint_later_restores(lm, truth):
    # `.source` gives a module the engine's subclass (same computation) for good; a later job
    # whose changes are put back (transformers' own output-capturing hooks, installed lazily
    # by `output_hidden_states=True`) must still compare equal to the baseline afterwards.
    from interlace.tracing.envoy import source_envoy

    guard = _guarded(lm)
    source_envoy(lm.transformer.h[0].attn)
    enc = lm.tokenizer(PROMPT, return_tensors="pt")
    for _ in range(2):
        before = guard.begin()
        with torch.no_grad():
            lm._module(**enc, output_hidden_states=True, output_attentions=True)
        report = guard.verify_and_restore(before)
        assert not report.needs_recycle, report.unrestored
    assert torch.equal(_logits(lm), truth)


# -- through a shipped body ----------------------------------------------------------------------


def test_simulation_leaves_the_callers_model_exactly_as_before(lm, truth):
    # `requires_grad_` passes layers 1-2 (it changes no value); layer 4 notices and undoes it.
    with pytest.raises(interlace.RemoteException) as info:
        with lm.trace(PROMPT, remote="local"):
            w = lm.transformer.h[0].mlp.c_fc.weight
            w.requires_grad_(False)
            out = lm.lm_head.output.save()
    assert info.value.category == "model-modified"
    assert lm._module.transformer.h[0].mlp.c_fc.weight.requires_grad
    assert torch.equal(_logits(lm), truth)


def test_simulation_leaves_the_callers_random_state_as_before(lm):
    torch.manual_seed(3)
    expected = torch.get_rng_state()
    with lm.trace(PROMPT, remote="local"):
        noise = torch.randn(4).save()
        out = lm.lm_head.output.save()
    assert torch.equal(torch.get_rng_state(), expected)
    with lm.trace(PROMPT, remote="local"):
        again = torch.randn(4).save()
        out = lm.lm_head.output.save()
    assert torch.equal(noise, again)  # each job starts from the state the one before found


def test_simulation_restores_the_callers_weights_after_a_weight_changing_job(lm, truth):
    with pytest.raises((interlace.RemoteException, interlace.RemoteValidationError)):
        with lm.trace(PROMPT, remote="local"):
            with torch.no_grad():
                lm.transformer.h[0].mlp.c_fc.weight[:] = 0
            out = lm.lm_head.output.save()
    assert torch.equal(_logits(lm), truth)


def test_simulation_keeps_the_callers_own_changes_between_jobs(lm, raw):
    """The caller may edit their own model between traces; only a job's changes are undone."""
    with lm.trace(PROMPT, remote="local"):
        out = lm.lm_head.output.save()
    with torch.no_grad():
        lm._module.transformer.ln_f.weight.data.mul_(2)  # the caller's own edit, outside any job
    lm._module.transformer.h[0].mlp.act = torch.nn.ReLU()
    with lm.trace(PROMPT, remote="local"):
        edited = lm.lm_head.output.save()
    assert torch.equal(lm._module.transformer.ln_f.weight, raw.model.transformer.ln_f.weight * 2)
    assert isinstance(lm._module.transformer.h[0].mlp.act, torch.nn.ReLU)
    assert not torch.equal(edited, out)


def test_needs_recycle_is_false_after_clean_jobs(lm):
    with lm.trace(PROMPT, remote="local"):
        out = lm.lm_head.output.save()
    assert not needs_recycle(lm) and guard_for(lm).tainted == []


def _eps_job(model):
    with model.trace(PROMPT, remote=True):
        model.transformer.ln_f.eps = 10.0
        out = model.lm_head.output.save()


def _activation_job(model):
    with model.trace(PROMPT, remote=True):
        model.transformer.h[0].mlp.act = torch.nn.ReLU()
        out = model.lm_head.output.save()


def _requires_grad_job(model):
    with model.trace(PROMPT, remote=True):
        w = model.transformer.h[0].mlp.c_fc.weight
        w.requires_grad_(False)
        out = model.lm_head.output.save()


def _train_job(model):
    with model.trace(PROMPT, remote=True):
        model.train()
        out = model.lm_head.output.save()


def test_on_a_server_another_keys_job_gets_fresh_values(tmp_path, tiny_gpt2_path, truth, monkeypatch):
    server = ServerProcess(tmp_path / "data", models=[str(tiny_gpt2_path)], fake=False).start()
    try:
        alice, bob = server.create_key("alice"), server.create_key("bob")
        monkeypatch.setattr(interlace.CONFIG.API, "HOST", server.url)
        monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
        client = interlace.LanguageModel(str(tiny_gpt2_path))
        monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", alice)
        for job in (_eps_job, _activation_job, _train_job, _requires_grad_job):
            try:
                job(client)
            except (interlace.RemoteValidationError, interlace.RemoteException):
                pass  # refused or failed: also contained
        monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", bob)
        with client.trace(PROMPT, remote=True):
            logits = client.lm_head.output.save()
        assert torch.equal(logits, truth)
    finally:
        server.stop()


def test_a_tokenizer_whose_vocabulary_grew_asks_for_a_new_worker(lm):
    # Added tokens live in the tokenizer's backend, where nothing can take them out again:
    # the guard says so (the worker is then replaced), for the server and the simulation alike.
    guard = guard_for(lm, server=True)
    before = guard.begin()
    lm.tokenizer.add_tokens(["<escaped-token>"])
    report = guard.verify_and_restore(before)
    assert report.needs_recycle and any("tokenizer vocabulary" in item for item in report.unrestored)
    assert needs_recycle(lm)


def test_the_dict_version_fast_path_still_compares_by_identity(lm):
    # Namespaces are fingerprinted by CPython's dict version counter (`dict_versions.py`): an
    # equal value that is another object is a change, and a dict changed and put back between
    # two checks is compared in full once, then fingerprinted again.
    from interlace.execution import dict_versions

    assert dict_versions.TAGS  # CPython 3.11-3.13: on
    guard = _guarded(lm)
    original = torch.e
    before = guard.begin()
    torch.e = float(repr(original))  # equal, not the same object
    assert torch.e == original and torch.e is not original
    report = guard.verify_and_restore(before)
    assert any("module torch: e" in c for c in report.changed) and torch.e is original
    block = lm._module.transformer.h[0]
    block.extra = 1
    del block.extra  # the counter moved, the entries are the same
    assert guard.verify_and_restore(before).clean and guard.verify_and_restore(before).clean
    block.training = not block.training
    assert not guard.verify_and_restore(before).clean and guard.verify_and_restore(before).clean
