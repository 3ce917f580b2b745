"""Generation under a trace, in every mode: the tokens and per-step logits of Hugging Face's own
`generate`, step access (`tracer.iter`, `tracer.all()`, `.next()`) and edits at one step.

The truth is `feature_truth.hf_generate`: HF `generate` on the plain module with
`output_logits=True`, and raw forward hooks that edit only call number k where a test edits
step k. Two prompts of different lengths (left-padded) show a row edited in the wrong invoke.
"""

from __future__ import annotations

import pytest
import torch

import interlace
from feature_truth import PROMPT_A, PROMPT_B, hf_generate, n_tokens, on_call
from interlace.errors import GenerationEndedWarning, TracingError

N = 5
TOL = 1e-5


def assert_steps_close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=lambda m, s=step: f"step {s}: {m}")


def test_greedy_generation_matches_hf(feat_gpt2, mode):
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=8, do_sample=False, remote=mode) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(feat_gpt2.lm_head.output[:, -1].clone())
        out = feat_gpt2.generator.output.save()
    ids, expected = hf_generate(feat_gpt2, PROMPT_A, 8)
    assert torch.equal(out, ids)
    assert_steps_close(logits, expected)


def test_batched_generation_with_padding_matches_hf(feat_gpt2, mode):
    with feat_gpt2.generate(max_new_tokens=6, remote=mode) as tracer:
        with tracer.invoke(PROMPT_A):
            mine = list().save()
            for step in tracer.iter[:]:
                mine.append(feat_gpt2.lm_head.output[:, -1].clone())
        with tracer.invoke(PROMPT_B):
            pass
        with tracer.invoke():
            out = feat_gpt2.generator.output.save()
    ids, expected = hf_generate(feat_gpt2, [PROMPT_A, PROMPT_B], 6)
    assert torch.equal(out, ids)
    assert_steps_close(mine, [step[:1] for step in expected])  # invoke 0 sees its row only


def test_generation_kwargs_reach_generate(feat_gpt2, mode):
    kwargs = dict(max_new_tokens=6, no_repeat_ngram_size=1, repetition_penalty=1.5)
    with feat_gpt2.generate(PROMPT_A, remote=mode, **kwargs):
        out = feat_gpt2.generator.output.save()
    n = kwargs.pop("max_new_tokens")
    expected, _ = hf_generate(feat_gpt2, PROMPT_A, n, **kwargs)
    assert torch.equal(out, expected)
    plain, _ = hf_generate(feat_gpt2, PROMPT_A, n)
    assert not torch.equal(out, plain)  # the options changed something


def test_edit_at_step_k_changes_that_step_and_later_ones_of_its_row_only(feat_gpt2, mode):
    with feat_gpt2.generate(max_new_tokens=N, remote=mode) as tracer:
        with tracer.invoke(PROMPT_A):
            for _ in tracer.iter[2]:
                feat_gpt2.transformer.h[0].output[:] *= 0.5
        with tracer.invoke(PROMPT_B):
            pass
        with tracer.invoke():
            logits = list().save()
            for step in tracer.iter[:]:
                logits.append(feat_gpt2.lm_head.output[:, -1].clone())
            out = feat_gpt2.generator.output.save()

    def half_row_0(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[0] *= 0.5
        return output

    ids, expected = hf_generate(feat_gpt2, [PROMPT_A, PROMPT_B], N,
                                (feat_gpt2._module.transformer.h[0], on_call(2, half_row_0)))
    assert torch.equal(out, ids)
    assert_steps_close(logits, expected)
    # The truth itself: steps 0-1 as without the edit; from step 2 on row 0 differs (the edited
    # position stays in the cache), row 1 never does.
    _, clean = hf_generate(feat_gpt2, [PROMPT_A, PROMPT_B], N)
    assert all(torch.equal(expected[s], clean[s]) for s in (0, 1))
    assert all(not torch.allclose(expected[s][0], clean[s][0], atol=1e-3) for s in range(2, N))
    assert all(torch.allclose(expected[s][1], clean[s][1], atol=TOL) for s in range(N))


def test_iter_slice_list_all_and_next(feat_gpt2, mode):
    _, base = hf_generate(feat_gpt2, PROMPT_A, N)
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=N, remote=mode) as tracer:
        sliced = list().save()
        seen = list().save()
        for step in tracer.iter[0:3]:
            seen.append(step)
            sliced.append(feat_gpt2.lm_head.output[:, -1].clone())
    assert seen == [0, 1, 2]
    assert_steps_close(sliced, base[:3])

    with feat_gpt2.generate(PROMPT_A, max_new_tokens=N, remote=mode) as tracer:
        picked = list().save()
        for step in tracer.iter[[3, 1]]:  # sorted: steps run in order
            picked.append((step, feat_gpt2.lm_head.output[:, -1].clone()))
    assert [s for s, _ in picked] == [1, 3]
    assert_steps_close([v for _, v in picked], [base[1], base[3]])

    with feat_gpt2.generate(PROMPT_A, max_new_tokens=N, remote=mode) as tracer:
        every = list().save()
        for step in tracer.all():
            every.append(feat_gpt2.lm_head.output[:, -1].clone())
    assert_steps_close(every, base)

    with feat_gpt2.generate(PROMPT_A, max_new_tokens=N, remote=mode):
        first = feat_gpt2.lm_head.output[:, -1].clone().save()
        second = feat_gpt2.lm_head.next().output[:, -1].clone().save()
    assert_steps_close([first, second], base[:2])


