"""Invokes batch into one forward; each sees its rows; barriers; `tracer.stop()`; `.skip()`.

Every test runs in the three modes (`mode`: here, the simulation, a real server) and compares
with the plain module run alone on each prompt with raw forward hooks. The prompts differ in
text and length, so the batch is left-padded and a row read from (or written to) the wrong
invoke shows; edits scale or shift values instead of zeroing them, for the same reason.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import interlace
from engine_helpers import encode, hidden, hooks, layers, raw_layers

PROMPTS = ["The Eiffel Tower is in the city of", "Hello", ["x y", "Madison Square Garden is located in the city of"]]
LONG, SHORT = "Madison Square Garden is located in the city of", "The Eiffel Tower is in"
TOL = 1e-5


@pytest.fixture(params=["gpt2", "llama"])
def lm(request: pytest.FixtureRequest) -> interlace.LanguageModel:
    return request.getfixturevalue(request.param)


def raw_alone(lm: interlace.LanguageModel, text: str, *pairs: tuple[torch.nn.Module, Callable[..., Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain module on `text` alone, with raw hooks `pairs`: layer 0's hidden states (as
    the later hooks leave them) and the logits."""
    seen: list[torch.Tensor] = []
    with torch.no_grad(), hooks(*pairs, (raw_layers(lm)[0], lambda m, a, o: seen.append(hidden(o).clone()))):
        logits = lm._module(**encode(lm, text)).logits
    return seen[0], logits


def real(lm: interlace.LanguageModel, text: str, rows: torch.Tensor) -> torch.Tensor:
    """A left-padded row's real positions (the last n, n the text's token count)."""
    return rows[..., -len(lm.tokenizer(text)["input_ids"]):, :]


def scale_output(factor: float) -> Callable[..., torch.Tensor]:
    return lambda m, a, o: o * factor


def test_batched_invokes_equal_each_invoke_alone(lm: interlace.LanguageModel, counter: Any, mode: Any) -> None:
    calls = counter(lm._module)
    first = layers(lm)[0]  # (found here: a body sent to a server may not read `lm._module`)
    with lm.trace(remote=mode) as tracer:
        with tracer.invoke(PROMPTS[0]):
            h0 = hidden(first.output).save()
            l0 = lm.lm_head.output.save()
        with tracer.invoke(PROMPTS[1]):
            h1 = hidden(first.output).save()
            l1 = lm.lm_head.output.save()
        with tracer.invoke(PROMPTS[2]):
            h2 = hidden(first.output).save()
            l2 = lm.lm_head.output.save()
    if mode is not True:  # a server runs its own copy of the model
        assert calls.calls == 1  # one batched forward

    for prompt, h, logits in zip(PROMPTS, (h0, h1, h2), (l0, l1, l2)):
        texts = prompt if isinstance(prompt, list) else [prompt]
        assert h.shape[0] == logits.shape[0] == len(texts)  # only this invoke's rows
        for row, text in enumerate(texts):
            ref_h, ref_logits = raw_alone(lm, text)
            torch.testing.assert_close(real(lm, text, h[row]), ref_h[0], rtol=0, atol=TOL)
            torch.testing.assert_close(real(lm, text, logits[row]), ref_logits[0], rtol=0, atol=TOL)


def test_edit_in_one_invoke_touches_only_its_rows(gpt2: interlace.LanguageModel, mode: Any) -> None:
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(LONG):
            gpt2.transformer.h[0].output[:] *= 0.5
            la = gpt2.lm_head.output.save()
        with tracer.invoke(SHORT):
            lb = gpt2.lm_head.output.save()
    _, ref_a = raw_alone(gpt2, LONG, (gpt2._module.transformer.h[0], scale_output(0.5)))
    _, clean_b = raw_alone(gpt2, SHORT)
    torch.testing.assert_close(real(gpt2, LONG, la), ref_a, rtol=0, atol=TOL)
    torch.testing.assert_close(real(gpt2, SHORT, lb), clean_b, rtol=0, atol=TOL)
    assert not torch.allclose(real(gpt2, LONG, la), raw_alone(gpt2, LONG)[1], atol=1e-3)  # the edit did something


