"""`tracer.cache()`: module outputs after edits, by attribute and by path, per step in generation."""

from __future__ import annotations

import pytest
import torch

import interlace
from interlace.errors import TracingError


def test_cache_equals_saved_values_and_sees_edits(feat_gpt2, et_prompt):
    with feat_gpt2.trace(et_prompt) as tracer:
        cache = tracer.cache()
        feat_gpt2.transformer.h[0].output[:] = 1.0
        h1 = feat_gpt2.transformer.h[1].output.save()
        logits = feat_gpt2.lm_head.output.save()
    assert "model.transformer.h.0.attn" in cache and "model.lm_head" in cache
    assert torch.all(cache.model.transformer.h[0].output == 1.0)
    assert torch.equal(cache["model.transformer.h.1"].output, h1)
    assert torch.equal(cache.model.lm_head.output, logits)
    assert torch.equal(cache["transformer.h.1"].output, h1)  # "model." may be left out
    assert cache.model.transformer.h[-1].output.shape == h1.shape


def test_cache_selected_modules_with_inputs_on_device(feat_gpt2, et_prompt):
    with feat_gpt2.trace(et_prompt) as tracer:
        cache = tracer.cache(modules=["transformer.h.0", feat_gpt2.lm_head], include_inputs=True, dtype=torch.float64)
        ln_f = feat_gpt2.transformer.ln_f.output.save()
    assert set(cache) == {"model.transformer.h.0", "model.lm_head"}
    assert cache.model.lm_head.output.dtype == torch.float64
    assert torch.allclose(cache.model.lm_head.input, ln_f.double())
    args, kwargs = cache["model.lm_head"].inputs
    assert torch.allclose(args[0], ln_f.double())


def test_cache_in_generation_has_one_entry_per_step(feat_gpt2, et_prompt):
    with feat_gpt2.generate(et_prompt, max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[feat_gpt2.lm_head])
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(feat_gpt2.lm_head.output.clone())
    entries = cache["model.lm_head"]
    assert isinstance(entries, list) and len(entries) == 3
    assert all(torch.equal(e.output, l) for e, l in zip(entries, logits))
    assert len(cache.model.lm_head.output) == 3


def test_cache_in_invokes_holds_each_invokes_rows(feat_gpt2, et_prompt, msg_prompt):
    with feat_gpt2.trace() as tracer:
        with tracer.invoke(et_prompt):
            c1 = tracer.cache(modules=["lm_head"])
        with tracer.invoke(msg_prompt):
            out2 = feat_gpt2.lm_head.output.save()
        with tracer.invoke():
            full = tracer.cache(modules=["lm_head"])
    assert c1.model.lm_head.output.shape[0] == 1
    assert full.model.lm_head.output.shape[0] == 2
    assert torch.equal(full.model.lm_head.output[1:], out2)


def test_cache_errors(feat_gpt2, et_prompt):
    with feat_gpt2.trace(et_prompt) as tracer:
        cache = tracer.cache(modules=["lm_head"])
    with pytest.raises(KeyError, match="was not cached"):
        cache["model.transformer.h.0"]
    with pytest.raises(AttributeError, match="No cached module"):
        cache.model.transformer
    assert cache.model.lm_head.input is None  # not cached: None, as in nnsight
    with pytest.raises(TracingError, match="while the model runs"):
        with feat_gpt2.trace() as tracer:
            tracer.cache()
            with tracer.invoke(et_prompt):
                pass


def test_cache_created_late_warns(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    with pytest.warns(UserWarning, match="already run"):
        with model.trace(tiny_input) as tracer:
            model.layer2.output
            cache = tracer.cache()
    assert "model.layer2" in cache and "model.layer1" not in cache
