"""Interlace quick start: one trace, three ways.

Run by `bash scripts/demo.sh`, which starts a server and sets INTERLACE_HOST and
INTERLACE_API_KEY. The built-in demo model (a small GPT-2 built offline) is used on both sides.
"""

import torch

import interlace

PROMPT = "The Eiffel Tower is in the city of"

model = interlace.LanguageModel("interlace/demo-gpt2")
print(model)


def run(mode):
    """Zero the last position of block 1, then read block 3 and the next-token prediction."""
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[1].output[:, -1] = 0
        hidden = model.transformer.h[3].output.save()
        top = model.lm_head.output[0, -1].argmax().save()
    return hidden, top


local_hidden, local_top = run(False)
print(f"\nlocal:          hidden {tuple(local_hidden.shape)}, next token {model.tokenizer.decode(int(local_top))!r}")

with model.trace(PROMPT, remote="local", verbose=True):
    hidden = model.transformer.h[0].output.save()
sim_hidden, sim_top = run("local")
print(f"remote='local': same values as local: {torch.allclose(sim_hidden, local_hidden)}")

remote_hidden, remote_top = run(True)
print(f"remote=True:    same values as local: {torch.allclose(remote_hidden, local_hidden)}")

with model.generate(PROMPT, max_new_tokens=5, do_sample=False, remote=True) as tracer:
    tokens = interlace.save([])
    for step in tracer.iter[:]:
        tokens.append(model.lm_head.output[0, -1].argmax())
    ids = model.generator.output.save()
print(f"remote generation: {model.tokenizer.decode(ids[0])!r}")

assert torch.allclose(sim_hidden, local_hidden) and torch.allclose(remote_hidden, local_hidden)
assert int(sim_top) == int(local_top) == int(remote_top)
print("\nAll three runs agree.")