def test_replacement_in_one_invoke_touches_only_its_rows(gpt2: interlace.LanguageModel, mode: Any) -> None:
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(SHORT):
            la = gpt2.lm_head.output.save()
        with tracer.invoke(LONG):
            gpt2.transformer.h[1].output = gpt2.transformer.h[1].output * 3
            lb = gpt2.lm_head.output.save()
    _, clean_a = raw_alone(gpt2, SHORT)
    _, ref_b = raw_alone(gpt2, LONG, (gpt2._module.transformer.h[1], scale_output(3.0)))
    torch.testing.assert_close(real(gpt2, SHORT, la), clean_a, rtol=0, atol=TOL)
    torch.testing.assert_close(real(gpt2, LONG, lb), ref_b, rtol=0, atol=TOL)


def test_empty_invoke_sees_whole_batch_including_later_invokes(gpt2: interlace.LanguageModel, mode: Any) -> None:
    with gpt2.trace(remote=mode) as tracer:
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
    for row, text in enumerate(["Hello", "x y", "z"]):
        torch.testing.assert_close(real(gpt2, text, everything[row]), raw_alone(gpt2, text)[1][0], rtol=0, atol=TOL)


def test_empty_invoke_edit_applies_to_every_row(gpt2: interlace.LanguageModel, mode: Any) -> None:
    texts = ["Hello", "x y"]
    direction = torch.randn(128, generator=torch.Generator().manual_seed(0))
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(texts):
            logits = gpt2.lm_head.output.save()
        with tracer.invoke():
            gpt2.transformer.h[0].output[:] += direction
    for row, text in enumerate(texts):
        _, ref = raw_alone(gpt2, text, (gpt2._module.transformer.h[0], lambda m, a, o: o + direction))
        torch.testing.assert_close(real(gpt2, text, logits[row]), ref[0], rtol=0, atol=TOL)


def test_barrier_activation_patching_at_one_position(gpt2: interlace.LanguageModel, mode: Any) -> None:
    """Patch the source's last position of block 1 into the target's last position; the
    target reads its own block 1 after the barrier (that it sees its own rows is the point)."""
    source, target = SHORT, LONG
    with gpt2.trace(remote=mode) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(source):
            src = gpt2.transformer.h[1].output[:, -1].clone()
            barrier()
        with tracer.invoke(target):
            barrier()
            own = gpt2.transformer.h[1].output[:, -1].clone().save()
            gpt2.transformer.h[1].output[:, -1] = src
            patched = gpt2.lm_head.output.save()

    # By hand: the source's block-1 output, then the target with its last position replaced.
    block = gpt2._module.transformer.h[1]
    seen: dict[str, torch.Tensor] = {}
    raw_alone(gpt2, source, (block, lambda m, a, o: seen.__setitem__("src", o[:, -1].clone())))
    raw_alone(gpt2, target, (block, lambda m, a, o: seen.__setitem__("own", o[:, -1].clone())))

    def patch(m: Any, a: Any, o: torch.Tensor) -> torch.Tensor:
        o = o.clone()
        o[:, -1] = seen["src"]
        return o

    _, expected = raw_alone(gpt2, target, (block, patch))
    torch.testing.assert_close(own, seen["own"], rtol=0, atol=TOL)
    torch.testing.assert_close(real(gpt2, target, patched), expected, rtol=0, atol=TOL)
    assert not torch.allclose(patched[:, -1], raw_alone(gpt2, target)[1][:, -1], atol=1e-3)


def test_barrier_reached_by_too_few_invokes_is_an_error(gpt2: interlace.LanguageModel, raises_in_mode: Any, mode: Any) -> None:
    with raises_in_mode(interlace.TracingError, match="barrier"):
        with gpt2.trace(remote=mode) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke("Hello"):
                gpt2.transformer.wte.output
                barrier()
            with tracer.invoke("x y"):
                gpt2.lm_head.output


