"""`model.session()` in every mode: several traces grouped; values flow between them, only
saved ones leave. Truths are the plain module with raw hooks and `torch.autograd.grad`."""

from __future__ import annotations

import pytest
import torch

import interlace
from feature_truth import PROMPT_A, PROMPT_B, hooks, raw_forward

TOL = 1e-5


def test_values_flow_between_traces_without_saving(feat_gpt2, mode):
    last = feat_gpt2.transformer.h[-1]
    with feat_gpt2.session(remote=mode):
        with feat_gpt2.trace(PROMPT_A):
            h = last.output[:, -1].clone()  # not saved
        with feat_gpt2.trace(PROMPT_B):
            last.output[:, -1] = h
            patched = feat_gpt2.lm_head.output[:, -1].save()
    with pytest.raises(interlace.NotSavedError, match="`h` was assigned in the trace at .* but not saved"):
        h.shape
    # The last position after the last block decides the last logits alone.
    torch.testing.assert_close(patched, raw_forward(feat_gpt2, PROMPT_A)[:, -1], rtol=0, atol=TOL)
    assert not torch.allclose(patched, raw_forward(feat_gpt2, PROMPT_B)[:, -1], atol=1e-3)


def test_only_saved_values_leave_the_session(feat_gpt2, mode):
    with feat_gpt2.session(remote=mode):
        with feat_gpt2.trace(PROMPT_A):
            inner = feat_gpt2.transformer.h[0].output.clone()
            kept = feat_gpt2.lm_head.output.save()
        total = inner.sum() + kept.sum()
        total.save()
    with pytest.raises(interlace.NotSavedError, match=r"inner = feat_gpt2.transformer.h\[0\].output.clone\(\).save\(\)"):
        inner + 1
    seen = {}
    logits = raw_forward(feat_gpt2, PROMPT_A, (feat_gpt2._module.transformer.h[0], lambda m, a, o: seen.__setitem__("h0", o.detach())))
    torch.testing.assert_close(kept, logits, rtol=0, atol=TOL)
    torch.testing.assert_close(total, seen["h0"].sum() + logits.sum(), rtol=1e-6, atol=1e-3)


def test_loops_and_ifs_inside_sessions(feat_gpt2, mode):
    """A greedy loop written by hand: each trace's input is the previous one's plus its
    predicted token, and every other step halves block 0's output."""
    ids = feat_gpt2.tokenizer(PROMPT_A, return_tensors="pt")["input_ids"]
    with feat_gpt2.session(remote=mode):
        steps = list().save()
        for i in range(3):
            with feat_gpt2.trace(ids):
                if i % 2 == 0:
                    feat_gpt2.transformer.h[0].output[:] *= 0.5
                last = feat_gpt2.lm_head.output[:, -1]
            steps.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=-1)

    raw_ids = feat_gpt2.tokenizer(PROMPT_A, return_tensors="pt")["input_ids"]
    for i, got in enumerate(steps):
        half = (feat_gpt2._module.transformer.h[0], lambda m, a, o: o * 0.5)
        with torch.no_grad(), hooks(*([half] if i % 2 == 0 else [])):
            expected = feat_gpt2._module(input_ids=raw_ids).logits[:, -1]
        with torch.no_grad():
            unedited = feat_gpt2._module(input_ids=raw_ids).logits[:, -1]
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
        assert torch.allclose(got, unedited, atol=TOL) == (i % 2 == 1)  # the `if` took effect
        raw_ids = torch.cat([raw_ids, expected.argmax(-1, keepdim=True)], dim=-1)


def test_session_with_backward_and_cache(feat_gpt2, mode):
    with feat_gpt2.session(remote=mode):
        with feat_gpt2.trace(PROMPT_A) as tracer:
            cache = tracer.cache()
            a = feat_gpt2.transformer.h[1].output
            with feat_gpt2.lm_head.output[:, -1].logsumexp(-1).sum().backward():
                g = a.grad
        with feat_gpt2.trace(PROMPT_A):
            feat_gpt2.transformer.h[1].output[:] = feat_gpt2.transformer.h[1].output + g
            shifted = feat_gpt2.lm_head.output.save()
        cached = cache["model.transformer.h.1"].output.save()
        g.save()

    block = feat_gpt2._module.transformer.h[1]
    seen = {}
    with hooks((block, lambda m, a, o: seen.__setitem__("h1", o))):
        logits = feat_gpt2._module(**feat_gpt2.tokenizer(PROMPT_A, return_tensors="pt")).logits
    expected_g = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), seen["h1"])[0]
    feat_gpt2._module.zero_grad(set_to_none=True)
    torch.testing.assert_close(g, expected_g, rtol=0, atol=TOL)
    torch.testing.assert_close(cached, seen["h1"].detach(), rtol=0, atol=TOL)
    expected = raw_forward(feat_gpt2, PROMPT_A, (block, lambda m, a, o: o + expected_g))
    torch.testing.assert_close(shifted, expected, rtol=0, atol=1e-4)
