"""nnsight habits: `with tracer.iter[...]:` and `with tracer.all():` as blocks (the body runs
once per selected generation step, as the `for` loop's does), and an invoke's prepared
`.inputs`. In all three modes, against Hugging Face `generate` with `output_logits=True` and
raw forward hooks on the plain module (`feature_truth.py`)."""

from __future__ import annotations

import pytest
import torch

from feature_truth import PROMPT_A, PROMPT_B, hf_generate, hooks, n_tokens, on_call
from interlace.errors import TracingError

N = 4


def _counting(calls: list[int]):
    def hook(module, args, output):
        calls.append(1)

    return hook


def test_iter_block_runs_its_body_on_the_selected_steps(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.generate(PROMPT_A, max_new_tokens=N, remote=mode) as tracer:
        steps = list().save()
        logits = list().save()
        with tracer.iter[1:3] as step:
            steps.append(step)
            logits.append(lm.lm_head.output[:, -1].clone())
        ids = lm.generator.output.save()
    expected_ids, expected = hf_generate(lm, PROMPT_A, N)
    assert expected_ids.shape[1] == n_tokens(lm, PROMPT_A) + N  # no early EOS: every step ran
    assert torch.equal(ids, expected_ids)
    assert steps == [1, 2]
    assert len(logits) == 2
    for got, step in zip(logits, (1, 2)):
        torch.testing.assert_close(got, expected[step], rtol=0, atol=1e-5)


def test_all_block_runs_once_per_step_and_equals_the_for_loop(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.generate(PROMPT_A, max_new_tokens=N, remote=mode) as tracer:
        as_block = list().save()
        with tracer.all():
            as_block.append(lm.lm_head.output[:, -1].clone())
    with lm.generate(PROMPT_A, max_new_tokens=N, remote=mode) as tracer:
        as_loop = list().save()
        for _ in tracer.all():
            as_loop.append(lm.lm_head.output[:, -1].clone())
    calls: list[int] = []
    _, expected = hf_generate(lm, PROMPT_A, N, (lm._module.lm_head, _counting(calls)))
    assert len(as_block) == len(as_loop) == len(calls) == N  # the head ran N times, the body N times
    for block_value, loop_value, truth in zip(as_block, as_loop, expected):
        torch.testing.assert_close(block_value, truth, rtol=0, atol=1e-5)
        assert torch.equal(block_value, loop_value)


def test_an_edit_in_an_iter_block_changes_only_that_step(feat_gpt2, mode):
    lm = feat_gpt2
    direction = torch.linspace(-1, 1, 128)  # differs per feature, unlike zeroing
    with lm.generate(max_new_tokens=N, remote=mode) as tracer:
        with tracer.invoke(PROMPT_A):
            with tracer.iter[2]:
                lm.transformer.h[1].output[:, -1] += 8 * direction
        with tracer.invoke():  # the whole batch, every step (its own order of accesses)
            logits = list().save()
            with tracer.all():
                logits.append(lm.lm_head.output[:, -1].clone())
            ids = lm.generator.output.save()

    def shift(out):
        out = out.clone()
        out[:, -1] += 8 * direction
        return out

    expected_ids, expected = hf_generate(lm, PROMPT_A, N, (lm._module.transformer.h[1], on_call(2, shift)))
    _, clean = hf_generate(lm, PROMPT_A, N)
    assert torch.equal(ids, expected_ids)
    assert len(logits) == N
    for step in range(N):
        torch.testing.assert_close(logits[step], expected[step], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], clean[1], rtol=0, atol=1e-5)  # before the edit: unchanged
    assert not torch.allclose(logits[2], clean[2], atol=1e-3)  # the edited step changed


def test_iter_blocks_in_two_invokes_with_different_steps(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.generate(max_new_tokens=N, remote=mode) as tracer:
        with tracer.invoke(PROMPT_A):
            a = list().save()
            with tracer.iter[0:2]:
                a.append(lm.lm_head.output[:, -1].clone())
        with tracer.invoke(PROMPT_B):
            b = list().save()
            with tracer.iter[[1, 3]]:
                b.append(lm.lm_head.output[:, -1].clone())
    _, expected = hf_generate(lm, [PROMPT_A, PROMPT_B], N)
    assert len(a) == 2 and len(b) == 2
    for got, step in zip(a, (0, 1)):
        torch.testing.assert_close(got[0], expected[step][0], rtol=0, atol=1e-4)
    for got, step in zip(b, (1, 3)):
        torch.testing.assert_close(got[0], expected[step][1], rtol=0, atol=1e-4)


def test_invoke_exposes_its_prepared_inputs(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.trace(remote=mode) as tracer:
        with tracer.invoke(PROMPT_A) as first:
            a_ids = first.inputs[1]["input_ids"].save()
            a_mask = first.inputs[1]["attention_mask"].save()
            a_args = first.inputs[0].save()
        with tracer.invoke(PROMPT_B) as second:
            b_ids = second.inputs[1]["input_ids"].save()
            b_logits = lm.lm_head.output.save()
    expected_a = lm.tokenizer(PROMPT_A, return_tensors="pt")
    expected_b = lm.tokenizer(PROMPT_B, return_tensors="pt")
    # Each invoke's own tokens, unpadded (the batch pads A to B's length).
    assert torch.equal(a_ids, expected_a["input_ids"]) and torch.equal(a_mask, expected_a["attention_mask"])
    assert torch.equal(b_ids, expected_b["input_ids"])
    assert a_args == ()
    with torch.no_grad(), hooks():
        truth = lm._module(**expected_b).logits
    torch.testing.assert_close(b_logits, truth, rtol=0, atol=1e-5)


def test_iter_block_outside_a_running_model_is_an_error(feat_gpt2):
    with pytest.raises(TracingError, match=r"tracer.iter\[...\]"):
        with feat_gpt2.generate(max_new_tokens=2) as tracer:
            with tracer.iter[0]:
                pass
            with tracer.invoke(PROMPT_A):
                pass
