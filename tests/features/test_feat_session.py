"""`model.session()`: several traces grouped; values flow between them, only saved ones leave."""

from __future__ import annotations

import torch

import interlace


def test_values_flow_between_traces_without_saving(feat_gpt2, et_prompt, msg_prompt):
    last = feat_gpt2.transformer.h[-1]
    with feat_gpt2.session():
        with feat_gpt2.trace(et_prompt):
            h = last.output[:, -1].clone()  # not saved
        with feat_gpt2.trace(msg_prompt):
            last.output[:, -1] = h
            patched = feat_gpt2.lm_head.output[:, -1].save()
    assert "h" not in locals()
    with feat_gpt2.trace(et_prompt):
        reference = feat_gpt2.lm_head.output[:, -1].save()
    # The last position after the last block decides the last logits alone.
    assert torch.allclose(patched, reference, atol=1e-5)


def test_only_saved_values_leave_the_session(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    with model.session():
        with model.trace(tiny_input):
            inner = model.layer1.output.clone()
            kept = model.layer2.output.save()
        total = inner.sum() + kept.sum()
        total.save()
    assert "inner" not in locals()
    assert torch.allclose(total, tiny_mlp.layer1(tiny_input).sum() + kept.sum())


def test_loops_and_ifs_inside_sessions(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    with model.session():
        outs = list().save()
        h = tiny_input
        for i in range(3):
            with model.trace(h):
                if i % 2 == 0:
                    model.layer1.output[:] = 0
                o = model.output
            outs.append(o.detach())
            h = torch.cat([o, o, o[:, :1]], dim=-1)  # back to 5 features
    assert len(outs) == 3
    assert torch.allclose(outs[0], tiny_mlp.layer2.bias.expand(1, -1))
    assert torch.allclose(outs[1], tiny_mlp(torch.cat([outs[0], outs[0], outs[0][:, :1]], -1)))
    assert torch.allclose(outs[2], tiny_mlp.layer2.bias.expand(1, -1))


def test_session_with_backward_and_cache(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    with model.session():
        with model.trace(tiny_input) as tracer:
            cache = tracer.cache()
            a = model.act.output
            with model.output.sum().backward():
                g = a.grad
        with model.trace(tiny_input):
            model.act.output[:] = model.act.output + g
            shifted = model.output.save()
        g.save()
    assert "model.act" in cache
    assert torch.allclose(shifted, tiny_mlp.layer2(cache["model.act"].output + g), atol=1e-6)
