"""Logit lens: decode every layer's residual stream with the final norm and the unembedding,
in all three modes, against the same computation by hand on a plain copy of the model."""

from __future__ import annotations

import torch

import interlace

TOL = 1e-4


def test_logit_lens_over_all_layers(lm, raw, mode, et_prompt):
    with lm.trace(et_prompt, remote=mode):
        lens = list().save()
        for layer in lm.transformer.h:
            lens.append(lm.lm_head(lm.transformer.ln_f(layer.output)))
        top = [layer_logits[0, -1].argmax() for layer_logits in lens]
        top = interlace.save(top)
        logits = lm.lm_head.output.save()

    names = [f"transformer.h.{i}" for i in range(len(raw.model.transformer.h))]
    expected_logits, seen = raw.run(et_prompt, capture=tuple(names))
    with torch.no_grad():
        expected = [raw.model.lm_head(raw.model.transformer.ln_f(seen[name])) for name in names]

    assert len(lens) == len(expected) == 4
    for i, (got, want) in enumerate(zip(lens, expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL, msg=f"layer {i}")
    assert [int(t) for t in top] == [int(w[0, -1].argmax()) for w in expected]
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=TOL)
    # The lens differs layer to layer (a lens that always read one layer would fail here).
    assert not torch.allclose(lens[0], lens[2], atol=1e-3)


def test_logit_lens_through_helper_functions(lm, raw, mode, msg_prompt):
    """Research code wraps model access in helpers that reach the model through a closure or a
    global; the helpers travel with the trace and use the model they run beside."""

    def layer(i):
        return lm.transformer.h[i]

    def decode(hidden):
        return lm.lm_head(lm.transformer.ln_f(hidden))

    with lm.trace(msg_prompt, remote=mode):
        probs = list().save()
        for i in range(len(lm.transformer.h)):
            probs.append(decode(layer(i).output).softmax(dim=-1))

    names = tuple(f"transformer.h.{i}" for i in range(4))
    _, seen = raw.run(msg_prompt, capture=names)
    with torch.no_grad():
        expected = [raw.model.lm_head(raw.model.transformer.ln_f(seen[name])).softmax(dim=-1) for name in names]
    assert len(probs) == 4
    for i, (got, want) in enumerate(zip(probs, expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"layer {i}")
