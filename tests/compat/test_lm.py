"""nnsight's `tests/test_lm.py` (GPT-2 `LanguageModel`), ported to Interlace and the tiny GPT-2.

Each test follows the nnsight test's code; the expected strings of the real GPT-2 are replaced by
an independent truth (the plain module under raw torch hooks, Hugging Face `generate`, or a
separate plain trace). Adaptations, marked where they occur:
- transformers 5.x: a GPT-2 block returns a plain tensor, so nnsight's `h[-1].output[0]` (the
  old tuple's first element) is `h[-1].output` here;
- the tiny model has 4 layers (nnsight's `h[5]`/`h[6]` become `h[2]`/`h[3]`) and width 128.
The `.source` and iteration groups live elsewhere (tests/compat, §5.9-5.11).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import interlace

ET = "The Eiffel Tower is located in the city of"
MSG = "Madison Square Garden is located in the city of"
BLANKS = "_ _ _ _ _ _ _ _ _"


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


# --- independent truths -------------------------------------------------------------------------

@contextmanager
def hooked(*pairs):
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def enc(model, prompts):
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = dict(model.tokenizer(texts, return_tensors="pt", padding=True))
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return out


@torch.no_grad()
def plain_logits(model, prompts, *pairs):
    with hooked(*pairs):
        return model._module(**enc(model, prompts)).logits


@torch.no_grad()
def hf_generate(model, prompt, n, *pairs):
    e = model.tokenizer([prompt], return_tensors="pt")
    with hooked(*pairs):
        return model._module.generate(**e, max_new_tokens=n, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)


def block(model, i):
    return model._module.transformer.h[i]


def zero_out(module, args, out):
    return torch.zeros_like(out)


# --- Generation ----------------------------------------------------------------------------------

def test_generation(gpt2, mode):
    with gpt2.generate(max_new_tokens=3, remote=mode) as generator:
        with generator.invoke(MSG):
            output = gpt2.generator.output.save()
    assert torch.equal(output, hf_generate(gpt2, MSG, 3))
    assert gpt2.tokenizer.decode(output[0]).startswith(gpt2.tokenizer.decode(gpt2.tokenizer(MSG)["input_ids"]))


def test_save_hidden_states(gpt2, mode):
    with gpt2.generate("Hello world", max_new_tokens=2, remote=mode):
        hs_input = gpt2.transformer.h[-1].input.save()
        hs = gpt2.transformer.h[-1].output.save()  # nnsight: .output[0] (tuple before transformers 5)
    assert isinstance(hs, torch.Tensor) and hs.ndim == 3
    assert isinstance(hs_input, torch.Tensor) and hs_input.ndim == 3


# --- Activation modification ---------------------------------------------------------------------

def test_inplace_modification(gpt2, mode):
    with gpt2.generate(max_new_tokens=3, remote=mode) as tracer:
        with tracer.invoke(MSG):
            pre = gpt2.transformer.h[-1].output.clone().save()
            gpt2.transformer.h[-1].output[:] = 0
            post = gpt2.transformer.h[-1].output.save()
            output = gpt2.generator.output.save()
    assert not (pre == 0).all().item()
    assert (post == 0).all().item()
    first_call = [0]

    def zero_first(m, a, o):
        first_call[0] += 1
        return torch.zeros_like(o) if first_call[0] == 1 else None

    assert torch.equal(output, hf_generate(gpt2, MSG, 3, (block(gpt2, -1), zero_first)))
    assert not torch.equal(output, hf_generate(gpt2, MSG, 3))


def test_multiplication_modification(gpt2, mode):
    with gpt2.generate(max_new_tokens=3, remote=mode) as generator:
        with generator.invoke(MSG):
            pre = gpt2.transformer.wte.output.clone().save()
            gpt2.transformer.wte.output = gpt2.transformer.wte.output * 0
            post = gpt2.transformer.wte.output.save()
            output = gpt2.generator.output.save()
    assert not (pre == 0).all().item()
    assert (post == 0).all().item()
    assert not torch.equal(output, hf_generate(gpt2, MSG, 3))


def test_cross_invoke_isolation(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(MSG):
            # nnsight: a tuple rebuilt around the zeroed first element
            gpt2.transformer.h[-1].output = torch.zeros_like(gpt2.transformer.h[-1].output)
            first = gpt2.lm_head.output.save()
        with tracer.invoke(MSG):
            hs = gpt2.transformer.h[-1].output.save()
            out = gpt2.lm_head.output[0][-1].argmax(dim=-1).save()
    assert torch.all(hs != 0)
    truth = plain_logits(gpt2, MSG)
    assert int(out) == int(truth[0, -1].argmax())
    torch.testing.assert_close(first, plain_logits(gpt2, MSG, (block(gpt2, -1), zero_out)), rtol=0, atol=1e-5)


def test_modification_after_requires_grad(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(MSG):
            gpt2.transformer.h[0].output.requires_grad_(True)
            gpt2.transformer.h[0].output = torch.zeros_like(gpt2.transformer.h[0].output)
            zeroed = gpt2.transformer.h[0].output.save()
        with tracer.invoke(MSG):
            hs = gpt2.transformer.h[0].output.save()
            out = gpt2.lm_head.output[0][-1].argmax(dim=-1).save()
    assert torch.all(zeroed == 0)
    assert torch.all(hs != 0)
    assert int(out) == int(plain_logits(gpt2, MSG)[0, -1].argmax())


# --- Ad-hoc modules ------------------------------------------------------------------------------

def test_logit_lens(gpt2, mode):
    with gpt2.generate(max_new_tokens=2, remote=mode) as generator:
        with generator.invoke("The Eiffel Tower is in the city of"):
            hidden_states = gpt2.transformer.h[-1].output
            hidden_states = gpt2.lm_head(gpt2.transformer.ln_f(hidden_states))
            tokens = torch.softmax(hidden_states, dim=2).argmax(dim=2).save()
    # h[-1] -> ln_f -> lm_head is the model's own head: the lens equals the prompt's logits.
    assert torch.equal(tokens, plain_logits(gpt2, "The Eiffel Tower is in the city of").argmax(dim=2))


# --- Embeddings ----------------------------------------------------------------------------------

def test_embedding_transfer_with_barrier(gpt2, mode):
    with gpt2.generate(max_new_tokens=3, remote=mode) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(MSG):
            embeddings = gpt2.transformer.wte.output
            barrier()
            output1 = gpt2.generator.output.save()
        with tracer.invoke(BLANKS):
            barrier()
            gpt2.transformer.wte.output = embeddings
            output2 = gpt2.generator.output.save()
    expected = hf_generate(gpt2, MSG, 3)
    assert torch.equal(output1, expected)
    # The blank prompt carries MSG's embeddings, so it continues as MSG does.
    assert output2[0, -3:].tolist() == expected[0, -3:].tolist()


def test_embedding_transfer_separate_traces(gpt2, mode):
    with gpt2.generate(max_new_tokens=3, remote=mode) as generator:
        with generator.invoke(MSG):
            embeddings = gpt2.transformer.wte.output.save()
            output = gpt2.generator.output.save()
    output1 = output
    with gpt2.generate(max_new_tokens=3, remote=mode) as generator:
        with generator.invoke(BLANKS):
            gpt2.transformer.wte.output = embeddings
            output = gpt2.generator.output.save()
    assert torch.equal(output1, hf_generate(gpt2, MSG, 3))
    assert output[0, -3:].tolist() == output1[0, -3:].tolist()


# --- Gradients -----------------------------------------------------------------------------------

def grad_truth(model, prompt, scale=1.0):
    """d(scale * logits.sum()) / d(h[-1] output), by torch.autograd.grad on the plain module."""
    seen = {}

    def keep(m, a, o):
        seen["h"] = o
    with hooked((block(model, -1), keep)):
        logits = model._module(**model.tokenizer(prompt, return_tensors="pt")).logits
    return torch.autograd.grad((logits * scale).sum(), seen["h"])[0]


def test_retain_grad(gpt2):
    # Local only: `.grad` is read on the saved tensor after the trace.
    with gpt2.trace() as tracer:
        with tracer.invoke("Hello World"):
            hidden_states = gpt2.transformer.h[-1].output.save()  # nnsight: .output[0]
            hidden_states.retain_grad()
            logits = gpt2.lm_head.output
            logits.sum().backward()
    assert hidden_states.grad is not None
    torch.testing.assert_close(hidden_states.grad, grad_truth(gpt2, "Hello World"))
    gpt2._module.zero_grad(set_to_none=True)


def test_plain_backward_statement_in_every_mode(gpt2, mode):
    with gpt2.trace("Hello World", remote=mode):
        hidden_states = gpt2.transformer.h[-1].output
        hidden_states.retain_grad()
        logits = gpt2.lm_head.output
        logits.sum().backward()
        grad = hidden_states.grad.save()
    torch.testing.assert_close(grad, grad_truth(gpt2, "Hello World"))
    gpt2._module.zero_grad(set_to_none=True)


def test_grad_access_and_modify(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke("Hello World"):
            hidden_states = gpt2.transformer.h[-1].output.save()
            logits = gpt2.lm_head.output.save()
            with logits.sum().backward():
                hidden_states_grad = hidden_states.grad.save()
                hidden_states_grad[:] = 0
    assert (hidden_states_grad == 0).all().item()

    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke("Hello World"):
            hidden_states = gpt2.transformer.h[-1].output
            logits = gpt2.lm_head.output
            with logits.sum().backward():
                grad = hidden_states.grad.clone()
                grad[:] = 0
                hidden_states.grad = grad
                hidden_states_2grad = hidden_states.grad.save()
    assert (hidden_states_2grad == 0).all().item()


def test_multi_backward(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke("Hello World"):
            hidden_states = gpt2.transformer.h[-1].output
            logits = gpt2.lm_head.output
            with logits.sum().backward(retain_graph=True):
                hidden_states_grad1 = hidden_states.grad.save()
            logits = logits * 2
            with logits.sum().backward():
                hidden_states_grad2 = hidden_states.grad.save()
    assert not torch.all(hidden_states_grad1.eq(hidden_states_grad2))
    torch.testing.assert_close(hidden_states_grad1, grad_truth(gpt2, "Hello World"))
    torch.testing.assert_close(hidden_states_grad2, grad_truth(gpt2, "Hello World", 2.0))


def test_external_tensors(gpt2, mode):
    device = next(gpt2.parameters()).device
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 128).to(device)  # nnsight: 768 (GPT-2's width)
    bias = torch.randn(128).to(device)

    def fun(x):
        return torch.nn.ReLU()(lin(x) - bias)

    with gpt2.trace("fish", remote=mode):
        x = gpt2.transformer.h[0].mlp.output
        y = fun(x)
        z = y.save()
        x_saved = x.save()
    with torch.no_grad():
        torch.testing.assert_close(z, torch.relu(lin(x_saved) - bias))


# --- Editing -------------------------------------------------------------------------------------

class One(torch.nn.Module):
    """nnsight.util.WrapperModule: returns its argument."""

    def forward(self, x):
        return x


class ComplexModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.one = One()

    def forward(self, x):
        return self.one(x)


@pytest.fixture
def fresh_gpt2(tiny_gpt2_path):
    """A model of its own: these tests attach modules and leave edits on it."""
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def test_edit_with_attachment(fresh_gpt2):
    gpt2 = fresh_gpt2
    l0 = gpt2.transformer.h[0]
    l0.attachment = ComplexModule()

    with gpt2.edit() as gpt2_edited:
        acts = l0.output  # nnsight: l0.output[0]
        l0.output[:] = l0.attachment(acts, hook=True)

    with gpt2.trace(MSG):
        original = l0.output.clone().save()
        l0.output[:] *= 0.0
        original_output = gpt2.output.logits.save()

    with gpt2_edited.trace(MSG):
        one = l0.attachment.one.output.clone().save()
        l0.attachment.output *= 0.0
        edited_output = gpt2_edited.output.logits.save()

    assert torch.equal(original, one)
    assert torch.equal(original_output, edited_output)


def test_non_inplace_editing(fresh_gpt2):
    gpt2 = fresh_gpt2
    with gpt2.edit(inplace=True):
        gpt2.transformer.h[1].output[:, 0] = 0
    with gpt2.edit() as gpt2_edited:
        gpt2_edited.transformer.h[1].output[:, 1] = 0
    with gpt2.trace(MSG):
        l1_out = gpt2.transformer.h[1].output.save()
    with gpt2_edited.trace(MSG):
        l1_out_edited = gpt2_edited.transformer.h[1].output.save()
    assert torch.all(l1_out[:, 0] == 0) and torch.all(l1_out[:, 1] != 0)
    assert torch.all(l1_out_edited[:, 0] == 0) and torch.all(l1_out_edited[:, 1] == 0)


def test_clear_edits(fresh_gpt2):
    gpt2 = fresh_gpt2
    with gpt2.edit(inplace=True):
        gpt2.transformer.h[1].output[:] = 0
    with gpt2.trace(MSG):
        l1_out = gpt2.transformer.h[1].output.save()
    gpt2.clear_edits()
    with gpt2.trace(MSG):
        l1_out_unedited = gpt2.transformer.h[1].output.save()
    assert torch.all(l1_out == 0)
    assert torch.all(l1_out_unedited != 0)


def test_batched_editing(fresh_gpt2):
    gpt2 = fresh_gpt2
    l0 = gpt2.transformer.h[0]
    l0.attachment = ComplexModule()
    with gpt2.edit() as gpt2_edited:
        acts = l0.output
        l0.output[:] = l0.attachment(acts, hook=True)
    with gpt2_edited.trace(["a", "b"]):
        edited = l0.attachment.output.save()
    assert edited.shape[0] == 2


# --- Conditionals and input setting in sessions ---------------------------------------------------

def test_conditional_intervention(gpt2, mode):
    with gpt2.session(remote=mode):
        with gpt2.trace("Hello World"):
            if torch.all(gpt2.transformer.h[2].output < 100000):  # nnsight: h[5].output[0]
                gpt2.transformer.h[-1].output[:] = 0
            output = gpt2.transformer.h[-1].output.save()
    assert torch.all(output == 0)


def test_input_setting(gpt2, mode):
    with gpt2.session(remote=mode):
        with gpt2.trace(MSG):
            hs = gpt2.transformer.h[3].inputs  # nnsight: h[6]
            tokens_out_1 = gpt2.lm_head.output.argmax(dim=-1).save()
        with gpt2.trace(MSG):
            gpt2.transformer.h[3].input = hs[0][0]
            tokens_out_2 = gpt2.lm_head.output.argmax(dim=-1).save()
    assert gpt2.tokenizer.decode(tokens_out_1[0][-1]) == gpt2.tokenizer.decode(tokens_out_2[0][-1])
    assert torch.equal(tokens_out_1, plain_logits(gpt2, MSG).argmax(dim=-1))


# --- Invoker batching ----------------------------------------------------------------------------

def test_invoker_group_batching(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(ET):
            out_1 = gpt2.lm_head.output[:, -1].save()
        with tracer.invoke([MSG, ET]):
            out_2 = gpt2.lm_head.output[:, -1].save()
        with tracer.invoke():
            out_3 = gpt2.lm_head.output[:, -1].save()
        with tracer.invoke():
            out_4 = gpt2.lm_head.output[:, -1].save()
        with tracer.invoke(MSG):
            out_5 = gpt2.lm_head.output[:, -1].save()
    assert [o.shape[0] for o in (out_1, out_2, out_3, out_4, out_5)] == [1, 2, 4, 4, 1]
    torch.testing.assert_close(out_1, out_2[1].unsqueeze(0), rtol=0, atol=1e-5)
    assert torch.equal(out_3, out_4)
    assert torch.equal(torch.concatenate([out_1, out_2, out_5]), out_3)
    torch.testing.assert_close(out_3, plain_logits(gpt2, [ET, MSG, ET, MSG])[:, -1], rtol=0, atol=1e-5)


SHORT, MID, LONG = "Hello", "The Eiffel Tower is", "Madison Square Garden is located in the city of"


@pytest.mark.parametrize("groups", [
    [[SHORT, LONG], [MID]],
    [[MID], [LONG, SHORT]],
    [[LONG], [SHORT], [MID]],
], ids=["list-then-one", "one-then-list", "three-singles"])
def test_attention_mask_across_invokes(gpt2, mode, groups):
    prompts = [p for group in groups for p in group]
    with gpt2.trace(prompts, remote=mode):
        whole = gpt2.lm_head.output.save()
    with gpt2.trace(remote=mode) as tracer:
        parts = interlace.save([])
        for group in groups:
            with tracer.invoke(group if len(group) > 1 else group[0]):
                parts.append(gpt2.lm_head.output)
    torch.testing.assert_close(torch.cat(list(parts)), whole, rtol=0, atol=1e-5)
    # Each real (unpadded) row equals that prompt alone.
    for row, prompt in enumerate(prompts):
        n = len(gpt2.tokenizer(prompt)["input_ids"])
        torch.testing.assert_close(whole[row, -n:], plain_logits(gpt2, prompt)[0], rtol=0, atol=1e-4)


def test_invoker_inputs_are_readable(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(MSG) as invoker:
            ids = invoker.inputs[1]["input_ids"].save()
            out = gpt2.lm_head.output.save()
    assert ids.tolist() == [gpt2.tokenizer(MSG)["input_ids"]]
    assert out.shape[1] == ids.shape[1]


def test_token_id_tensor_inputs_batch(gpt2, mode):
    a = torch.tensor(gpt2.tokenizer(ET)["input_ids"])
    b = torch.tensor([gpt2.tokenizer(SHORT)["input_ids"]])
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(a):  # 1-D: one row
            out_a = gpt2.lm_head.output.save()
        with tracer.invoke(b):
            out_b = gpt2.lm_head.output.save()
    assert out_a.shape[0] == 1 and out_b.shape[0] == 1
    torch.testing.assert_close(out_a, plain_logits(gpt2, ET), rtol=0, atol=1e-5)
    torch.testing.assert_close(out_b[:, -b.shape[1]:], plain_logits(gpt2, SHORT), rtol=0, atol=1e-4)


# --- Scan ----------------------------------------------------------------------------------------

def test_basic_scan(gpt2):
    n = len(gpt2.tokenizer(MSG)["input_ids"])
    with gpt2.scan(MSG):
        attn_input = gpt2.transformer.h[0].attn.input.save()
        attn_output = gpt2.transformer.h[0].attn.output[0].save()
    assert isinstance(attn_input, torch._subclasses.fake_tensor.FakeTensor)
    assert isinstance(attn_output, torch._subclasses.fake_tensor.FakeTensor)
    assert attn_input.shape == (1, n, 128)
    assert attn_output.shape == (1, n, 128)
    assert gpt2.transformer.h[1].output.shape == (1, n, 128)  # nnsight: .output[0].shape


def test_scan_with_intervention(gpt2):
    n = len(gpt2.tokenizer(MSG)["input_ids"])
    with gpt2.scan(MSG):
        gpt2.transformer.h[0].mlp.c_proj.output = torch.ones(1, 1, 128).to(gpt2.device)
        out = gpt2.transformer.h[0].mlp.c_proj.output.save()
    assert out.shape == (1, 1, 128)
    assert gpt2.transformer.h[1].output.shape == (1, n, 128)


def test_scan_undispatched(tiny_gpt2_path):
    n = len(interlace.LanguageModel(str(tiny_gpt2_path)).tokenizer(MSG)["input_ids"])
    gpt2_undispatched = interlace.LanguageModel(str(tiny_gpt2_path))
    with gpt2_undispatched.scan(MSG):
        pass
    assert gpt2_undispatched.dispatched is False
    assert gpt2_undispatched.transformer.h[1].output.shape == (1, n, 128)


# --- Order ---------------------------------------------------------------------------------------
# nnsight raises Mediator.OutOfOrderError (a MissedProviderError); Interlace raises it at the line.

def test_out_of_order_error(gpt2, raises_in_mode, mode):
    with raises_in_mode(interlace.OutOfOrderError, "h.1"):
        with gpt2.trace("_", remote=mode):
            out = gpt2.transformer.h[2].output.save()
            out_2 = gpt2.transformer.h[1].inputs.save()


def test_out_of_order_skip(gpt2, raises_in_mode, mode):
    with raises_in_mode(interlace.OutOfOrderError, "h.1"):
        with gpt2.trace("_", remote=mode):
            gpt2.transformer.h[1].skip(gpt2.transformer.h[0].output)
            gpt2.transformer.h[1].input[:] = 0


def test_out_of_order_skip_2(gpt2, raises_in_mode, mode):
    with raises_in_mode(interlace.OutOfOrderError, "h.0"):
        with gpt2.trace("_", remote=mode):
            inp = gpt2.transformer.h[0].output.save()
            gpt2.transformer.h[1].skip(inp)
            gpt2.transformer.h[0].skip(inp)
