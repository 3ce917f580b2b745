"""Gradients in every mode: `with loss.backward():` reads and replaces `.grad`, a plain
`loss.backward()` fills parameter gradients, each equal to `torch.autograd.grad` on the plain
module (raw forward hooks keep the activations; no Interlace code computes the truth).

The batch holds two prompts of different lengths, so a gradient from the wrong row or a
padding offset shows. (`test_feat_backward.py` covers the engine's own cases on a small MLP.)
"""

from __future__ import annotations

from typing import Any

import torch

from feature_truth import PROMPT_A, PROMPT_B, forward_inputs, hooks, steer
from interlace.errors import TracingError

PROMPTS = [PROMPT_A, PROMPT_B]
TOL = 1e-5


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    """A loss that weighs rows and positions differently (the same expression in the bodies)."""
    return logits[:, -1].logsumexp(-1).sum() + 0.5 * logits[:, -3, 7].sum()


def raw_run(model: Any, blocks: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The plain module on both prompts: the loss and the named blocks' outputs (in the graph)."""
    seen: dict[int, torch.Tensor] = {}
    layers = model._module.transformer.h
    pairs = [(layers[i], lambda m, a, o, i=i: seen.__setitem__(i, o)) for i in blocks]
    with hooks(*pairs):
        logits = model._module(**forward_inputs(model, PROMPTS)).logits
    return loss_of(logits), [seen[i] for i in blocks]


def test_grads_read_in_the_block_equal_autograd(feat_gpt2, mode):
    with feat_gpt2.trace(PROMPTS, remote=mode):
        h0 = feat_gpt2.transformer.h[0].output
        h2 = feat_gpt2.transformer.h[2].output
        logits = feat_gpt2.lm_head.output
        loss = logits[:, -1].logsumexp(-1).sum() + 0.5 * logits[:, -3, 7].sum()
        with loss.backward():
            g2 = h2.grad.save()  # later layer first: gradients flow backwards
            g0 = h0.grad.save()
    feat_gpt2._module.zero_grad(set_to_none=True)
    loss, (r0, r2) = raw_run(feat_gpt2, (0, 2))
    e2, e0 = torch.autograd.grad(loss, [r2, r0])
    torch.testing.assert_close(g2, e2, rtol=0, atol=TOL)
    torch.testing.assert_close(g0, e0, rtol=0, atol=TOL)


def test_replacing_a_grad_changes_upstream_grads(feat_gpt2, mode):
    delta = steer(128)
    with feat_gpt2.trace(PROMPTS, remote=mode):
        h0 = feat_gpt2.transformer.h[0].output
        h2 = feat_gpt2.transformer.h[2].output
        logits = feat_gpt2.lm_head.output
        loss = logits[:, -1].logsumexp(-1).sum() + 0.5 * logits[:, -3, 7].sum()
        with loss.backward():
            h2.grad = h2.grad * 0.5 + delta
            g0 = h0.grad.save()
    feat_gpt2._module.zero_grad(set_to_none=True)
    loss, (r0, r2) = raw_run(feat_gpt2, (0, 2))
    e2 = torch.autograd.grad(loss, r2, retain_graph=True)[0]
    # Every path from block 0 to the loss runs through block 2's output: what reaches h0 is
    # the replaced gradient pulled back through blocks 1-2.
    expected = torch.autograd.grad(r2, r0, grad_outputs=e2 * 0.5 + delta, retain_graph=True)[0]
    unreplaced = torch.autograd.grad(r2, r0, grad_outputs=e2)[0]
    torch.testing.assert_close(g0, expected, rtol=0, atol=TOL)
    assert not torch.allclose(expected, unreplaced, atol=1e-3)  # the replacement mattered


def test_retain_graph_allows_several_blocks(feat_gpt2, mode):
    with feat_gpt2.trace(PROMPTS, remote=mode):
        h1 = feat_gpt2.transformer.h[1].output
        loss = feat_gpt2.lm_head.output[:, -1].logsumexp(-1).sum()
        with loss.backward(retain_graph=True):
            first = h1.grad.clone().save()
        with loss.backward():
            h1.grad = h1.grad * 3
            second = h1.grad.clone().save()
    feat_gpt2._module.zero_grad(set_to_none=True)
    seen: dict[str, torch.Tensor] = {}
    with hooks((feat_gpt2._module.transformer.h[1], lambda m, a, o: seen.__setitem__("h1", o))):
        logits = feat_gpt2._module(**forward_inputs(feat_gpt2, PROMPTS)).logits
    expected = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), seen["h1"])[0]
    torch.testing.assert_close(first, expected, rtol=0, atol=TOL)
    torch.testing.assert_close(second, 3 * expected, rtol=0, atol=TOL)


def test_plain_backward_fills_parameter_grads_of_this_run_only(feat_gpt2, mode):
    """Each run's parameter gradients are that run's: a server starts every job without
    gradients (one job's must never reach the next); here the user clears them between."""
    weight = feat_gpt2._module.transformer.h[0].mlp.c_fc.weight
    feat_gpt2._module.zero_grad(set_to_none=True)
    loss, _ = raw_run(feat_gpt2, ())
    expected = torch.autograd.grad(loss, weight)[0]
    for _ in range(2):
        with feat_gpt2.trace(PROMPTS, remote=mode):
            logits = feat_gpt2.lm_head.output
            loss = logits[:, -1].logsumexp(-1).sum() + 0.5 * logits[:, -3, 7].sum()
            loss.backward()
            got = feat_gpt2.transformer.h[0].mlp.c_fc.weight.grad.clone().save()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        feat_gpt2._module.zero_grad(set_to_none=True)


def test_a_remote_job_leaves_no_gradients_on_the_model(feat_gpt2, mode):
    """The simulation runs on this process's model: like a server's, it must come back
    without the job's gradients (a local run keeps them, as PyTorch does)."""
    feat_gpt2._module.zero_grad(set_to_none=True)
    with feat_gpt2.trace(PROMPT_A, remote=mode):
        feat_gpt2.lm_head.output.sum().backward()
    weight = feat_gpt2._module.transformer.h[0].mlp.c_fc.weight
    try:
        if mode is False:
            assert weight.grad is not None
        else:
            assert weight.grad is None
    finally:
        feat_gpt2._module.zero_grad(set_to_none=True)


def test_backward_needs_a_graph(feat_gpt2, mode, raises_in_mode):
    with raises_in_mode(TracingError, match="does not require grad"):
        with feat_gpt2.trace(PROMPT_A, remote=mode):
            with torch.no_grad():
                loss = feat_gpt2.lm_head.output.sum()
            with loss.backward():
                pass
