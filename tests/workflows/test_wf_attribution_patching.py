"""Attribution patching: estimate every layer's patching effect at every position as
(clean - corrupt) activation x gradient of a logit difference on the corrupt run. The gradients
come from `with metric.backward():` in all three modes; the truth is torch.autograd.grad on a
plain copy of the model under raw hooks."""

from __future__ import annotations

import torch

import interlace

TOL = 1e-4
CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"  # the same number of tokens (12)
TOKEN_A, TOKEN_B = 267, 360  # the logit difference the metric measures


def _expected(raw):
    names = [f"transformer.h.{i}" for i in range(len(raw.model.transformer.h))]
    _, clean = raw.run(CLEAN, capture=tuple(names))
    outs: dict[str, torch.Tensor] = {}
    hooks = {name: (lambda m, a, o, name=name: outs.__setitem__(name, o)) for name in names}
    with raw.hooks(hooks):
        logits = raw.model(**raw.encode(CORRUPT)).logits
    metric = logits[0, -1, TOKEN_A] - logits[0, -1, TOKEN_B]
    grads = torch.autograd.grad(metric, [outs[name] for name in names])
    acts = [outs[name].detach() for name in names]
    scores = [((clean[name] - act) * grad).sum(-1) for name, act, grad in zip(names, acts, grads)]
    return metric.detach(), acts, list(grads), scores


def test_attribution_patching_all_layers(lm, raw, mode):
    assert raw.n_tokens(CLEAN) == raw.n_tokens(CORRUPT)

    with lm.trace(CLEAN, remote=mode):
        clean_acts = list().save()
        for layer in lm.transformer.h:
            clean_acts.append(layer.output)

    with lm.trace(CORRUPT, remote=mode):
        corrupt_acts = list().save()
        for layer in lm.transformer.h:
            corrupt_acts.append(layer.output)
        logits = lm.lm_head.output
        metric = logits[0, -1, TOKEN_A] - logits[0, -1, TOKEN_B]
        value = interlace.save(metric.detach())
        grads = list().save()
        with metric.backward():
            for act in reversed(corrupt_acts):  # gradients arrive last layer first
                grads.append(act.grad)
    grads.reverse()

    scores = [((c - k) * g).sum(-1) for c, k, g in zip(clean_acts, corrupt_acts, grads)]

    want_metric, want_acts, want_grads, want_scores = _expected(raw)
    torch.testing.assert_close(value, want_metric, rtol=0, atol=TOL)
    assert len(grads) == len(want_grads) == 4
    for i in range(4):
        torch.testing.assert_close(corrupt_acts[i], want_acts[i], rtol=0, atol=TOL, msg=f"activation {i}")
        torch.testing.assert_close(grads[i], want_grads[i], rtol=1e-4, atol=1e-5, msg=f"grad {i}")
        torch.testing.assert_close(scores[i], want_scores[i], rtol=1e-4, atol=1e-5, msg=f"score {i}")
    # Gradients differ by layer and position (a misrouted gradient would show).
    assert not torch.allclose(grads[0], grads[3], atol=1e-4)
    # The last block's output reaches the metric only at the last position; earlier blocks'
    # outputs reach it at every position through attention.
    assert torch.count_nonzero(grads[3][0, :-1]) == 0 and torch.count_nonzero(grads[3][0, -1]) > 0
    assert torch.count_nonzero(grads[0][0, :-1].abs().sum(-1)) == grads[0].shape[1] - 1
