"""Activation patching at one position: the clean run's layer-1 state at the last token put
into the corrupt run, as two traces and as one trace with two invokes and a barrier. The two
prompts have different lengths (and so are padded together in one batch), in both orders.
Checked against raw hooks on a plain copy of the model."""

from __future__ import annotations

import pytest
import torch

TOL = 1e-4
SHORT = "The Eiffel Tower is in the city of"  # 12 tokens
LONG = "Madison Square Garden is located in the city of"  # 17 tokens
ORDERS = pytest.mark.parametrize("clean, corrupt", [(SHORT, LONG), (LONG, SHORT)], ids=["short-clean", "long-clean"])


def _expected(raw, clean, corrupt):
    """By hand: the clean layer-1 output at the last position, then the corrupt run with it."""
    clean_logits, seen = raw.run(clean, capture=("transformer.h.1",))
    vector = seen["transformer.h.1"][:, -1]

    def patch(module, args, out):
        out[:, -1] = vector

    patched, _ = raw.run(corrupt, edits={"transformer.h.1": patch})
    corrupt_logits, _ = raw.run(corrupt)
    return clean_logits, patched, corrupt_logits


def _check_patched(patched, expected, corrupt_logits):
    torch.testing.assert_close(patched, expected, rtol=0, atol=TOL)
    # Only the last position changed: the earlier ones cannot see it (causal attention).
    torch.testing.assert_close(patched[:, :-1], corrupt_logits[:, :-1], rtol=0, atol=TOL)
    assert not torch.allclose(patched[:, -1], corrupt_logits[:, -1], atol=1e-3)


@ORDERS
def test_patching_with_two_traces(lm, raw, mode, clean, corrupt):
    with lm.trace(clean, remote=mode):
        clean_h = lm.transformer.h[1].output[:, -1].save()

    with lm.trace(corrupt, remote=mode):
        lm.transformer.h[1].output[:, -1] = clean_h
        patched = lm.lm_head.output.save()

    _, expected, corrupt_logits = _expected(raw, clean, corrupt)
    _check_patched(patched, expected, corrupt_logits)


@ORDERS
def test_patching_with_invokes_and_a_barrier(lm, raw, mode, clean, corrupt):
    with lm.trace(remote=mode) as tracer:
        barrier = tracer.barrier(2)

        with tracer.invoke(clean):
            clean_h = lm.transformer.h[1].output[:, -1]
            barrier()
            clean_logits = lm.lm_head.output.save()

        with tracer.invoke(corrupt):
            barrier()
            lm.transformer.h[1].output[:, -1] = clean_h
            patched = lm.lm_head.output.save()

    expected_clean, expected, corrupt_logits = _expected(raw, clean, corrupt)
    # One batch: each invoke's rows are padded on the left to the longer prompt.
    n_clean, n_corrupt = raw.n_tokens(clean), raw.n_tokens(corrupt)
    assert clean_logits.shape[:2] == patched.shape[:2] == (1, max(n_clean, n_corrupt))
    torch.testing.assert_close(clean_logits[:, -n_clean:], expected_clean, rtol=0, atol=TOL)
    _check_patched(patched[:, -n_corrupt:], expected, corrupt_logits)