def test_iter_all_is_bounded_and_code_after_the_loop_runs(feat_gpt2, mode):
    n = n_tokens(feat_gpt2, PROMPT_A)
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=3, remote=mode) as tracer:
        steps = list().save()
        for step in tracer.iter[:]:
            steps.append(feat_gpt2.transformer.h[0].output.shape[1])
        out = feat_gpt2.generator.output.save()
    assert steps == [n, 1, 1]  # the prompt, then one new token per step
    assert torch.equal(out, hf_generate(feat_gpt2, PROMPT_A, 3)[0])


def test_stop_inside_a_step_loop_ends_generation_keeping_saved_values(feat_gpt2, mode):
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=N, remote=mode) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(feat_gpt2.lm_head.output[:, -1].clone())
            if step == 1:
                tracer.stop()
        after = list().save()  # not reached
    assert_steps_close(logits, hf_generate(feat_gpt2, PROMPT_A, N)[1][:2])
    with pytest.raises(UnboundLocalError, match="after"):  # saved but not reached: unbound, as in nnsight
        len(after)


def test_generate_sees_the_models_real_signature(feat_gpt2, mode):
    # Hugging Face reads `inspect.signature(model.forward)` to pass `logits_to_keep=1` (and
    # position ids): with the engine's wrappers in place it must still see the real one.
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=2, remote=mode):
        keep = interlace.save(feat_gpt2.inputs[1].get("logits_to_keep"))
        first = feat_gpt2.lm_head.output.save()
    assert keep == 1
    torch.testing.assert_close(first[:, 0], hf_generate(feat_gpt2, PROMPT_A, 2)[1][0], rtol=0, atol=TOL)


def test_the_whole_input_kwargs_stay_local(feat_gpt2):
    # Locally the prepared kwargs (a DynamicCache among them) can be saved as they are.
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=2):
        kwargs = feat_gpt2.inputs[1]
        kwargs.save()
    assert kwargs.get("logits_to_keep") == 1 and "input_ids" in kwargs


def test_early_eos_keeps_saved_values_and_warns(feat_gpt2, mode):
    eos = feat_gpt2._module.generation_config.eos_token_id
    with pytest.warns(GenerationEndedWarning, match="Values saved so far are kept"):
        with feat_gpt2.generate(max_new_tokens=6, remote=mode) as tracer:
            with tracer.invoke(PROMPT_A):
                logits = list().save()
                for step in tracer.iter[:]:
                    out = feat_gpt2.lm_head.output
                    if step == 1:
                        out[:, -1, eos] = 1e9  # greedy picks EOS: generation ends after 2 tokens
                    logits.append(out[:, -1].clone())
                after_loop = list().save()  # not reached: the loop waited for step 2
            with tracer.invoke():
                ids = feat_gpt2.generator.output.save()

    def force_eos(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, -1, eos] = 1e9
        return output

    expected_ids, expected = hf_generate(feat_gpt2, PROMPT_A, 6, (feat_gpt2._module.lm_head, on_call(1, force_eos)))
    assert torch.equal(ids, expected_ids) and int(ids[0, -1]) == eos
    assert ids.shape[1] == n_tokens(feat_gpt2, PROMPT_A) + 2
    assert_steps_close(logits, expected)
    with pytest.raises(UnboundLocalError, match="after_loop"):  # saved but not reached: unbound, as in nnsight
        len(after_loop)


def test_streamer_fires_once_per_new_token(feat_gpt2, mode):
    streamer_module = feat_gpt2._extra_modules["generator"].streamer
    calls = []
    handle = streamer_module.register_forward_hook(lambda m, a, o: calls.append(o.clone()))
    try:
        with feat_gpt2.generate(PROMPT_A, max_new_tokens=4, remote=mode) as tracer:
            tokens = list().save()
            for step in tracer.iter[:]:
                tokens.append(feat_gpt2.generator.streamer.output.clone())
            out = feat_gpt2.generator.output.save()
    finally:
        handle.remove()
    if mode is not True:  # (a server runs its own streamer module)
        assert len(calls) == 4
    assert len(tokens) == 4
    assert torch.equal(out, hf_generate(feat_gpt2, PROMPT_A, 4)[0])
    assert torch.equal(torch.cat(tokens, dim=1), out[:, -4:])


