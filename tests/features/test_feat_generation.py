"""Generation under a trace: same tokens as plain HF generate, per-step access and edits."""

from __future__ import annotations

import warnings

import pytest
import torch

from interlace.errors import GenerationEndedWarning, TracingError

N = 5


def hf_generate(model, prompts, **kwargs):
    tok = model.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    kwargs.setdefault("pad_token_id", tok.pad_token_id)
    return model._module.generate(**enc, **kwargs)


def baseline_logits(model, prompt, n=N):
    with model.generate(prompt, max_new_tokens=n) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(model.lm_head.output[:, -1].clone())
    return logits


def test_greedy_generation_matches_hf(feat_gpt2, et_prompt):
    with feat_gpt2.generate(et_prompt, max_new_tokens=8, do_sample=False):
        out = feat_gpt2.generator.output.save()
    assert torch.equal(out, hf_generate(feat_gpt2, [et_prompt], max_new_tokens=8, do_sample=False))


def test_batched_generation_with_padding_matches_hf(feat_gpt2, et_prompt, msg_prompt):
    with feat_gpt2.generate(max_new_tokens=6) as tracer:
        with tracer.invoke(et_prompt):
            pass
        with tracer.invoke(msg_prompt):
            pass
        with tracer.invoke():
            out = feat_gpt2.generator.output.save()
    assert torch.equal(out, hf_generate(feat_gpt2, [et_prompt, msg_prompt], max_new_tokens=6))


def test_generation_kwargs_reach_generate(feat_gpt2, et_prompt):
    kwargs = dict(max_new_tokens=6, no_repeat_ngram_size=1, repetition_penalty=1.5)
    with feat_gpt2.generate(et_prompt, **kwargs):
        out = feat_gpt2.generator.output.save()
    expected = hf_generate(feat_gpt2, [et_prompt], **kwargs)
    assert torch.equal(out, expected)
    plain = hf_generate(feat_gpt2, [et_prompt], max_new_tokens=6)
    assert not torch.equal(out, plain)  # the options changed something


def test_edit_at_step_k_leaves_earlier_steps_unchanged(feat_gpt2, et_prompt):
    base = baseline_logits(feat_gpt2, et_prompt)
    with feat_gpt2.generate(max_new_tokens=N) as tracer:
        with tracer.invoke(et_prompt):
            for _ in tracer.iter[2]:
                feat_gpt2.transformer.h[0].output[:] = 0
        with tracer.invoke():
            logits = list().save()
            for step in tracer.iter[:]:
                logits.append(feat_gpt2.lm_head.output[:, -1].clone())
    assert len(logits) == N
    assert torch.equal(logits[0], base[0]) and torch.equal(logits[1], base[1])
    assert not torch.allclose(logits[2], base[2])


def test_iter_slice_list_all_and_next(feat_gpt2, et_prompt):
    base = baseline_logits(feat_gpt2, et_prompt)
    with feat_gpt2.generate(et_prompt, max_new_tokens=N) as tracer:
        sliced = list().save()
        seen = list().save()
        for step in tracer.iter[0:3]:
            seen.append(step)
            sliced.append(feat_gpt2.lm_head.output[:, -1].clone())
    assert seen == [0, 1, 2] and all(torch.equal(a, b) for a, b in zip(sliced, base[:3]))

    with feat_gpt2.generate(et_prompt, max_new_tokens=N) as tracer:
        picked = list().save()
        for step in tracer.iter[[2, 0]]:  # sorted: steps run in order
            picked.append((step, feat_gpt2.lm_head.output[:, -1].clone()))
    assert [s for s, _ in picked] == [0, 2]
    assert torch.equal(picked[0][1], base[0]) and torch.equal(picked[1][1], base[2])

    with feat_gpt2.generate(et_prompt, max_new_tokens=N) as tracer:
        every = list().save()
        for step in tracer.all():
            every.append(feat_gpt2.lm_head.output[:, -1].clone())
    assert len(every) == N and all(torch.equal(a, b) for a, b in zip(every, base))

    with feat_gpt2.generate(et_prompt, max_new_tokens=N):
        first = feat_gpt2.lm_head.output[:, -1].clone().save()
        second = feat_gpt2.lm_head.next().output[:, -1].clone().save()
    assert torch.equal(first, base[0]) and torch.equal(second, base[1])


def test_iter_all_is_bounded_and_code_after_the_loop_runs(feat_gpt2, et_prompt):
    n = len(feat_gpt2.tokenizer(et_prompt)["input_ids"])
    with feat_gpt2.generate(et_prompt, max_new_tokens=3) as tracer:
        steps = list().save()
        for step in tracer.iter[:]:
            steps.append(feat_gpt2.transformer.h[0].output.shape[1])
        out = feat_gpt2.generator.output.save()
    assert steps == [n, 1, 1]  # the prompt, then one new token per step
    assert out.shape[1] == n + 3


def test_generate_sees_the_models_real_signature(feat_gpt2, et_prompt):
    # Hugging Face reads `inspect.signature(model.forward)` to pass `logits_to_keep=1` (and
    # position ids): with the engine's wrappers in place it must still see the real one.
    with feat_gpt2.generate(et_prompt, max_new_tokens=2) as tracer:
        kwargs = feat_gpt2.inputs[1]
        kwargs.save()
        first = feat_gpt2.lm_head.output.save()
    assert first.shape[1] == 1
    assert kwargs.get("logits_to_keep") == 1