def test_stop_ends_the_forward_early(gpt2: interlace.LanguageModel, counter: Any, mode: Any) -> None:
    inner = gpt2._module
    later = counter(inner.transformer.h[2])
    head = counter(inner.lm_head)
    with gpt2.trace("Hello world", remote=mode) as tracer:
        h0 = gpt2.transformer.h[0].output.save()
        tracer.stop()
        after_stop = gpt2.lm_head.output.save()
    if mode is not True:  # the server's model is not this one
        assert later.calls == 0 and head.calls == 0
    torch.testing.assert_close(hidden(h0), raw_alone(gpt2, "Hello world")[0], rtol=0, atol=0)
    with pytest.raises(UnboundLocalError):  # saved after the stop: never reached
        after_stop.shape  # noqa: B018
    # The model is usable again and complete afterwards.
    with gpt2.trace("Hello world", remote=mode):
        logits = gpt2.lm_head.output.save()
    torch.testing.assert_close(logits, raw_alone(gpt2, "Hello world")[1], rtol=0, atol=TOL)


def test_stop_in_one_invoke_stops_the_batch(gpt2: interlace.LanguageModel, counter: Any, mode: Any) -> None:
    head = counter(gpt2._module.lm_head)
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke("Hello"):
            first = gpt2.transformer.h[0].output.save()
            tracer.stop()
        with tracer.invoke("x y"):
            second = gpt2.transformer.h[1].output.save()
    assert head.calls == 0
    torch.testing.assert_close(real(gpt2, "Hello", first[0]), raw_alone(gpt2, "Hello")[0][0], rtol=0, atol=TOL)
    assert first.shape[0] == 1
    with pytest.raises(UnboundLocalError):  # h[1] never ran, so invoke 1 never got there
        second.shape  # noqa: B018


def test_skip_in_every_invoke_combines_per_invoke_values(gpt2: interlace.LanguageModel, mode: Any) -> None:
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(LONG):
            block = gpt2.transformer.h[2]
            block.skip(block.input)  # identity for invoke 0
            la = gpt2.lm_head.output.save()
        with tracer.invoke(SHORT):
            block = gpt2.transformer.h[2]
            block.skip(block.input * 0.5)  # half the input for invoke 1
            lb = gpt2.lm_head.output.save()
    block = gpt2._module.transformer.h[2]
    for prompt, logits, scale in ((LONG, la, 1.0), (SHORT, lb, 0.5)):
        # Skipping with a value: the block's output is that value (its input, scaled).
        _, ref = raw_alone(gpt2, prompt, (block, lambda m, a, o, s=scale: a[0] * s))
        torch.testing.assert_close(real(gpt2, prompt, logits), ref, rtol=0, atol=TOL)


def test_skip_in_only_some_invokes_is_an_error(gpt2: interlace.LanguageModel, raises_in_mode: Any, mode: Any) -> None:
    with raises_in_mode(interlace.TracingError, match="skipped by some invokes but not all"):
        with gpt2.trace(remote=mode) as tracer:
            with tracer.invoke("Hello"):
                block = gpt2.transformer.h[2]
                block.skip(block.input)
            with tracer.invoke("x y"):
                gpt2.lm_head.output


def test_invokes_share_variables_in_definition_order(gpt2: interlace.LanguageModel, mode: Any) -> None:
    """Invoke bodies run in one namespace; a later invoke reads what an earlier one set, as
    long as the earlier one got there first (here at an earlier module)."""
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke("Hello"):
            first_mean = gpt2.transformer.h[0].output.mean()
        with tracer.invoke("x y"):
            gpt2.transformer.h[3].output
            seen = interlace.save(float(first_mean.detach()))
    assert seen == pytest.approx(float(raw_alone(gpt2, "Hello")[0].mean()), abs=1e-6)
