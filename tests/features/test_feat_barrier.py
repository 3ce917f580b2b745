"""Activation patching in one trace: two invokes meet at a barrier, the second takes one
position of the first's hidden state. In all three modes, against raw forward hooks on the
plain module run on each prompt alone.

The prompts differ in text and length (the batch is left-padded), so an invoke that read the
other invoke's rows, or a patch that landed in the wrong row or position, would show.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

SOURCE = "The Eiffel Tower is in the city of"  # 12 tokens
TARGET = "Madison Square Garden is located in the city of"  # 17 tokens
LAYER = 1
POSITION = -3  # one position, counted from the end (the same token in a left-padded batch)
TOL = 1e-5


def _raw(lm: Any, text: str, hook: Callable[..., Any] | None = None, layer: int = LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `layer`'s output (after `hook`, which may replace it) and the logits of the plain
    module run on `text` alone."""
    block = lm._module.transformer.h[layer]
    seen: list[torch.Tensor] = []

    def record(module: Any, args: Any, out: Any) -> Any:
        new = hook(module, args, out) if hook is not None else None
        seen.append((out if new is None else new).clone())
        return new

    enc = lm.tokenizer(text, return_tensors="pt")
    handle = block.register_forward_hook(record)
    try:
        with torch.no_grad():
            logits = lm._module(**enc).logits
    finally:
        handle.remove()
    return seen[0], logits


def _patched_by_hand(lm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's hidden state at POSITION, put into the target's at POSITION by a raw hook."""
    source_hidden, _ = _raw(lm, SOURCE)

    def patch(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, POSITION] = source_hidden[:, POSITION]
        return out

    return _raw(lm, TARGET, patch)


def test_patch_one_position_through_a_barrier(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.trace(remote=mode) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(SOURCE):
            source = lm.transformer.h[1].output[:, -3]
            barrier()
        with tracer.invoke(TARGET):
            barrier()
            before = lm.transformer.h[1].output.clone().save()
            lm.transformer.h[1].output[:, -3] = source
            after = lm.transformer.h[1].output.clone().save()
            patched = lm.lm_head.output.save()

    clean_hidden, clean_logits = _raw(lm, TARGET)
    expected_hidden, expected_logits = _patched_by_hand(lm)
    # After the barrier the target reads its own rows (not the source's: the bug this guards).
    assert before.shape == clean_hidden.shape
    torch.testing.assert_close(before, clean_hidden, rtol=0, atol=TOL)
    torch.testing.assert_close(after, expected_hidden, rtol=0, atol=TOL)
    torch.testing.assert_close(patched, expected_logits, rtol=0, atol=TOL)
    # Only that position changed, and it changed the prediction there and after it.
    assert torch.equal(after[:, :POSITION], before[:, :POSITION]) and torch.equal(after[:, POSITION + 1 :], before[:, POSITION + 1 :])
    assert not torch.allclose(patched[:, POSITION], clean_logits[:, POSITION], atol=1e-3)
    torch.testing.assert_close(patched[:, :POSITION], clean_logits[:, :POSITION], rtol=0, atol=TOL)


def test_each_invoke_reads_its_own_rows_after_a_barrier(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.trace(remote=mode) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(SOURCE):
            a = lm.transformer.h[1].output.save()
            barrier()
            a_next = lm.transformer.h[2].output.save()
        with tracer.invoke(TARGET):
            barrier()
            b = lm.transformer.h[1].output.save()
            b_next = lm.transformer.h[2].output.save()

    # Left padding: the source's real tokens are its row's last 12 positions.
    n = len(lm.tokenizer(SOURCE)["input_ids"])
    assert a.shape[1] == b.shape[1] == len(lm.tokenizer(TARGET)["input_ids"])
    torch.testing.assert_close(a[:, -n:], _raw(lm, SOURCE)[0], rtol=0, atol=TOL)
    torch.testing.assert_close(b, _raw(lm, TARGET)[0], rtol=0, atol=TOL)
    torch.testing.assert_close(a_next[:, -n:], _raw(lm, SOURCE, layer=2)[0], rtol=0, atol=TOL)
    torch.testing.assert_close(b_next, _raw(lm, TARGET, layer=2)[0], rtol=0, atol=TOL)


def test_three_invokes_at_one_barrier_each_patch_their_own_row(feat_gpt2, mode):
    """The barrier releases every party at the value being served; each reads and edits only
    its own rows (a view made for another invoke would write the wrong row)."""
    lm = feat_gpt2
    with lm.trace(remote=mode) as tracer:
        barrier = tracer.barrier(3)
        with tracer.invoke(SOURCE):
            source = lm.transformer.h[1].output[:, -1].clone()
            barrier()
        with tracer.invoke(TARGET):
            barrier()
            lm.transformer.h[1].output[:, -1] = source
            one = lm.lm_head.output.save()
        with tracer.invoke(TARGET):
            barrier()
            lm.transformer.h[1].output[:, -1] *= 2
            two = lm.lm_head.output.save()

    source_hidden, _ = _raw(lm, SOURCE)

    def copy_last(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, -1] = source_hidden[:, -1]
        return out

    def double_last(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, -1] *= 2
        return out

    torch.testing.assert_close(one, _raw(lm, TARGET, copy_last)[1], rtol=0, atol=TOL)
    torch.testing.assert_close(two, _raw(lm, TARGET, double_last)[1], rtol=0, atol=TOL)
