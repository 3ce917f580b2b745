"""`module.source` and `op.source`: the calls inside a forward (and inside the functions it
calls), listed, readable and editable, in every mode (`mode`: local run, simulation, server).

The truth is always computed without Interlace: a plain Hugging Face model loaded from the
same files (its own instance, never rewritten by `.source`), with raw torch hooks or with the
torch function patched for the plain forward. Edits are position-dependent, and two invokes
use prompts of different lengths, so a swapped row or position would show.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

import interlace
from interlace.backends.client import RemoteException
from interlace.errors import OutOfOrderError, TracingError

SDPA = "torch_nn_functional_scaled_dot_product_attention_0"


# -- truths without Interlace -------------------------------------------------------------------


def _raw(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def raw_gpt2(tiny_gpt2_path):
    return _raw(tiny_gpt2_path)


@pytest.fixture(scope="module")
def raw_sdpa(tiny_gpt2_sdpa_path):
    model = _raw(tiny_gpt2_sdpa_path)
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def raw_llama(tiny_llama_path):
    return _raw(tiny_llama_path)


@pytest.fixture(scope="module")
def sdpa_lm(tiny_gpt2_sdpa_path) -> interlace.LanguageModel:
    return interlace.LanguageModel(str(tiny_gpt2_sdpa_path), dispatch=True)


def _ids(lm: interlace.LanguageModel, prompt: str) -> dict:
    return dict(lm.tokenizer(prompt, return_tensors="pt"))


@contextlib.contextmanager
def _patched(owner, name: str, edit=None):
    """Record every call of `owner.name` during a plain forward; `edit(k, out)` may replace
    the k-th call's output (the raw patch an edit through `.source` must equal)."""
    original = getattr(owner, name)
    calls: list = []

    def recorder(*args, **kwargs):
        out = original(*args, **kwargs)
        if edit is not None:
            out = edit(len(calls), out)
        calls.append(out)
        return out

    setattr(owner, name, recorder)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


def _raises(mode, error=TracingError):
    """A body's error: raised as itself locally, as the job's error in both remote modes."""
    return pytest.raises(error if mode is False else RemoteException)


def _positional(n: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, n)  # a different factor at every position


# -- listing --------------------------------------------------------------------------------------


def test_listing_names_every_call_and_repeated_calls_distinctly(feat_gpt2):
    src = feat_gpt2.transformer.h[0].attn.source
    text = repr(src)
    assert text.startswith("model.transformer.h.0.attn.source (GPT2Attention.forward)")
    # `self.c_attn(...)` and `.split(...)` appear twice in the forward (cross- and self-attention).
    for name in ("self_c_attn_0", "self_c_attn_1", "split_0", "split_1", "attention_interface_0", "self_c_proj_0"):
        assert name in src.operations
        assert name in text
    assert src.operations.index("self_c_attn_0") < src.operations.index("self_c_attn_1")
    assert len(set(src.operations)) == len(src.operations)
    assert "->" in text and "def forward(" in text


# -- reading and editing a module's ops -----------------------------------------------------------


def test_op_values_equal_raw_hooks(feat_gpt2, raw_gpt2, et_prompt, mode):
    raw_attn = raw_gpt2.transformer.h[1].attn
    seen = {}
    handles = [
        raw_attn.c_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o)),
        raw_attn.c_proj.register_forward_hook(lambda m, i, o: seen.update(proj_in=i[0], proj=o)),
    ]
    try:
        with torch.no_grad():
            truth_logits = raw_gpt2(**_ids(feat_gpt2, et_prompt)).logits
    finally:
        for h in handles:
            h.remove()
    attn = feat_gpt2.transformer.h[1].attn
    attn.source  # built before the trace: ops are counted from the first call
    with feat_gpt2.trace(et_prompt, remote=mode):
        qkv = attn.source.self_c_attn_1.output.save()
        parts = attn.source.split_1.output.save()
        scaling = attn.source.attention_interface_0.inputs[1]["scaling"].save()
        proj_in = attn.source.self_c_proj_0.input.save()
        proj = attn.source.self_c_proj_0.output.save()
        logits = feat_gpt2.lm_head.output.save()
    assert torch.equal(qkv, seen["qkv"])
    assert isinstance(parts, tuple) and len(parts) == 3
    for part, want in zip(parts, seen["qkv"].split(128, dim=2)):
        assert torch.equal(part, want)
    assert scaling == raw_attn.scaling
    assert torch.equal(proj_in, seen["proj_in"]) and torch.equal(proj, seen["proj"])
    assert torch.equal(logits, truth_logits)  # the rewritten forward computes the same, bit for bit


