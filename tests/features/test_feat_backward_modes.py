"""Regression: `with loss.backward():` in both remote modes.

It failed with `NameError: name '__interlace_backward__' is not defined`: the executor built
the body's namespace itself and lacked the helper capture's rewrite calls.

(RECONSTRUCTED: this file's original was overwritten by accident by the engineer writing
`test_feat_backward_everywhere.py`; the test names are the original's, taken from pytest's
cache, the bodies are rewritten. Its author should check it against their intent.)
"""

from __future__ import annotations

import pytest
import torch

from interlace.tracing.backward import BACKWARD_HELPER
from interlace.tracing.capture import SAVE_HELPER
from interlace.tracing.namespace import body_namespace

TOL = 1e-5


def _raw(model, prompt, layer):
    """The plain module's loss and block `layer`'s output (kept in the graph) by a raw hook."""
    seen = {}
    block = model._module.transformer.h[layer]
    handle = block.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o))
    try:
        logits = model._module(**model.tokenizer(prompt, return_tensors="pt")).logits
    finally:
        handle.remove()
    return logits[:, -1].logsumexp(-1).sum(), seen["h"]


@pytest.mark.parametrize("prompt", ["The Eiffel Tower is in the city of", "Madison Square Garden is"])
def test_backward_grads_equal_autograd_in_every_mode(feat_gpt2, mode, prompt):
    with feat_gpt2.trace(prompt, remote=mode):
        h = feat_gpt2.transformer.h[1].output
        loss = feat_gpt2.lm_head.output[:, -1].logsumexp(-1).sum()
        with loss.backward():
            g = h.grad.save()
    feat_gpt2._module.zero_grad(set_to_none=True)
    loss, raw_h = _raw(feat_gpt2, prompt, 1)
    torch.testing.assert_close(g, torch.autograd.grad(loss, raw_h)[0], rtol=0, atol=TOL)


def test_replaced_grad_flows_upstream_in_every_mode(feat_gpt2, mode):
    prompt = "The Eiffel Tower is in the city of"
    with feat_gpt2.trace(prompt, remote=mode):
        h0 = feat_gpt2.transformer.h[0].output
        h1 = feat_gpt2.transformer.h[1].output
        loss = feat_gpt2.lm_head.output[:, -1].logsumexp(-1).sum()
        with loss.backward():
            h1.grad = h1.grad * 2
            g0 = h0.grad.save()
    feat_gpt2._module.zero_grad(set_to_none=True)
    loss, raw_h0 = _raw(feat_gpt2, prompt, 0)
    torch.testing.assert_close(g0, 2 * torch.autograd.grad(loss, raw_h0)[0], rtol=0, atol=TOL)


def test_every_helper_capture_rewrites_to_is_in_the_one_namespace():
    for restricted in (None, {"len": len}):
        ns = body_namespace(builtins_dict=restricted)
        assert SAVE_HELPER in ns and BACKWARD_HELPER in ns
