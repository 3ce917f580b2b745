"""Steering during generation: a vector (the difference of two prompts' layer-1 states, found
by traces in the same mode) added to layer 1's output at every generated token. Checked
against Hugging Face `generate` on a plain copy of the model with a raw hook doing the same."""

from __future__ import annotations

import torch

TOL = 1e-4
PROMPT = "The Eiffel Tower is in the city of"
STEPS = 5
SCALE = 4.0


def test_steering_every_generated_token(lm, raw, mode):
    with lm.trace("I love this", remote=mode):
        positive = lm.transformer.h[1].output[0, -1].save()
    with lm.trace("I hate that thing", remote=mode):
        negative = lm.transformer.h[1].output[0, -1].save()
    steer = SCALE * (positive - negative)

    with lm.generate(PROMPT, max_new_tokens=STEPS, remote=mode) as tracer:
        logits = list().save()
        for step in tracer.all():
            lm.transformer.h[1].output[:] += steer
            logits.append(lm.lm_head.output[:, -1])
        tokens = tracer.result.save()

    # By hand: the same vector from raw hooks, added by a raw hook on every forward of generate.
    _, pos = raw.run("I love this", capture=("transformer.h.1",))
    _, neg = raw.run("I hate that thing", capture=("transformer.h.1",))
    want_steer = SCALE * (pos["transformer.h.1"][0, -1] - neg["transformer.h.1"][0, -1])
    torch.testing.assert_close(steer, want_steer, rtol=0, atol=TOL)

    def add(module, args, out):
        return out + want_steer

    ids = raw.encode(PROMPT)
    options = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), raw.hooks({"transformer.h.1": add}):
        steered = raw.model.generate(**ids, **options)
    with torch.no_grad():
        plain = raw.model.generate(**ids, **options)

    assert steered.sequences.shape[1] == ids["input_ids"].shape[1] + STEPS  # no early end of sequence
    assert torch.equal(tokens, steered.sequences)
    assert len(logits) == STEPS
    torch.testing.assert_close(torch.stack(logits), torch.stack(steered.logits), rtol=0, atol=TOL)
    # The steering mattered at every step, and changed what was generated.
    for got, unsteered in zip(logits, plain.logits):
        assert not torch.allclose(got, unsteered, atol=1e-2)
    assert not torch.equal(tokens, plain.sequences)