def test_op_edit_equals_the_raw_patch(feat_gpt2, raw_gpt2, et_prompt, mode):
    n = feat_gpt2.tokenizer(et_prompt, return_tensors="pt")["input_ids"].shape[1]
    scale = _positional(n).view(1, n, 1)
    handle = raw_gpt2.transformer.h[0].attn.c_proj.register_forward_hook(lambda m, i, o: o * scale)
    try:
        with torch.no_grad():
            truth = raw_gpt2(**_ids(feat_gpt2, et_prompt)).logits
    finally:
        handle.remove()
    with torch.no_grad():
        plain = raw_gpt2(**_ids(feat_gpt2, et_prompt)).logits
    attn = feat_gpt2.transformer.h[0].attn
    with feat_gpt2.trace(et_prompt, remote=mode):
        attn.source.self_c_proj_0.output = attn.source.self_c_proj_0.output * scale
        logits = feat_gpt2.lm_head.output.save()
    assert torch.equal(logits, truth)
    assert not torch.allclose(logits, plain)  # (the edit matters)


def test_source_built_before_the_trace_is_built_where_the_body_runs(tiny_llama_path, raw_llama, et_prompt, mode):
    """A body may use `.source` ops of a module after reading other values of that module
    when `.source` was built before the trace; the server must build it too (a regression:
    the server's copy was first built mid-run there, and the body failed)."""
    lm = interlace.LanguageModel(str(tiny_llama_path), dispatch=True)
    raw_attn = raw_llama.model.layers[1].self_attn
    seen = {}
    handles = [
        raw_attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
        raw_attn.o_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o)),
    ]
    try:
        with torch.no_grad():
            raw_llama(**_ids(lm, et_prompt))
    finally:
        for h in handles:
            h.remove()
    attn = lm.model.layers[1].self_attn
    attn.source
    with lm.trace(et_prompt, remote=mode):
        q = attn.q_proj.output.save()
        o = attn.source.self_o_proj_0.output.save()
    assert torch.equal(q, seen["q"]) and torch.equal(o, seen["o"])


def test_source_first_used_inside_the_trace(tiny_gpt2_path, raw_gpt2, et_prompt, mode):
    lm = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    seen = {}
    handles = [
        raw_gpt2.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o)),
        raw_gpt2.transformer.h[0].attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o[0])),
    ]
    try:
        with torch.no_grad():
            raw_gpt2(**_ids(lm, et_prompt))
    finally:
        for h in handles:
            h.remove()
    with lm.trace(et_prompt, remote=mode):
        qkv = lm.transformer.h[0].attn.source.self_c_attn_1.output.save()
        attn_out = lm.transformer.h[0].attn.output[0].save()
    assert torch.equal(qkv, seen["qkv"]) and torch.equal(attn_out, seen["attn"])