def test_a_users_streamer_gets_every_token_when_the_body_runs_inline(feat_gpt2):
    """An inline body that does not read the streamer module leaves it out of `generate`;
    the user's own streamer is still called as Hugging Face calls it. (Local only: a remote
    run gets a copy of the streamer object; streaming back is the hybrid-execution issue.)"""

    class Collect:
        def __init__(self):
            self.puts = []
            self.ended = False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    mine = Collect()
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=3, streamer=mine) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(feat_gpt2.lm_head.output)
        out = feat_gpt2.generator.output.save()
    assert mine.ended and len(mine.puts) == 4 and len(logits) == 3  # the prompt, then each token
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in mine.puts[1:]], 1), out[:, -3:])


def test_streamer_read_only_at_a_later_step_is_that_steps_token(feat_gpt2, mode):
    # Until a body waits on the streamer, tokens only advance its call counters.
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=4, remote=mode) as tracer:
        for step in tracer.iter[2]:
            token = feat_gpt2.generator.streamer.output.save()
    ids, _ = hf_generate(feat_gpt2, PROMPT_A, 4)
    assert torch.equal(token, ids[:, -2:-1])


def test_max_length_alone_is_ambiguous_and_must_be_explicit(feat_gpt2, mode, raises_in_mode):
    # nnsight sends it to the tokenizer silently, so `generate(max_length=6)` never caps
    # generation there: Interlace asks which one is meant.
    with raises_in_mode(TracingError, match="tokenizer_kwargs"):
        with feat_gpt2.generate(PROMPT_A, max_new_tokens=2, remote=mode, max_length=4):
            pass
    with raises_in_mode(TracingError, match="tokenizer_kwargs"):
        with feat_gpt2.trace(PROMPT_A, remote=mode, max_length=4):
            pass


def test_tokenizer_options_go_to_the_tokenizer_as_in_nnsight(feat_gpt2, mode):
    # Options that can only be the tokenizer's reach it (with `truncation`, `max_length` is
    # the tokenizer's length too), in every mode.
    with feat_gpt2.trace(PROMPT_A, remote=mode, add_special_tokens=False, truncation=True, max_length=4, padding=True):
        logits = feat_gpt2.lm_head.output.save()
    enc = feat_gpt2.tokenizer(PROMPT_A, add_special_tokens=False, truncation=True, max_length=4, return_tensors="pt")
    with torch.no_grad():
        expected = feat_gpt2._module(**enc).logits
    assert n_tokens(feat_gpt2, PROMPT_A) > 4 and torch.allclose(logits, expected, atol=1e-6)


def test_tokenizer_option_at_trace_level_with_invokes_is_rejected(feat_gpt2, mode, raises_in_mode):
    with raises_in_mode(TracingError, match="max_new_tokens"):
        with feat_gpt2.generate(max_new_tokens=2, max_length=4, remote=mode) as tracer:
            with tracer.invoke(PROMPT_A):
                pass


def test_verbose_is_not_swallowed(feat_gpt2):
    # `verbose` is the remote status display's option: a local run refuses it instead of
    # ignoring it; the tokenizer's own `verbose` goes in tokenizer_kwargs.
    with pytest.raises(TypeError, match="remote"):
        with feat_gpt2.generate(PROMPT_A, max_new_tokens=2, verbose=False):
            pass
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=2, tokenizer_kwargs={"verbose": False}):
        out = feat_gpt2.generator.output.save()
    assert torch.equal(out, hf_generate(feat_gpt2, PROMPT_A, 2)[0])


def test_tokenizer_kwargs_go_to_the_tokenizer(feat_gpt2, mode):
    with feat_gpt2.generate(PROMPT_A, max_new_tokens=2, tokenizer_kwargs={"truncation": True, "max_length": 4}, remote=mode):
        out = feat_gpt2.generator.output.save()
    enc = feat_gpt2.tokenizer(PROMPT_A, truncation=True, max_length=4, return_tensors="pt")
    with torch.no_grad():
        expected = feat_gpt2._module.generate(**enc, max_new_tokens=2, do_sample=False,
                                              pad_token_id=feat_gpt2.tokenizer.pad_token_id)
    assert n_tokens(feat_gpt2, PROMPT_A) > 4 and expected.shape[1] == 4 + 2
    assert torch.equal(out, expected)


# `model.generate(...)` without `max_new_tokens` follows the generation config as Hugging
# Face does: tests/features/test_feat_generation_defaults.py.
