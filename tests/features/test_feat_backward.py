"""Gradients inside traces: `with loss.backward():` reads and replaces `.grad`."""

from __future__ import annotations

import pytest
import torch

import interlace
from interlace.errors import MissedProviderError, TracingError


@pytest.fixture
def mlp(tiny_mlp):
    return interlace.NNsight(tiny_mlp)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(3, 5)


def test_grads_read_in_the_block_equal_autograd_grad(mlp, x):
    with mlp.trace(x):
        h1 = mlp.layer1.output
        a = mlp.act.output
        loss = mlp.output.pow(2).sum()
        ref_a, ref_h1 = torch.autograd.grad(loss, [a, h1], retain_graph=True)
        ref_a, ref_h1 = ref_a.save(), ref_h1.save()
        with loss.backward():
            ga = a.grad.save()  # later tensor first: gradients flow backwards
            gh1 = h1.grad.save()
    assert torch.equal(ga, ref_a) and torch.equal(gh1, ref_h1)


def test_replacing_a_grad_changes_upstream_grads(mlp, x, tiny_mlp):
    with mlp.trace(x):
        h1 = mlp.layer1.output
        a = mlp.act.output
        loss = mlp.output.sum()
        ref_h1 = torch.autograd.grad(loss, h1, retain_graph=True)[0].save()
        with loss.backward():
            a.grad = a.grad * 3
            gh1 = h1.grad.save()
    assert torch.allclose(gh1, 3 * ref_h1)
    # What reached the parameters used the replaced gradient too.
    expected_w = 3 * (ref_h1.t() @ x)
    assert torch.allclose(tiny_mlp.layer1.weight.grad, expected_w, atol=1e-6)


def test_in_place_and_augmented_grad_edits(mlp, x):
    with mlp.trace(x):
        h1 = mlp.layer1.output
        a = mlp.act.output
        loss = mlp.output.sum()
        ref_h1 = torch.autograd.grad(loss, h1, retain_graph=True)[0].save()
        with loss.backward(retain_graph=True):
            a.grad += a.grad  # doubles
            doubled = h1.grad.clone().save()
        with loss.backward():
            a.grad[:] = 0  # in place
            zero = h1.grad.clone().save()
    assert torch.allclose(doubled, 2 * ref_h1)
    assert torch.count_nonzero(zero) == 0


def test_gpt2_grads_and_replacement_follow_linearity(feat_gpt2, et_prompt):
    feat_gpt2._module.zero_grad(set_to_none=True)
    with feat_gpt2.trace(et_prompt):
        h0 = feat_gpt2.transformer.h[0].output
        h1 = feat_gpt2.transformer.h[1].output
        loss = feat_gpt2.output.logits[:, -1].logsumexp(-1).sum()
        r1, r0 = torch.autograd.grad(loss, [h1, h0], retain_graph=True)
        delta = torch.ones_like(r1)
        # Replacing h1's gradient by r1 + delta adds delta's contribution upstream.
        r0_new = r0 + torch.autograd.grad(h1, h0, delta, retain_graph=True)[0]
        r1, r0, r0_new = r1.save(), r0.save(), r0_new.save()
        with loss.backward(retain_graph=True):
            g1 = h1.grad.clone().save()
            g0 = h0.grad.clone().save()
        with loss.backward():
            h1.grad = h1.grad + delta
            g0_new = h0.grad.clone().save()
    feat_gpt2._module.zero_grad(set_to_none=True)
    assert torch.allclose(g1, r1) and torch.allclose(g0, r0)
    assert torch.allclose(g0_new, r0_new, atol=1e-5)


def test_retain_graph_allows_several_blocks(mlp, x, tiny_mlp):
    with mlp.trace(x):
        a = mlp.act.output
        loss = mlp.output.pow(2).sum()
        with loss.backward(retain_graph=True):
            first = a.grad.clone().save()
        with loss.backward():
            second = a.grad.clone().save()
    # By hand: the same loss on the plain module, differentiated by autograd.
    raw_a = tiny_mlp.act(tiny_mlp.layer1(x))
    expected = torch.autograd.grad(tiny_mlp.layer2(raw_a).pow(2).sum(), raw_a)[0]
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-6)


def test_plain_backward_statement_behaves_like_pytorch(mlp, x, tiny_mlp):
    with mlp.trace(x):
        loss = mlp.output.sum()
        loss.backward()
        w = mlp.layer2.weight.grad.clone().save()
    expected = tiny_mlp.layer2.weight.grad.clone()
    tiny_mlp.zero_grad(set_to_none=True)
    tiny_mlp(x).sum().backward()
    assert torch.equal(w, expected) and torch.equal(tiny_mlp.layer2.weight.grad, expected)


def test_block_without_reads_runs_the_backward(mlp, x, tiny_mlp):
    with mlp.trace(x):
        with mlp.output.pow(2).sum().backward():
            pass
    expected = torch.autograd.grad(tiny_mlp(x).pow(2).sum(), tiny_mlp.layer1.weight)[0]
    torch.testing.assert_close(tiny_mlp.layer1.weight.grad, expected, rtol=0, atol=1e-6)


def test_unnamed_tensor_read_after_its_gradient_passed_says_the_order(mlp, x):
    # Plain names are watched from the start (any order works, see
    # test_feat_gradients_order.py); a tensor reached through an attribute is not.
    class Holder:
        pass

    with pytest.raises(MissedProviderError, match="last layer first") as info:
        with mlp.trace(x):
            held = Holder()
            h1 = mlp.layer1.output
            held.a = mlp.act.output
            with mlp.output.sum().backward():
                h1.grad
                held.a.grad  # its gradient passed while the block waited for h1's
    assert "g2 = h2.grad.save()  # later layer first" in str(info.value)


def test_view_taken_after_the_forward_has_no_grad(mlp, x):
    with pytest.raises(MissedProviderError, match="not on the path"):
        with mlp.trace(x):
            first_row = mlp.layer1.output[0]
            with mlp.output.sum().backward():
                first_row.grad


def test_assigning_after_moving_on_is_an_error(mlp, x):
    with pytest.raises(TracingError, match="moved past"):
        with mlp.trace(x):
            h1 = mlp.layer1.output
            a = mlp.act.output
            with mlp.output.sum().backward():
                g = a.grad
                h1.grad
                a.grad = g * 2


def test_errors_inside_the_block_propagate(mlp, x):
    with pytest.raises(ZeroDivisionError):
        with mlp.trace(x):
            a = mlp.act.output
            with mlp.output.sum().backward():
                a.grad
                1 / 0


def test_backward_needs_a_graph(mlp, x):
    with pytest.raises(TracingError, match="does not require grad"):
        with mlp.trace(x):
            with torch.no_grad():
                loss = mlp.output.sum()
            with loss.backward():
                pass
