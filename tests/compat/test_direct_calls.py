"""nnsight-behavior.md §1.4: calls that run the model directly, with no `with` block.

- `model.trace(x, trace=False)` prepares the input as a trace would and returns the forward's
  output;
- `out = model.generate(x, max_new_tokens=2)` (no `with` enters it) generates directly.
Truth: the plain Hugging Face module called on the same encoding (`model._module(**enc)`,
`model._module.generate(**enc, ...)`). Local only: remote runs need a `with` block, which is
checked (client-side, before anything is sent) for remote='local' and True.
"""

from __future__ import annotations

import pytest
import torch

import interlace
from interlace.errors import TracingError
from interlace.tracing.with_detection import enters_with

ET = "The Eiffel Tower is located in the city of"
MSG = "Madison Square Garden is located"


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def enc(model, prompts):
    return dict(model.tokenizer(prompts if isinstance(prompts, list) else [prompts], return_tensors="pt", padding=True))


@torch.no_grad()
def hf_generate(model, prompts, n):
    return model._module.generate(**enc(model, prompts), max_new_tokens=n, do_sample=False,
                                  pad_token_id=model.tokenizer.pad_token_id)


# --- trace=False --------------------------------------------------------------------------------

@torch.no_grad()
def test_trace_false_returns_forward_output(gpt2):
    out = gpt2.trace(ET, trace=False)
    assert type(out).__name__.endswith("CausalLMOutputWithCrossAttentions")
    assert torch.equal(out.logits, gpt2._module(**enc(gpt2, ET)).logits)


@torch.no_grad()
def test_trace_false_token_ids_and_model_kwargs(gpt2):
    ids = gpt2.tokenizer(ET, return_tensors="pt")["input_ids"]
    out = gpt2.trace(ids, trace=False, output_hidden_states=True)
    expected = gpt2._module(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert len(out.hidden_states) == len(expected.hidden_states)
    assert torch.equal(out.logits, expected.logits)


@torch.no_grad()
def test_trace_false_batch_prepared_as_a_trace(gpt2):
    # A padded batch: the same padding side, mask and positions as a trace of it.
    out = gpt2.trace([ET, MSG], trace=False)
    with gpt2.trace([ET, MSG]):
        traced = gpt2.output.logits.save()
    assert torch.equal(out.logits, traced)


def test_trace_false_dispatches_a_meta_model(tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    assert not model.dispatched
    with torch.no_grad():
        out = model.trace(ET, trace=False)
    assert model.dispatched
    with torch.no_grad():
        assert torch.equal(out.logits, model._module(**enc(model, ET)).logits)


def test_trace_false_on_plain_nnsight(tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)
    with torch.no_grad():
        assert torch.equal(model.trace(tiny_input, trace=False), tiny_mlp(tiny_input))


def test_trace_true_and_stored_tracer_still_trace(gpt2):
    tracer = gpt2.trace(ET, trace=True)
    with tracer:
        logits = gpt2.output.logits.save()
    with torch.no_grad():
        assert torch.equal(logits, gpt2._module(**enc(gpt2, ET)).logits)


@pytest.mark.parametrize("remote", ["local", True])
def test_trace_false_remote_needs_a_with_block(gpt2, remote):
    with pytest.raises(TracingError, match=r"Remote runs need a\s+`with` block[\s\S]*with model.trace\(x, remote=True\)"):
        gpt2.trace(ET, trace=False, remote=remote)


# --- generate without a with block --------------------------------------------------------------

def test_generate_without_with_calls_hf_generate(gpt2):
    out = gpt2.generate(ET, max_new_tokens=3, do_sample=False)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, hf_generate(gpt2, ET, 3))


def test_generate_without_with_batch_and_ids(gpt2):
    out = gpt2.generate([ET, MSG], max_new_tokens=2, do_sample=False)
    assert torch.equal(out, hf_generate(gpt2, [ET, MSG], 2))
    ids = gpt2.tokenizer(ET, return_tensors="pt")["input_ids"]
    assert torch.equal(gpt2.generate(ids, max_new_tokens=2, do_sample=False), hf_generate(gpt2, ET, 2))


def test_generate_without_with_result_used_inline(gpt2):
    # Not stored: indexed at once, as in `model.tokenizer.decode(model.generate(...)[0])`.
    text = gpt2.tokenizer.decode(gpt2.generate(ET, max_new_tokens=2, do_sample=False)[0])
    assert text == gpt2.tokenizer.decode(hf_generate(gpt2, ET, 2)[0])


def test_generate_without_with_dispatches_a_meta_model(tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    out = model.generate(ET, max_new_tokens=2, do_sample=False)
    assert model.dispatched
    assert torch.equal(out, hf_generate(model, ET, 2))


def test_generate_with_block_still_traces(gpt2):
    with gpt2.generate(ET, max_new_tokens=2, do_sample=False) as tracer:
        out = tracer.result.save()
    assert torch.equal(out, hf_generate(gpt2, ET, 2))
    tracer = gpt2.generate(ET, max_new_tokens=2, do_sample=False)  # stored, entered below
    assert not isinstance(tracer, torch.Tensor)
    with tracer:
        again = gpt2.generator.output.save()
    assert torch.equal(again, out)


def test_generate_inside_a_helper_that_returns_it(gpt2):
    def run(prompt):
        return gpt2.generate(prompt, max_new_tokens=2, do_sample=False)  # no with: direct

    assert torch.equal(run(ET), hf_generate(gpt2, ET, 2))


@pytest.mark.parametrize("remote", ["local", True])
def test_generate_without_with_remote_needs_a_with_block(gpt2, remote):
    with pytest.raises(TracingError, match=r"Remote runs need a\s+`with` block[\s\S]*with model.generate\("):
        gpt2.generate(ET, max_new_tokens=2, remote=remote)


def test_subclass_generate_override_is_looked_through(tiny_gpt2_path):
    class Mine(interlace.LanguageModel):
        def generate(self, *args, **kwargs):
            return super().generate(*args, **kwargs)

    model = Mine(str(tiny_gpt2_path), dispatch=True)
    assert torch.equal(model.generate(ET, max_new_tokens=2, do_sample=False), hf_generate(model, ET, 2))
    with model.generate(ET, max_new_tokens=2, do_sample=False) as tracer:
        out = tracer.result.save()
    assert torch.equal(out, hf_generate(model, ET, 2))


# --- the bytecode rule --------------------------------------------------------------------------

def test_enters_with_rule():
    import sys

    class Flag:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    result: list[bool] = []

    def call():
        result.append(enters_with(sys._getframe(1)))
        return Flag()

    with open(__file__) as _, call():  # the second item of a with
        pass
    kept = call()  # stored, entered later
    with kept:
        pass
    direct = call()  # stored, never entered
    [call()]  # an argument
    assert isinstance(direct, Flag)
    assert result == [True, True, False, False]
    assert enters_with(None) is True
