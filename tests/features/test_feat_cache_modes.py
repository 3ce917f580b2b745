"""`tracer.cache()` in all three modes, against raw forward hooks on the plain torch modules.

Two invokes with prompts of different lengths: each invoke's cache must hold its own rows
(a cache holding the other invoke's row fails), by path, by attribute path and through the
model's `rename=` aliases, and the Cache must come back from a server as the same data.
"""

from __future__ import annotations

import pytest
import torch

import interlace
from interlace.tracing.cache_entries import Cache

A = "The Eiffel Tower is in the city of"
B = "Madison Square Garden is"
MODULES = ["transformer.h.0", "transformer.h.1.mlp", "lm_head"]


def raw_hooks(model, prompts, names):
    """Outputs and first inputs of `names` in one plain batched forward (the truth)."""
    tok = model.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    outs, ins, handles = {}, {}, []
    for name in names:
        def hook(module, args, out, name=name):
            outs[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            ins[name] = args[0].detach().clone()
        handles.append(model._module.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model._module(**enc)
    finally:
        for h in handles:
            h.remove()
    return outs, ins


def close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_each_invokes_cache_holds_its_own_rows(feat_gpt2, mode):
    model = feat_gpt2
    with model.trace(remote=mode) as tracer:
        with tracer.invoke(A):
            ca = tracer.cache(modules=MODULES, include_inputs=True)
            h0 = model.transformer.h[0].output
            h0[:, -1] = h0[:, -1] * 0 + 3.0  # an edit the cache must see (after edits)
        with tracer.invoke(B):
            cb = tracer.cache(modules=[model.transformer.h[0], "model.transformer.h.1.mlp", model.lm_head])
    assert type(ca) is Cache and type(cb) is Cache
    assert set(ca) == set(cb) == {f"model.{m}" for m in MODULES}
    assert torch.all(ca.model.transformer.h[0].output[:, -1] == 3.0)

    # Truth without the edit for B's row (B's rows do not depend on A's), and for A's
    # first layer before the edit reached it.
    outs, ins = raw_hooks(model, [A, B], MODULES)
    assert not close(outs["lm_head"][0:1], outs["lm_head"][1:2])  # the rows are distinguishable
    for m in MODULES:
        assert close(cb[f"model.{m}"].output, outs[m][1:2]), m  # B's cache: B's row, not A's
    assert close(ca["model.transformer.h.0"].input, ins["transformer.h.0"][0:1])  # A's row
    edited = outs["transformer.h.0"][0:1].clone()
    edited[:, -1] = 3.0
    assert close(ca.model.transformer.h[0].output, edited)
    # Downstream of the edit A's later entries differ from the unedited truth.
    assert not close(ca.model.lm_head.output, outs["lm_head"][0:1])
    assert ca.model.lm_head.input.shape == (1, outs["lm_head"].shape[1], 128)
    args, kwargs = ca["model.transformer.h.1.mlp"].inputs
    assert isinstance(args, tuple) and isinstance(kwargs, dict)


def test_full_cache_save_and_dicts_from_it_come_back(feat_gpt2, mode):
    model = feat_gpt2
    with model.trace(A, remote=mode) as tracer:
        c = tracer.cache()
        early = {k: v for k, v in c.items()}.save()  # built before anything ran: empty
        logits = model.lm_head.output.save()
    with model.trace(A, remote=mode) as tracer:
        c2 = tracer.cache(modules=["transformer.h.2"]).save()
    outs, _ = raw_hooks(model, [A], ["transformer.h.2", "lm_head", "transformer.ln_f"])
    assert early == {}
    assert "model" in c and "model.transformer.h.3.mlp.c_proj" in c
    assert close(c.model.lm_head.output, outs["lm_head"]) and close(logits, outs["lm_head"])
    assert close(c["model.transformer.ln_f"].output, outs["transformer.ln_f"])
    assert close(c.model.output.logits, outs["lm_head"])  # the root's ModelOutput came back as one
    assert close(c2.model.transformer.h[2].output, outs["transformer.h.2"])
    assert list(c2) == ["model.transformer.h.2"]


def test_cache_options_include_output_detach_dtype(feat_gpt2, mode):
    model = feat_gpt2
    with model.trace(A, remote=mode) as tracer:
        c = tracer.cache(["transformer.h.1"], None, torch.float64, True, False, True)  # nnsight's order
    _, ins = raw_hooks(model, [A], ["transformer.h.1"])
    assert close(c.model.transformer.h[1].input, ins["transformer.h.1"].double())
    assert c.model.transformer.h[1].output is None  # not cached: None, as in nnsight


def test_cache_through_rename_aliases(tiny_gpt2_path, mode):
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True, rename={"transformer.h": "layers", "mlp": "ffn"})
    with model.trace(remote=mode) as tracer:
        with tracer.invoke(A):
            ca = tracer.cache(modules=["transformer.h.0.mlp", "transformer.h.1"])
        with tracer.invoke(B):
            cb = tracer.cache(modules=["transformer.h.0.mlp", "transformer.h.1"])
    outs, _ = raw_hooks(model, [A, B], ["transformer.h.0.mlp", "transformer.h.1"])
    for cache, row in ((ca, 0), (cb, 1)):
        truth = outs["transformer.h.0.mlp"][row:row + 1]
        assert close(cache["model.transformer.h.0.mlp"].output, truth)  # the real path
        assert close(cache["model.layers.0.ffn"].output, truth)  # alias paths
        assert close(cache["layers.0.mlp"].output, truth)
        assert close(cache.model.layers[0].ffn.output, truth)
        assert close(cache.model.transformer.h[0].ffn.output, truth)
        assert close(cache.model.layers[-1].output, outs["transformer.h.1"][row:row + 1])
        assert "model.layers.1" in cache and list(cache) == ["model.transformer.h.0.mlp", "model.transformer.h.1"]


def test_cache_lookup_errors_name_the_fix(feat_gpt2, mode):
    with feat_gpt2.trace(A, remote=mode) as tracer:
        c = tracer.cache(modules=["lm_head"])
    with pytest.raises(KeyError, match="was not cached"):
        c["model.transformer.h.0"]
    with pytest.raises(AttributeError, match="No cached module"):
        c.model.transformer
    assert c.model.lm_head.input is None  # not cached: None, as in nnsight
