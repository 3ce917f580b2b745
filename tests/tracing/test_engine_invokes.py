"""Invokes batch into one forward; each sees its rows; barriers; `tracer.stop()`."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import interlace
from engine_helpers import encode, hidden, hooks, layers

PROMPTS = ["The Eiffel Tower is in the city of", "Hello", ["x y", "Madison Square Garden is located in the city of"]]
SAME_LENGTH = ("The Eiffel Tower is in the city of", "The Colosseum is in the city of")
TOL = 1e-5


@pytest.fixture(params=["gpt2", "llama"])
def lm(request: pytest.FixtureRequest) -> interlace.LanguageModel:
    return request.getfixturevalue(request.param)


def _alone(lm: interlace.LanguageModel, prompt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    with lm.trace(prompt):
        h = hidden(layers(lm)[0].output).save()
        logits = lm.lm_head.output.save()
    return h, logits


def test_batched_invokes_equal_each_invoke_alone(lm: interlace.LanguageModel, counter: Any) -> None:
    calls = counter(lm._module)
    with lm.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            h0 = hidden(layers(lm)[0].output).save()
            l0 = lm.lm_head.output.save()
        with tracer.invoke(PROMPTS[1]):
            h1 = hidden(layers(lm)[0].output).save()
            l1 = lm.lm_head.output.save()
        with tracer.invoke(PROMPTS[2]):
            h2 = hidden(layers(lm)[0].output).save()
            l2 = lm.lm_head.output.save()
    assert calls.calls == 1  # one batched forward

    tok = lm.tokenizer
    for prompt, h, logits in zip(PROMPTS, (h0, h1, h2), (l0, l1, l2)):
        texts = prompt if isinstance(prompt, list) else [prompt]
        assert h.shape[0] == logits.shape[0] == len(texts)  # only this invoke's rows
        for row, text in enumerate(texts):
            n = len(tok(text)["input_ids"])
            ref_h, ref_logits = _alone(lm, text)
            # left padding: the real tokens are the last n positions
            torch.testing.assert_close(h[row, -n:], ref_h[0], rtol=0, atol=TOL)
            torch.testing.assert_close(logits[row, -n:], ref_logits[0], rtol=0, atol=TOL)


def test_edit_in_one_invoke_touches_only_its_rows(gpt2: interlace.LanguageModel) -> None:
    a, b = SAME_LENGTH
    _, clean_b = _alone(gpt2, b)
    with gpt2.trace() as tracer:
        with tracer.invoke(a):
            gpt2.transformer.h[0].output[:] = 0
            la = gpt2.lm_head.output.save()
        with tracer.invoke(b):
            lb = gpt2.lm_head.output.save()
    torch.testing.assert_close(lb, clean_b, rtol=0, atol=TOL)
    with gpt2.trace(a):
        gpt2.transformer.h[0].output[:] = 0
        ref_a = gpt2.lm_head.output.save()
    torch.testing.assert_close(la, ref_a, rtol=0, atol=TOL)


def test_replacement_in_one_invoke_touches_only_its_rows(gpt2: interlace.LanguageModel) -> None:
    a, b = SAME_LENGTH
    _, clean_a = _alone(gpt2, a)
    with gpt2.trace() as tracer:
        with tracer.invoke(a):
            la = gpt2.lm_head.output.save()
        with tracer.invoke(b):
            gpt2.transformer.h[1].output = gpt2.transformer.h[1].output * 3
            lb = gpt2.lm_head.output.save()
    torch.testing.assert_close(la, clean_a, rtol=0, atol=TOL)
    with gpt2.trace(b):
        gpt2.transformer.h[1].output = gpt2.transformer.h[1].output * 3
        ref_b = gpt2.lm_head.output.save()
    torch.testing.assert_close(lb, ref_b, rtol=0, atol=TOL)


def test_empty_invoke_sees_whole_batch_including_later_invokes(gpt2: interlace.LanguageModel) -> None:
    with gpt2.trace() as tracer:
        with tracer.invoke("Hello"):
            mine = gpt2.lm_head.output.save()
        with tracer.invoke():
            everything = gpt2.lm_head.output.save()
        with tracer.invoke(["x y", "z"]):
            theirs = gpt2.lm_head.output.save()
    assert mine.shape[0] == 1 and theirs.shape[0] == 2
    assert everything.shape[0] == 3
    assert torch.equal(everything[:1], mine)
    assert torch.equal(everything[1:], theirs)


def test_empty_invoke_edit_applies_to_every_row(gpt2: interlace.LanguageModel) -> None:
    with gpt2.trace() as tracer:
        with tracer.invoke(["Hello", "x y"]):
            logits = gpt2.lm_head.output.save()
        with tracer.invoke():
            gpt2.transformer.h[0].output[:] = 0
    with gpt2.trace(["Hello", "x y"]):
        gpt2.transformer.h[0].output[:] = 0
        ref = gpt2.lm_head.output.save()
    assert torch.equal(logits, ref)


def test_barrier_activation_patching(gpt2: interlace.LanguageModel) -> None:
    source, target = SAME_LENGTH
    tok = gpt2.tokenizer
    assert len(tok(source)["input_ids"]) == len(tok(target)["input_ids"])

    with gpt2.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(source):
            emb = gpt2.transformer.wte.output
            barrier()
        with tracer.invoke(target):
            barrier()
            gpt2.transformer.wte.output = emb
            patched = gpt2.lm_head.output.save()

    # By hand: the source's embedding, then the target run with its embedding replaced.
    inner = gpt2._module
    seen: dict[str, torch.Tensor] = {}
    with hooks((inner.transformer.wte, lambda m, a, o: seen.__setitem__("emb", o))):
        inner(**encode(gpt2, source))
    with hooks((inner.transformer.wte, lambda m, a, o: seen["emb"])):
        expected = inner(**encode(gpt2, target)).logits
    torch.testing.assert_close(patched, expected, rtol=0, atol=TOL)
    _, clean_target = _alone(gpt2, target)
    assert not torch.allclose(patched, clean_target)


def test_barrier_reached_by_too_few_invokes_is_an_error(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(interlace.TracingError, match="barrier"):
        with gpt2.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke("Hello"):
                gpt2.transformer.wte.output
                barrier()
            with tracer.invoke("x y"):
                gpt2.lm_head.output


def test_stop_ends_the_forward_early(gpt2: interlace.LanguageModel, counter: Any) -> None:
    inner = gpt2._module
    later = counter(inner.transformer.h[2])
    head = counter(inner.lm_head)
    with gpt2.trace("Hello world") as tracer:
        h0 = gpt2.transformer.h[0].output.save()
        tracer.stop()
        after_stop = gpt2.lm_head.output.save()
    assert later.calls == 0 and head.calls == 0
    _ref, _ = _alone(gpt2, "Hello world")
    assert torch.equal(hidden(h0), _ref)
    with pytest.raises(UnboundLocalError):
        after_stop  # noqa: B018
    # The model is usable again and complete afterwards.
    head.calls = 0
    with gpt2.trace("Hello world"):
        logits = gpt2.lm_head.output.save()
    assert head.calls == 1 and logits.shape[-1] == 512


def test_stop_in_one_invoke_stops_the_batch(gpt2: interlace.LanguageModel, counter: Any) -> None:
    head = counter(gpt2._module.lm_head)
    with gpt2.trace() as tracer:
        with tracer.invoke("Hello"):
            first = gpt2.transformer.h[0].output.save()
            tracer.stop()
        with tracer.invoke("x y"):
            second = gpt2.transformer.h[1].output.save()
    assert head.calls == 0
    assert first.shape[0] == 1
    with pytest.raises(UnboundLocalError):  # h[1] never ran, so invoke 1 never got there
        second  # noqa: B018


def test_skip_in_every_invoke_combines_per_invoke_values(gpt2: interlace.LanguageModel) -> None:
    a, b = SAME_LENGTH
    with gpt2.trace() as tracer:
        with tracer.invoke(a):
            block = gpt2.transformer.h[2]
            block.skip(block.input)  # identity for invoke 0
            la = gpt2.lm_head.output.save()
        with tracer.invoke(b):
            block = gpt2.transformer.h[2]
            block.skip(block.input * 0)  # zeros for invoke 1
            lb = gpt2.lm_head.output.save()
    for prompt, logits, scale in ((a, la, 1.0), (b, lb, 0.0)):
        with gpt2.trace(prompt):
            block = gpt2.transformer.h[2]
            block.skip(block.input * scale)
            ref = gpt2.lm_head.output.save()
        torch.testing.assert_close(logits, ref, rtol=0, atol=TOL)


def test_skip_in_only_some_invokes_is_an_error(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(interlace.TracingError, match="skipped by some invokes but not all"):
        with gpt2.trace() as tracer:
            with tracer.invoke("Hello"):
                block = gpt2.transformer.h[2]
                block.skip(block.input)
            with tracer.invoke("x y"):
                gpt2.lm_head.output


def test_invokes_share_variables_in_definition_order(gpt2: interlace.LanguageModel) -> None:
    """Invoke bodies run in one namespace; a later invoke reads what an earlier one set, as
    long as the earlier one got there first (here at an earlier module)."""
    with gpt2.trace() as tracer:
        with tracer.invoke("Hello"):
            first_mean = gpt2.transformer.h[0].output.mean()
        with tracer.invoke("x y"):
            gpt2.transformer.h[3].output
            seen = interlace.save(float(first_mean.detach()))
    with gpt2.trace("Hello"):
        ref = gpt2.transformer.h[0].output.mean().save()
    assert seen == pytest.approx(float(ref.detach()), abs=1e-6)
