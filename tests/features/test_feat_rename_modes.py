"""`rename=` aliases mean the same in every mode: the server applies the client model's aliases
for that job only, so the next job (another user's model, without them) is unaffected."""

from __future__ import annotations

import pytest
import torch

import interlace

A = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def renamed_gpt2(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True,
                                   rename={"transformer.h": "layers", "mlp": ["ffn", "feed_forward"]})


def raw_outputs(model, paths):
    outs, handles = {}, []
    for path in paths:
        module = model._module.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, i, o, path=path: outs.__setitem__(path, o.detach().clone())))
    try:
        with torch.no_grad():
            model._module(**model.tokenizer(A, return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return outs


def test_aliases_in_the_body_read_and_edit_the_real_modules(renamed_gpt2, mode):
    model = renamed_gpt2
    with model.trace(A, remote=mode):
        model.layers[0].ffn.output[:, -1] *= 0.5             # alias of transformer.h.0.mlp
        mlp = model.layers[0].feed_forward.output.save()     # a second alias of the same name
        h1 = model.transformer.h[1].output.save()
    truth = raw_outputs(model, ["transformer.h.0.mlp"])["transformer.h.0.mlp"]
    truth[:, -1] *= 0.5
    assert torch.allclose(mlp, truth, atol=1e-6)
    with model.trace(A):
        model.transformer.h[0].mlp.output[:, -1] *= 0.5
        expected = model.transformer.h[1].output.save()
    assert torch.allclose(h1, expected, atol=1e-6)


def test_a_jobs_aliases_do_not_outlive_it(renamed_gpt2, tiny_gpt2_path, mode):
    with renamed_gpt2.trace(A, remote=mode):
        h = renamed_gpt2.layers[1].output.save()
    plain = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    with pytest.raises(Exception, match="layers"):
        with plain.trace(A, remote=mode):
            g = plain.layers[1].output.save()
    with plain.trace(A, remote=mode):
        g = plain.transformer.h[1].output.save()
    assert torch.allclose(h, g, atol=1e-6)


def test_an_alias_cannot_name_a_private_attribute(tiny_gpt2_path):
    from interlace.contract.request import TraceRequest

    with pytest.raises(Exception, match="rename"):
        TraceRequest.model_validate({"model_key": "m", "kind": "trace",
                                     "block": {"filename": "f.py", "first_lineno": 1, "source": "with m.trace():\n    pass\n"},
                                     "rename": {"transformer": "__class__"}})