@pytest.mark.parametrize("where", [False, "local"], ids=["local-run", "simulated"])
def test_source_first_used_inside_its_running_module_is_a_clear_error(tiny_gpt2_path, raw_gpt2, et_prompt, where):
    # Local model states only: the server's hosted model is shared by the whole session, so
    # whether its `.source` is already built there depends on the tests that ran before.
    lm = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    attn = lm.transformer.h[0].attn
    with _raises(where, TracingError) as info:
        with lm.trace(et_prompt, remote=where):
            attn.c_attn.output
            attn.source.self_c_proj_0.output
    assert "already running" in str(info.value) and "model.transformer.h.0.attn.source" in str(info.value)
    with lm.trace(et_prompt, remote=where):  # built now: works from the start of the next run
        attn.c_attn.output
        proj = attn.source.self_c_proj_0.output.save()
    seen = {}
    handle = raw_gpt2.transformer.h[0].attn.c_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))
    try:
        with torch.no_grad():
            raw_gpt2(**_ids(lm, et_prompt))
    finally:
        handle.remove()
    assert torch.equal(proj, seen["o"])


def test_ops_per_generation_step(feat_gpt2, raw_gpt2, et_prompt, mode):
    ids = _ids(feat_gpt2, et_prompt)
    seen = []
    handle = raw_gpt2.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            raw_gpt2.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=raw_gpt2.generation_config.eos_token_id)
    finally:
        handle.remove()
    assert len(seen) == 3
    attn = feat_gpt2.transformer.h[0].attn
    with feat_gpt2.generate(et_prompt, max_new_tokens=3, remote=mode) as tracer:
        values = list().save()
        for step in tracer.iter[:]:
            values.append(attn.source.self_c_attn_1.output)
    assert len(values) == 3
    for got, want in zip(values, seen):
        assert torch.equal(got, want)
    with feat_gpt2.generate(et_prompt, max_new_tokens=3, remote=mode) as tracer:
        for step in tracer.iter[2]:
            only = attn.source.self_c_attn_1.output.save()
    assert torch.equal(only, seen[2])


# -- `op.source`: inside the functions an op calls ------------------------------------------------


def test_nested_source_reaches_scaled_dot_product_attention(sdpa_lm, raw_sdpa, et_prompt, mode):
    ids = _ids(sdpa_lm, et_prompt)
    with torch.no_grad(), _patched(torch.nn.functional, "scaled_dot_product_attention") as calls:
        truth = raw_sdpa(**ids).logits
    assert len(calls) == 4  # one call per layer, in layer order
    with sdpa_lm.trace(et_prompt, remote=mode):
        inner = sdpa_lm.transformer.h[0].attn.source.attention_interface_0.source
        names = inner.operations.save()
        first = inner.torch_nn_functional_scaled_dot_product_attention_0.output.save()
        third = sdpa_lm.transformer.h[2].attn.source.attention_interface_0.source.torch_nn_functional_scaled_dot_product_attention_0.output.save()
        logits = sdpa_lm.lm_head.output.save()
    assert SDPA in names
    assert torch.equal(first, calls[0]) and torch.equal(third, calls[2])
    assert torch.equal(logits, truth)
    with torch.no_grad():  # outside traces the forward is the original one
        assert torch.equal(sdpa_lm._module(**ids).logits, truth)


def test_nested_edit_equals_the_raw_patch(sdpa_lm, raw_sdpa, et_prompt, mode):
    ids = _ids(sdpa_lm, et_prompt)
    n = ids["input_ids"].shape[1]
    scale = _positional(n).view(1, 1, n, 1)  # sdpa's output is (batch, heads, positions, dim)
    with torch.no_grad(), _patched(torch.nn.functional, "scaled_dot_product_attention",
                                   edit=lambda k, out: out * scale if k == 1 else out):
        truth = raw_sdpa(**ids).logits
    with torch.no_grad():
        plain = raw_sdpa(**ids).logits
    with sdpa_lm.trace(et_prompt, remote=mode):
        op = sdpa_lm.transformer.h[1].attn.source.attention_interface_0.source.torch_nn_functional_scaled_dot_product_attention_0
        op.output = op.output * scale
        logits = sdpa_lm.lm_head.output.save()
    assert torch.equal(logits, truth)
    assert not torch.allclose(logits, plain)
    with sdpa_lm.trace(et_prompt, remote=mode):  # the edit does not outlive its trace
        after = sdpa_lm.lm_head.output.save()
    assert torch.equal(after, plain)


