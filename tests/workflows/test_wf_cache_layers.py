"""Caching every layer with `tracer.cache()`: each module's output after the body's edits,
reachable by key and by attribute path, in all three modes. Checked against raw hooks on
every module of a plain copy of the model, with the same position-dependent edit."""

from __future__ import annotations

import torch

TOL = 1e-4
PROMPT = "Madison Square Garden is located in the city of"


def _tensor(value):
    return value[0] if isinstance(value, tuple) else value


def test_cache_every_layer(lm, raw, mode):
    with lm.trace(PROMPT, remote=mode) as tracer:
        cache = tracer.cache()
        lm.transformer.h[0].output[:, 1:4] *= 0.5
        logits = lm.lm_head.output.save()

    def edit(module, args, out):
        out[:, 1:4] *= 0.5

    names = tuple(name for name, _ in raw.model.named_modules() if name)
    expected_logits, seen = raw.run(PROMPT, capture=names, edits={"transformer.h.0": edit})

    # Every module that ran (the root as "model"), by its full key, after the edit.
    assert set(cache) == {"model"} | {f"model.{name}" for name in seen}
    torch.testing.assert_close(cache["model"].output.logits, expected_logits, rtol=0, atol=TOL)
    for name in seen:
        want = _tensor(seen[name])
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(_tensor(cache[f"model.{name}"].output), want, rtol=0, atol=TOL, msg=name)
    # By attribute path, as the model's own modules are named.
    for i in range(len(raw.model.transformer.h)):
        torch.testing.assert_close(cache.model.transformer.h[i].output, seen[f"transformer.h.{i}"], rtol=0, atol=TOL)
    torch.testing.assert_close(cache.model.lm_head.output, logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=TOL)
    # The edit shows (a cache taken before the body's edits would hold the unedited values).
    _, clean = raw.run(PROMPT, capture=("transformer.h.0",))
    assert not torch.allclose(cache.model.transformer.h[0].output, clean["transformer.h.0"], atol=1e-3)
