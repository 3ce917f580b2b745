"""`model.edit()`: default interventions, copies, clearing, and export/import without pickle."""

from __future__ import annotations

import json

import pytest
import torch

import interlace
from feature_truth import PROMPT_A, PROMPT_B, hf_generate, n_tokens, on_call, raw_forward
from interlace.errors import TracingError

TOL = 1e-5


def run_layer1(model, x):
    with model.trace(x):
        out = model.layer1.output.clone().save()
    return out


def test_edit_applies_to_the_copy_only(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    before = run_layer1(model, tiny_input)
    with model.edit() as edited:
        model.layer1.output[:] = 0
    assert edited is not model and edited._module is model._module
    assert torch.count_nonzero(run_layer1(edited, tiny_input)) == 0
    assert torch.equal(run_layer1(model, tiny_input), before)
    # The copy's edit also runs under its own envoys and with other interventions.
    with edited.trace(tiny_input):
        edited.layer2.output[:] += 1
        out = edited.output.save()
    assert torch.allclose(out, tiny_mlp.layer2.bias + 1)


def test_edit_inplace_and_clear_edits(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    before = run_layer1(model, tiny_input)
    scale = torch.tensor(2.0)
    with model.edit(inplace=True):
        model.layer1.output[:] *= scale
    assert torch.allclose(run_layer1(model, tiny_input), 2 * before)
    model.clear_edits()
    assert torch.equal(run_layer1(model, tiny_input), before)


def test_copies_start_from_the_originals_edits(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    before = run_layer1(model, tiny_input)
    with model.edit(inplace=True):
        model.layer1.output[:] += 1
    with model.edit() as edited:
        model.layer1.output[:] *= 10
    assert torch.allclose(run_layer1(edited, tiny_input), (before + 1) * 10)
    assert torch.allclose(run_layer1(model, tiny_input), before + 1)


def test_edit_sees_the_whole_batch_and_runs_in_generation(feat_gpt2):
    # Halving block 0 differs per row and position (zeroing would make every row the same,
    # and makes the model emit EOS at once, so generation would stop after one step).
    with feat_gpt2.edit() as edited:
        feat_gpt2.transformer.h[0].output[:] *= 0.5
        rows = feat_gpt2.transformer.h[0].output.shape[0]
        seen = rows  # noqa: F841 - the edit's own variables stay in the edit
    with edited.trace() as tracer:
        with tracer.invoke(PROMPT_A):
            a = feat_gpt2.lm_head.output.save()
        with tracer.invoke(PROMPT_B):
            b = feat_gpt2.lm_head.output.save()
    half = (feat_gpt2._module.transformer.h[0], lambda m, args, o: o * 0.5)
    expected = raw_forward(feat_gpt2, [PROMPT_A, PROMPT_B], half)
    for row, got in enumerate((a, b)):
        n = n_tokens(feat_gpt2, (PROMPT_A, PROMPT_B)[row])
        torch.testing.assert_close(got[0, -n:], expected[row, -n:], rtol=0, atol=TOL)

    with edited.generate([PROMPT_A, PROMPT_B], max_new_tokens=4) as tracer:
        steps = list().save()
        for step in tracer.iter[:]:
            steps.append(feat_gpt2.lm_head.output[:, -1].clone())
        out = feat_gpt2.generator.output.save()
    # Like any body without `tracer.iter`, the edit applies at generation's first forward
    # (the prompt; as in nnsight); the edited positions stay in the cache for later steps.
    ids, logits = hf_generate(feat_gpt2, [PROMPT_A, PROMPT_B], 4, (half[0], on_call(0, lambda o: o * 0.5)))
    assert torch.equal(out, ids) and out.shape[1] == expected.shape[1] + 4
    assert len(steps) == 4
    for got, want in zip(steps, logits):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)

    with feat_gpt2.trace(PROMPT_A):
        untouched = feat_gpt2.lm_head.output.save()
    torch.testing.assert_close(untouched, raw_forward(feat_gpt2, PROMPT_A), rtol=0, atol=TOL)


def test_edit_on_meta_model_shares_the_loaded_weights(tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    with model.edit() as edited:
        model.transformer.h[0].output[:] *= 0.5
    with edited.trace(PROMPT_A):
        logits = model.lm_head.output.save()
    assert model.dispatched and edited._module is model._module
    half = (model._module.transformer.h[0], lambda m, args, o: o * 0.5)
    torch.testing.assert_close(logits, raw_forward(model, PROMPT_A, half), rtol=0, atol=TOL)


def test_export_and_import_round_trip(tmp_path, tiny_gpt2_path, feat_gpt2):
    direction = torch.randn(128, generator=torch.Generator().manual_seed(3))
    layers = [0, 1]
    with feat_gpt2.edit() as edited:
        for i in layers:
            feat_gpt2.transformer.h[i].output[:, -1] += direction * 2.0
    with edited.trace(PROMPT_A):
        expected = feat_gpt2.lm_head.output.save()

    def steer(m, args, o):
        o = o.clone()
        o[:, -1] += direction * 2.0
        return o

    blocks = feat_gpt2._module.transformer.h
    truth = raw_forward(feat_gpt2, PROMPT_A, (blocks[0], steer), (blocks[1], steer))
    torch.testing.assert_close(expected, truth, rtol=0, atol=TOL)
    assert not torch.allclose(expected, raw_forward(feat_gpt2, PROMPT_A), atol=1e-3)

    path = edited.export_edits(tmp_path / "steer.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["interlace_edits"])
        assert len(list(f.keys())) == 1  # the direction tensor
    assert "direction * 2.0" in meta["edits"][0]["source"]
    assert meta["edits"][0]["names"]["layers"] == {"kind": "list", "items": [{"kind": "json", "value": 0}, {"kind": "json", "value": 1}]}
    with open(path, "rb") as fh:
        assert b"\x80\x04" not in fh.read(16)  # not a pickle

    fresh = interlace.LanguageModel(str(tiny_gpt2_path))
    assert fresh.import_edits(path) == 1
    with fresh.trace(PROMPT_A):
        got = fresh.lm_head.output.save()
    torch.testing.assert_close(got, truth, rtol=0, atol=TOL)


def test_an_edited_model_runs_here_and_is_refused_remotely_with_the_fix(feat_gpt2, mode):
    """Edits live with the local model object; a server has none, so a remote trace of an
    edited copy is refused before anything is sent (and never runs without its edits)."""
    with feat_gpt2.edit() as edited:
        feat_gpt2.transformer.h[1].output[:] *= 0.5
    if mode is not False:
        with pytest.raises(interlace.RemoteValidationError, match="default edits") as info:
            with edited.trace(PROMPT_A, remote=mode):
                logits = feat_gpt2.lm_head.output.save()
        assert "put the edit in the trace body instead" in str(info.value)
        return
    with edited.trace(PROMPT_A, remote=mode):
        logits = feat_gpt2.lm_head.output.save()
    half = (feat_gpt2._module.transformer.h[1], lambda m, args, o: o * 0.5)
    torch.testing.assert_close(logits, raw_forward(feat_gpt2, PROMPT_A, half), rtol=0, atol=TOL)


def test_edits_made_inside_a_session_run_in_every_mode(feat_gpt2, mode):
    """Inside a session the edit and the traces run in one place (on the server remotely)."""
    with feat_gpt2.session(remote=mode):
        with feat_gpt2.edit() as edited:
            feat_gpt2.transformer.h[1].output[:] *= 0.5
        with edited.trace(PROMPT_A):
            logits = feat_gpt2.lm_head.output.save()
        with feat_gpt2.trace(PROMPT_A):
            plain = feat_gpt2.lm_head.output.save()
    half = (feat_gpt2._module.transformer.h[1], lambda m, args, o: o * 0.5)
    torch.testing.assert_close(logits, raw_forward(feat_gpt2, PROMPT_A, half), rtol=0, atol=TOL)
    torch.testing.assert_close(plain, raw_forward(feat_gpt2, PROMPT_A), rtol=0, atol=TOL)


def test_an_inplace_edit_inside_a_remote_session_dies_with_the_job(feat_gpt2, mode):
    """`model.edit(inplace=True)` in a session edits the model the session runs on; a server's
    model is shared, so the edit must not outlive the job (nor reach the caller's model under
    the simulation). Locally the caller's own model keeps it, as it would without a session."""
    try:
        with feat_gpt2.session(remote=mode):
            with feat_gpt2.edit(inplace=True):
                feat_gpt2.transformer.h[1].output[:] *= 0.5
            with feat_gpt2.trace(PROMPT_A):
                during = feat_gpt2.lm_head.output.save()
        kept = len(feat_gpt2.__dict__["_default_edits"])
    finally:
        feat_gpt2.clear_edits()
    with feat_gpt2.trace(PROMPT_A, remote=mode):
        after = feat_gpt2.lm_head.output.save()
    half = (feat_gpt2._module.transformer.h[1], lambda m, args, o: o * 0.5)
    torch.testing.assert_close(during, raw_forward(feat_gpt2, PROMPT_A, half), rtol=0, atol=TOL)
    torch.testing.assert_close(after, raw_forward(feat_gpt2, PROMPT_A), rtol=0, atol=TOL)
    assert kept == (1 if mode is False else 0)


def test_export_refuses_unserialisable_values(tmp_path, tiny_mlp):
    model = interlace.NNsight(tiny_mlp)

    def helper(t):
        return t * 2

    with model.edit() as edited:
        model.layer1.output[:] = helper(model.layer1.output)
    with pytest.raises(TracingError, match="`helper`, a function"):
        edited.export_edits(tmp_path / "x.safetensors")


def test_import_rejects_other_files(tmp_path, tiny_mlp):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(TracingError, match="not an Interlace edits file"):
        interlace.NNsight(tiny_mlp).import_edits(path)
