"""Reading several gradients in one `with loss.backward():` block, in either order.

Gradients arrive last layer first. Tensors the block names plainly (`h0.grad`, or `hs[i].grad`
of a list) are watched from the start of the backward pass, so reading them in forward order
works too; each value is compared with `torch.autograd.grad` on the same graph. A tensor
reached through another expression is watched only when read, and reading it after its
gradient passed says that gradients arrive last layer first and shows the order to write.
"""

from __future__ import annotations

import pytest
import torch

from interlace.errors import MissedProviderError, TracingError

PROMPT = "The Eiffel Tower is in the city of"


def test_forward_order_equals_autograd(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.trace(PROMPT, remote=mode):
        h0 = lm.transformer.h[0].output
        h2 = lm.transformer.h[2].output
        loss = lm.lm_head.output[:, -1].logsumexp(-1).sum()
        r0, r2 = torch.autograd.grad(loss, [h0, h2], retain_graph=True)
        r0, r2 = r0.save(), r2.save()
        with loss.backward():
            g0 = h0.grad.save()  # the earlier layer first
            g2 = h2.grad.save()
    assert g0.shape == g2.shape == (1, 12, 128)
    torch.testing.assert_close(g0, r0, rtol=0, atol=0)
    torch.testing.assert_close(g2, r2, rtol=0, atol=0)
    assert not torch.allclose(g0, g2)


def test_both_orders_and_a_list_give_the_same_gradients(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.trace(PROMPT, remote=mode):
        hs = [lm.transformer.h[i].output for i in range(4)]
        loss = (lm.lm_head.output[:, -1] * torch.arange(512.0)).sum()
        refs = list(torch.autograd.grad(loss, hs, retain_graph=True)).save()
        with loss.backward(retain_graph=True):
            forward = [hs[i].grad for i in range(4)].save()
        with loss.backward(retain_graph=True):
            backward = [hs[i].grad for i in reversed(range(4))][::-1].save()
        with loss.backward():
            mixed = {i: hs[i].grad for i in (2, 0, 3, 1)}.save()
    for i in range(4):
        torch.testing.assert_close(forward[i], refs[i], rtol=0, atol=0)
        torch.testing.assert_close(backward[i], refs[i], rtol=0, atol=0)
        torch.testing.assert_close(mixed[i], refs[i], rtol=0, atol=0)


def test_replacing_a_gradient_still_goes_last_layer_first(feat_gpt2):
    """A replacement only changes what flows upstream while the backward waits at that
    tensor; assigning a later layer's gradient after an earlier one was read says so."""
    lm = feat_gpt2
    with pytest.raises(TracingError, match="gradients arrive last layer first") as info:
        with lm.trace(PROMPT):
            h0 = lm.transformer.h[0].output
            h2 = lm.transformer.h[2].output
            loss = lm.lm_head.output.sum()
            with loss.backward():
                g0 = h0.grad
                h2.grad = h2.grad * 2  # too late: its gradient has already reached h0
    assert "g2 = h2.grad\n    h2.grad = g2 * 2\n    g1 = h1.grad" in str(info.value)


def test_an_expression_read_too_late_shows_the_order(feat_gpt2, raises_in_mode, mode):
    lm = feat_gpt2
    with raises_in_mode(MissedProviderError, match="Gradients arrive last layer first") as info:
        with lm.trace(PROMPT, remote=mode):
            h0 = lm.transformer.h[0].output
            layers = {"late": lm.transformer.h[2].output}
            loss = lm.lm_head.output.sum()
            with loss.backward():
                g0 = h0.grad.save()
                g2 = layers.get("late").grad.save()  # through a call: not watched in advance
    assert "g2 = h2.grad.save()  # later layer first" in str(info.value)


def test_a_tensor_off_the_path_says_so(feat_gpt2, raises_in_mode, mode):
    lm = feat_gpt2
    with raises_in_mode(MissedProviderError, match="not on the path from the loss"):
        with lm.trace(PROMPT, remote=mode):
            first_position = lm.transformer.h[0].output[:, 0]  # a new tensor...
            loss = lm.lm_head.output.sum()  # ...that the loss was not computed from
            with loss.backward():
                g = first_position.grad.save()