def test_nested_source_rows_of_two_invokes(sdpa_lm, raw_sdpa, et_prompt, msg_prompt, mode):
    truths = []
    for prompt in (et_prompt, msg_prompt):
        with torch.no_grad(), _patched(torch.nn.functional, "scaled_dot_product_attention") as calls:
            raw_sdpa(**_ids(sdpa_lm, prompt))
        truths.append(calls[1])
    lengths = [t.shape[2] for t in truths]
    assert lengths[0] != lengths[1]
    with sdpa_lm.trace(remote=mode) as tracer:
        with tracer.invoke(et_prompt):
            a = sdpa_lm.transformer.h[1].attn.source.attention_interface_0.source.torch_nn_functional_scaled_dot_product_attention_0.output.save()
        with tracer.invoke(msg_prompt):
            b = sdpa_lm.transformer.h[1].attn.source.attention_interface_0.source.torch_nn_functional_scaled_dot_product_attention_0.output.save()
    assert a.shape[0] == b.shape[0] == 1
    # Left padding: each row's own tokens are its last positions (padded attention is masked,
    # so equal up to float rounding, not bit for bit).
    for got, want, n in zip((a, b), truths, lengths):
        torch.testing.assert_close(got[:, :, -n:], want, rtol=1e-5, atol=1e-5)


def test_nested_ops_per_generation_step(sdpa_lm, raw_sdpa, et_prompt, mode):
    ids = _ids(sdpa_lm, et_prompt)
    with torch.no_grad(), _patched(torch.nn.functional, "scaled_dot_product_attention") as calls:
        raw_sdpa.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=raw_sdpa.generation_config.eos_token_id)
    layer1 = calls[1::4]
    assert len(layer1) == 3
    with sdpa_lm.generate(et_prompt, max_new_tokens=3, remote=mode) as tracer:
        values = list().save()
        for step in tracer.iter[:]:
            values.append(sdpa_lm.transformer.h[1].attn.source.attention_interface_0.source.torch_nn_functional_scaled_dot_product_attention_0.output)
    assert len(values) == 3
    for got, want in zip(values, layer1):
        assert torch.equal(got, want)


def test_nested_source_first_built_at_a_later_step(tiny_gpt2_sdpa_path, raw_sdpa, et_prompt, mode):
    """Built at the op's third call (a fresh model), the nested op still counts steps as its op does."""
    lm = interlace.LanguageModel(str(tiny_gpt2_sdpa_path), dispatch=True)
    ids = _ids(lm, et_prompt)
    with torch.no_grad(), _patched(torch.nn.functional, "scaled_dot_product_attention") as calls:
        raw_sdpa.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=raw_sdpa.generation_config.eos_token_id)
    with lm.generate(et_prompt, max_new_tokens=3, remote=mode) as tracer:
        for step in tracer.iter[2]:
            only = lm.transformer.h[3].attn.source.attention_interface_0.source.torch_nn_functional_scaled_dot_product_attention_0.output.save()
    assert torch.equal(only, calls[2 * 4 + 3])


