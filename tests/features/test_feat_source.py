"""`module.source`: the calls inside a forward, listed, readable and editable."""

from __future__ import annotations

import pytest
import torch

import interlace
from interlace.errors import TracingError


def _double(x):
    return x * 2


class Base(torch.nn.Module):
    def forward(self, x):
        return x + 1


class Child(Base):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h = torch.relu(h)
        return _double(super().forward(h))


def test_listing_names_every_call(feat_gpt2):
    text = repr(feat_gpt2.transformer.h[0].attn.source)
    assert text.startswith("model.transformer.h.0.attn.source (GPT2Attention.forward)")
    for name in ("self_c_attn_1", "split_1", "attention_interface_0", "self_c_proj_0"):
        assert name in feat_gpt2.transformer.h[0].attn.source.operations
        assert name in text
    assert "->" in text and "def forward(" in text


def test_op_values_match_modules_and_plain_forward_is_unchanged(feat_gpt2, et_prompt):
    with feat_gpt2.trace(et_prompt):
        before = feat_gpt2.lm_head.output.save()
    attn = feat_gpt2.transformer.h[1].attn
    attn.source  # built before the trace: ops are counted from the first call
    with feat_gpt2.trace(et_prompt):
        module_qkv = attn.c_attn.output.save()  # the module runs inside the op's call
        qkv = attn.source.self_c_attn_1.output.save()
        parts = attn.source.split_1.output.save()
        args, kwargs = attn.source.attention_interface_0.inputs
        scaling = kwargs["scaling"]
        scaling.save()
        after = feat_gpt2.lm_head.output.save()
    assert torch.equal(qkv, module_qkv)
    assert isinstance(parts, tuple) and len(parts) == 3 and torch.equal(torch.cat(parts, -1), qkv)
    assert scaling == pytest.approx(attn._module.scaling)
    assert torch.equal(after, before)
    assert type(feat_gpt2.transformer.h[2].attn._module).forward is not type(attn._module).forward


def test_op_edits_change_the_result(feat_gpt2, et_prompt):
    attn = feat_gpt2.transformer.h[0].attn
    with feat_gpt2.trace(et_prompt):
        attn.source.self_c_proj_0.output = torch.zeros_like(attn.source.self_c_proj_0.output)
        out = attn.output[0].save()
        logits = feat_gpt2.lm_head.output.save()
    with feat_gpt2.trace(et_prompt):
        plain = feat_gpt2.lm_head.output.save()
    assert torch.count_nonzero(out) == 0
    assert not torch.allclose(logits, plain)


def test_ops_per_generation_step(feat_gpt2, et_prompt):
    attn = feat_gpt2.transformer.h[0].attn
    n = len(feat_gpt2.tokenizer(et_prompt)["input_ids"])
    with feat_gpt2.generate(et_prompt, max_new_tokens=3) as tracer:
        shapes = list().save()
        for step in tracer.iter[:]:
            shapes.append(tuple(attn.source.self_c_attn_1.output.shape))
    assert shapes == [(1, n, 384), (1, 1, 384), (1, 1, 384)]
    with feat_gpt2.generate(et_prompt, max_new_tokens=3) as tracer:
        for step in tracer.iter[2]:
            only = attn.source.self_c_attn_1.output.save()
    assert only.shape[1] == 1


def test_super_and_module_helpers_survive_rewriting(tiny_input):
    net = torch.nn.Sequential(Child(), Child())
    model = interlace.NNsight(net)
    x = torch.rand(2, 4)
    expected = net(x)
    src = model[0].source
    assert src.operations == ["self_lin_0", "torch_relu_0", "forward_0", "_double_0"]
    with model.trace(x):
        relu = model[0].source.torch_relu_0.output.save()
        model[0].source.torch_relu_0.output = relu * 0
        out = model.output.save()
    assert torch.allclose(net(x), expected)  # outside traces the rewritten forward is the same
    assert torch.allclose(out, net[1](torch.full((2, 4), 2.0)))
    assert type(net[1]).forward is Child.forward  # the other instance is untouched


def test_source_first_used_inside_the_trace(tiny_gpt2_path, et_prompt):
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    with model.trace(et_prompt):
        qkv = model.transformer.h[0].attn.source.self_c_attn_1.output.save()
        module_out = model.transformer.h[0].attn.output[0].save()
    assert qkv.shape[-1] == 384 and module_out.shape[-1] == 128


def test_source_first_used_inside_its_running_module_is_a_clear_error(tiny_gpt2_path, et_prompt):
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    attn = model.transformer.h[0].attn
    with pytest.raises(TracingError, match="already running"):
        with model.trace(et_prompt):
            attn.c_attn.output
            attn.source.self_c_proj_0.output
    with model.trace(et_prompt):  # built now: works from the start of the next run
        attn.c_attn.output
        proj = attn.source.self_c_proj_0.output.save()
    assert proj.shape[-1] == 128


def test_source_errors(feat_gpt2):
    src = feat_gpt2.transformer.h[0].attn.source
    with pytest.raises(AttributeError, match="Did you mean self_c_attn"):
        src.self_c_atn_1
    with pytest.raises(TracingError, match="inside a traced block"):
        src.self_c_attn_1.output


def test_source_ops_in_traces_of_an_edited_copy(tiny_mlp, tiny_input):
    net = torch.nn.Sequential(Child())
    model = interlace.NNsight(net)
    model[0].source
    with model.edit() as edited:
        model[0].lin.output[:] = 1.0
    with edited.trace(torch.rand(1, 4)):
        relu = model[0].source.torch_relu_0.output.save()
    assert torch.equal(relu, torch.ones(1, 4))
