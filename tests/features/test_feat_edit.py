"""`model.edit()`: default interventions, copies, clearing, and export/import without pickle."""

from __future__ import annotations

import json

import pytest
import torch

import interlace
from interlace.errors import TracingError


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


def test_edit_sees_the_whole_batch_and_runs_in_generation(feat_gpt2, et_prompt, msg_prompt):
    with feat_gpt2.edit() as edited:
        feat_gpt2.transformer.h[0].output[:] = 0
        rows = feat_gpt2.transformer.h[0].output.shape[0]
        seen = rows  # noqa: F841 - the edit's own variables stay in the edit
    with edited.trace() as tracer:
        with tracer.invoke(et_prompt):
            a = feat_gpt2.transformer.h[0].output.save()
        with tracer.invoke(msg_prompt):
            b = feat_gpt2.transformer.h[0].output.save()
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0
    with edited.generate(et_prompt, max_new_tokens=2):
        first = feat_gpt2.transformer.h[0].output.save()
    assert torch.count_nonzero(first) == 0
    with feat_gpt2.trace(et_prompt):
        untouched = feat_gpt2.transformer.h[0].output.save()
    assert torch.count_nonzero(untouched) > 0


def test_edit_on_meta_model_shares_the_loaded_weights(tiny_gpt2_path, et_prompt):
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    with model.edit() as edited:
        model.transformer.h[0].output[:] = 0
    with edited.trace(et_prompt):
        h0 = model.transformer.h[0].output.save()
    assert model.dispatched and edited._module is model._module
    assert torch.count_nonzero(h0) == 0


def test_export_and_import_round_trip(tmp_path, tiny_gpt2_path, feat_gpt2, et_prompt):
    direction = torch.randn(128)
    layers = [0, 1]
    with feat_gpt2.edit() as edited:
        for i in layers:
            feat_gpt2.transformer.h[i].output[:, -1] += direction * 2.0
    with edited.trace(et_prompt):
        expected = feat_gpt2.lm_head.output.save()

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
    with fresh.trace(et_prompt):
        got = fresh.lm_head.output.save()
    assert torch.allclose(got, expected, atol=1e-5)


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