def test_nested_source_two_levels_deep_with_repeated_calls(tiny_llama_path, raw_llama, et_prompt, mode):
    """Llama's eager attention calls `repeat_kv` twice and `torch.matmul` twice: each call has
    its own name, and `.source` goes on into `repeat_kv` itself."""
    lm = interlace.LanguageModel(str(tiny_llama_path), dispatch=True)
    ids = _ids(lm, et_prompt)
    with torch.no_grad(), _patched(modeling_llama, "repeat_kv") as kv, _patched(torch, "matmul") as mm:
        truth = raw_llama(**ids).logits
    assert len(kv) == len(mm) == 4  # two layers, two calls of each per layer
    with lm.trace(et_prompt, remote=mode):
        inner = lm.model.layers[1].self_attn.source.attention_interface_0.source
        names = inner.operations.save()
        keys = inner.repeat_kv_0.output.save()
        values = inner.repeat_kv_1.source.hidden_states_reshape_0.output.save()
        scores = inner.torch_matmul_0.output.save()
        mixed = inner.torch_matmul_1.output.save()
        logits = lm.lm_head.output.save()
    assert {"repeat_kv_0", "repeat_kv_1", "torch_matmul_0", "torch_matmul_1"} <= set(names)
    assert torch.equal(keys, kv[2]) and torch.equal(values, kv[3])
    assert torch.equal(scores, mm[2]) and torch.equal(mixed, mm[3])
    assert torch.equal(logits, truth)


def test_nested_source_errors(feat_gpt2, et_prompt, mode):
    attn = feat_gpt2.transformer.h[0].attn
    with _raises(mode) as info:  # a module's call: its own `.source` is the way in
        with feat_gpt2.trace(et_prompt, remote=mode):
            attn.source.self_c_attn_1.source
    assert "model.transformer.h.0.attn.c_attn.source" in str(info.value)
    with _raises(mode) as info:  # a built-in has no source
        with feat_gpt2.trace(et_prompt, remote=mode):
            attn.source.attention_interface_0.source.torch_matmul_0.source
    assert "not a Python function" in str(info.value) and "torch_matmul_0.output" in str(info.value)
    with _raises(mode, OutOfOrderError) as info:  # the op has already run
        with feat_gpt2.trace(et_prompt, remote=mode):
            attn.source.attention_interface_0.output
            attn.source.attention_interface_0.source
    assert "attention_interface_0.source` was used after" in str(info.value)


def test_source_errors_outside_a_trace(feat_gpt2):
    src = feat_gpt2.transformer.h[0].attn.source
    with pytest.raises(AttributeError, match="Did you mean self_c_attn"):
        src.self_c_atn_1
    with pytest.raises(TracingError, match="inside a traced block"):
        src.self_c_attn_1.output
    with pytest.raises(TracingError, match=r"inside a traced block(.|\n)*attention_interface_0\.source\."):
        src.attention_interface_0.source


# -- rewriting plain modules (local: a custom module is not hosted on a server) -------------------


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


def test_super_and_module_helpers_survive_rewriting():
    torch.manual_seed(0)
    net = torch.nn.Sequential(Child(), Child())
    model = interlace.NNsight(net)
    x = torch.linspace(-1, 1, 8).view(2, 4)
    with torch.no_grad():
        expected = net(x)
        relu_truth = torch.relu(net[0].lin(x))
    src = model[0].source
    assert src.operations == ["self_lin_0", "torch_relu_0", "forward_0", "_double_0"]
    scale = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # a different factor per feature
    with model.trace(x):
        relu = model[0].source.torch_relu_0.output.save()
        model[0].source.torch_relu_0.output = relu * scale
        out = model.output.save()
    assert torch.equal(relu, relu_truth)
    with torch.no_grad():
        assert torch.equal(net(x), expected)  # outside traces the rewritten forward is the same
        assert torch.equal(out, net[1]((relu_truth * scale + 1) * 2))
    assert type(net[1]).forward is Child.forward  # the other instance is untouched


def test_source_ops_in_traces_of_an_edited_copy():
    net = torch.nn.Sequential(Child())
    model = interlace.NNsight(net)
    model[0].source
    with model.edit() as edited:
        model[0].lin.output[:] = 1.0
    x = torch.rand(1, 4)
    with edited.trace(x):
        relu = model[0].source.torch_relu_0.output.save()
    assert torch.equal(relu, torch.ones(1, 4))
    with model.trace(x):  # the original has no edit
        plain = model[0].source.torch_relu_0.output.save()
    with torch.no_grad():
        assert torch.equal(plain, torch.relu(net[0].lin(x)))