def test_early_eos_keeps_saved_values_and_warns(feat_gpt2, et_prompt):
    eos = feat_gpt2._module.generation_config.eos_token_id
    with pytest.warns(GenerationEndedWarning, match="Values saved so far are kept"):
        with feat_gpt2.generate(max_new_tokens=6) as tracer:
            with tracer.invoke(et_prompt):
                logits = list().save()
                for step in tracer.iter[:]:
                    out = feat_gpt2.lm_head.output
                    if step == 1:
                        out[:, -1, eos] = 1e9  # greedy picks EOS: generation ends after 2 tokens
                    logits.append(out[:, -1].clone())
                after_loop = list().save()  # not reached: the loop waited for step 2
            with tracer.invoke():
                ids = feat_gpt2.generator.output.save()
    assert len(logits) == 2
    assert "after_loop" not in locals()
    assert ids.shape[1] == feat_gpt2.tokenizer(et_prompt, return_tensors="pt")["input_ids"].shape[1] + 2
    assert int(ids[0, -1]) == eos


def test_streamer_fires_once_per_new_token(feat_gpt2, et_prompt):
    streamer_module = feat_gpt2._extra_modules["generator"].streamer
    calls = []
    handle = streamer_module.register_forward_hook(lambda m, a, o: calls.append(o.clone()))
    try:
        with feat_gpt2.generate(et_prompt, max_new_tokens=4) as tracer:
            tokens = list().save()
            for step in tracer.iter[:]:
                tokens.append(feat_gpt2.generator.streamer.output.clone())
            out = feat_gpt2.generator.output.save()
    finally:
        handle.remove()
    assert len(calls) == 4 and len(tokens) == 4
    assert torch.equal(torch.cat(tokens, dim=1), out[:, -4:])


def test_a_users_streamer_gets_every_token_when_the_body_runs_inline(feat_gpt2, et_prompt):
    """An inline body that does not read the streamer module leaves it out of `generate`;
    the user's own streamer is still called as Hugging Face calls it."""

    class Collect:
        def __init__(self):
            self.puts = []
            self.ended = False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    mine = Collect()
    with feat_gpt2.generate(et_prompt, max_new_tokens=3, streamer=mine) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(feat_gpt2.lm_head.output)
        out = feat_gpt2.generator.output.save()
    assert mine.ended and len(mine.puts) == 4 and len(logits) == 3  # the prompt, then each token
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in mine.puts[1:]], 1), out[:, -3:])


def test_streamer_read_only_at_a_later_step_is_that_steps_token(feat_gpt2, et_prompt):
    # Until a body waits on the streamer, tokens only advance its call counters.
    with feat_gpt2.generate(et_prompt, max_new_tokens=4) as tracer:
        for step in tracer.iter[2]:
            token = feat_gpt2.generator.streamer.output.save()
        out = feat_gpt2.generator.output.save()
    assert torch.equal(token, out[:, -2:-1])


@pytest.mark.parametrize("option", ["max_length", "padding", "truncation"])
def test_tokenizer_options_must_be_explicit(feat_gpt2, et_prompt, option):
    value = {"max_length": 4, "padding": True, "truncation": True}[option]
    with pytest.raises(TracingError, match="tokenizer_kwargs"):
        with feat_gpt2.generate(et_prompt, max_new_tokens=2, **{option: value}):
            pass
    with pytest.raises(TracingError, match="tokenizer_kwargs"):
        with feat_gpt2.trace(et_prompt, **{option: value}):
            pass


def test_tokenizer_option_at_trace_level_with_invokes_is_rejected(feat_gpt2, et_prompt):
    with pytest.raises(TracingError, match="max_new_tokens"):
        with feat_gpt2.generate(max_new_tokens=2, max_length=4) as tracer:
            with tracer.invoke(et_prompt):
                pass


def test_verbose_is_not_swallowed(feat_gpt2, et_prompt):
    # `verbose` is the remote status display's option: a local run refuses it instead of
    # ignoring it; the tokenizer's own `verbose` goes in tokenizer_kwargs.
    with pytest.raises(TypeError, match="remote"):
        with feat_gpt2.generate(et_prompt, max_new_tokens=2, verbose=False):
            pass
    with feat_gpt2.generate(et_prompt, max_new_tokens=2, tokenizer_kwargs={"verbose": False}):
        out = feat_gpt2.generator.output.save()
    assert out.shape[0] == 1


def test_tokenizer_kwargs_go_to_the_tokenizer(feat_gpt2, et_prompt):
    n = len(feat_gpt2.tokenizer(et_prompt)["input_ids"])
    with feat_gpt2.generate(et_prompt, max_new_tokens=2, tokenizer_kwargs={"truncation": True, "max_length": 4}):
        out = feat_gpt2.generator.output.save()
    assert n > 4 and out.shape[1] == 4 + 2


def test_generate_needs_max_new_tokens(tiny_gpt2_path, et_prompt):
    import interlace

    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    with pytest.raises(TracingError, match="max_new_tokens"):
        with model.generate(et_prompt):
            pass
