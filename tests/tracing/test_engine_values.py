"""Saved and edited values equal what raw PyTorch hooks give on the same model and input.

Every test runs the same model twice: once through Interlace, once with plain
`register_forward_hook` / `register_forward_pre_hook`, and compares with `torch.equal`
(same model, same input, same ops: results must be bit-identical).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import interlace
from engine_helpers import encode, hidden, hooks, layers, raw_layers

# -- the tiny MLP ------------------------------------------------------------------------------


def test_mlp_saved_outputs_inputs_match_raw_hooks(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    seen: dict[str, Any] = {}
    with hooks(
        (tiny_mlp.layer1, lambda m, a, o: seen.__setitem__("l1", o)),
        (tiny_mlp.act, lambda m, a, o: seen.__setitem__("act_in", a[0])),
        (tiny_mlp.layer2, lambda m, a, o: seen.__setitem__("l2", o)),
    ):
        expected = tiny_mlp(tiny_input)

    with mlp_model.trace(tiny_input):
        l1 = mlp_model.layer1.output.save()
        act_in = mlp_model.act.input.save()
        act_inputs = mlp_model.act.inputs.save()
        l2 = mlp_model.layer2.output.save()
        root = mlp_model.output.save()

    assert torch.equal(l1, seen["l1"])
    assert torch.equal(act_in, seen["act_in"])
    args, kwargs = act_inputs
    assert isinstance(args, tuple) and kwargs == {}
    assert torch.equal(args[0], seen["act_in"])
    assert torch.equal(l2, seen["l2"])
    assert torch.equal(root, expected)


def test_mlp_in_place_edit_matches_raw_hook(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    def zero(m: Any, a: Any, o: torch.Tensor) -> None:
        o[:, :3] = 0

    with hooks((tiny_mlp.layer1, zero)):
        expected = tiny_mlp(tiny_input)
    with mlp_model.trace(tiny_input):
        mlp_model.layer1.output[:, :3] = 0
        out = mlp_model.output.save()
    assert torch.equal(out, expected)
    assert not torch.equal(out, tiny_mlp(tiny_input))  # the edit did something and did not persist


def test_mlp_replacement_and_input_set_match_raw_hooks(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with hooks((tiny_mlp.layer1, lambda m, a, o: o * 2)):
        with hooks((tiny_mlp.layer2, lambda m, a: (a[0] - 0.5,)), pre=True):
            expected = tiny_mlp(tiny_input)

    with mlp_model.trace(tiny_input):
        mlp_model.layer1.output = mlp_model.layer1.output * 2
        mlp_model.layer2.input = mlp_model.layer2.input - 0.5
        out = mlp_model.output.save()
    assert torch.equal(out, expected)


def test_mlp_skip_matches_raw_hook(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with hooks((tiny_mlp.act, lambda m, a, o: a[0])):
        expected = tiny_mlp(tiny_input)  # act replaced by identity
    calls = []
    real_forward = tiny_mlp.act.forward
    tiny_mlp.act.forward = lambda x: calls.append(1) or real_forward(x)  # counts forward runs
    with mlp_model.trace(tiny_input):
        mlp_model.act.skip(mlp_model.act.input)
        out = mlp_model.output.save()
    assert calls == []  # a skipped module's forward does not run (its hooks still see the value)
    assert torch.equal(out, expected)


def test_mlp_edits_last_one_run(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    clean = tiny_mlp(tiny_input)
    with mlp_model.trace(tiny_input):
        mlp_model.layer1.output[:] = 0
    with mlp_model.trace(tiny_input):
        out = mlp_model.output.save()
    assert torch.equal(out, clean)
    assert "forward" not in tiny_mlp.layer1.__dict__  # wrappers are removed after the run
    assert torch.equal(tiny_mlp(tiny_input), clean)


# -- GPT-2 and Llama --------------------------------------------------------------------------


@pytest.fixture(params=["gpt2", "llama"])
def lm(request: pytest.FixtureRequest) -> interlace.LanguageModel:
    return request.getfixturevalue(request.param)


def _final(model: interlace.LanguageModel) -> torch.nn.Module:
    inner = model._module
    return inner.transformer.ln_f if hasattr(inner, "transformer") else inner.model.norm


def test_lm_saved_layer_outputs_and_logits_match_raw_hooks(lm: interlace.LanguageModel, et_prompt: str) -> None:
    raw = raw_layers(lm)
    seen: dict[int, Any] = {}
    with hooks(*[(layer, (lambda i: lambda m, a, o: seen.__setitem__(i, o))(i)) for i, layer in enumerate(raw)]):
        expected = lm._module(**encode(lm, et_prompt))

    with lm.trace(et_prompt):
        outs = interlace.save([layer.output for layer in layers(lm)])
        logits = lm.lm_head.output.save()
        result = lm.output.save()

    assert len(outs) == len(raw) >= 2
    for i, out in enumerate(outs):
        assert type(out) is type(seen[i])  # tuple or tensor, whatever the layer returns
        assert torch.equal(hidden(out), hidden(seen[i]))
    assert torch.equal(logits, expected.logits)
    assert torch.equal(result.logits, expected.logits)


def test_lm_inputs_match_raw_pre_hook(lm: interlace.LanguageModel, et_prompt: str) -> None:
    raw = raw_layers(lm)
    seen: dict[str, Any] = {}

    def pre(m: Any, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, kwargs

    with hooks((raw[1], pre), pre=True, with_kwargs=True):
        lm._module(**encode(lm, et_prompt))

    with lm.trace(et_prompt):
        args, kwargs = layers(lm)[1].inputs
        first = layers(lm)[1].input.save()
        args = interlace.save(args)
        kwargs = interlace.save(kwargs)

    assert len(args) == len(seen["args"])
    assert set(kwargs) == set(seen["kwargs"])
    assert torch.equal(first, seen["args"][0])
    assert torch.equal(args[0], seen["args"][0])
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, seen["kwargs"][key]), key


def test_lm_in_place_zero_matches_raw_hook(lm: interlace.LanguageModel, et_prompt: str) -> None:
    raw = raw_layers(lm)

    def zero(m: Any, a: Any, o: Any) -> None:
        hidden(o)[:] = 0

    with hooks((raw[0], zero)):
        expected = lm._module(**encode(lm, et_prompt)).logits
    with lm.trace(et_prompt):
        hidden(layers(lm)[0].output)[:] = 0
        logits = lm.lm_head.output.save()
    assert torch.equal(logits, expected)


def test_lm_replacement_matches_raw_hook(lm: interlace.LanguageModel, et_prompt: str) -> None:
    raw = raw_layers(lm)

    def double(m: Any, a: Any, o: Any) -> Any:
        return (o[0] * 2, *o[1:]) if isinstance(o, tuple) else o * 2

    with hooks((raw[0], double)):
        expected = lm._module(**encode(lm, et_prompt)).logits
    with lm.trace(et_prompt):
        out = layers(lm)[0].output
        layers(lm)[0].output = (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2
        logits = lm.lm_head.output.save()
    assert torch.equal(logits, expected)


def test_lm_input_and_inputs_set_match_raw_pre_hooks(lm: interlace.LanguageModel, et_prompt: str) -> None:
    raw = raw_layers(lm)

    def scale_first(m: Any, args: tuple, kwargs: dict) -> Any:
        return (args[0] * 0.5, *args[1:]), kwargs

    def add_one(m: Any, args: tuple, kwargs: dict) -> Any:
        return (args[0] + 1, *args[1:]), kwargs

    with hooks((raw[0], scale_first), (raw[1], add_one), pre=True, with_kwargs=True):
        expected = lm._module(**encode(lm, et_prompt)).logits

    with lm.trace(et_prompt):
        layers(lm)[0].input = layers(lm)[0].input * 0.5
        args, kwargs = layers(lm)[1].inputs
        layers(lm)[1].inputs = ((args[0] + 1, *args[1:]), kwargs)
        logits = lm.lm_head.output.save()
    assert torch.equal(logits, expected)


def test_lm_skip_matches_raw_hook(lm: interlace.LanguageModel, et_prompt: str, counter: Any) -> None:
    raw = raw_layers(lm)

    def identity(m: Any, args: tuple, kwargs: dict, o: Any) -> Any:
        return (args[0], *o[1:]) if isinstance(o, tuple) else args[0]

    with hooks((raw[1], identity), with_kwargs=True):
        expected = lm._module(**encode(lm, et_prompt)).logits

    mlp_calls = counter(raw[1].mlp)
    with lm.trace(et_prompt):
        layer = layers(lm)[1]
        h = layer.input
        layer.skip(h)
        logits = lm.lm_head.output.save()
    assert mlp_calls.calls == 0
    assert torch.equal(logits, expected)


def test_logit_lens_direct_submodule_call_equals_manual(gpt2: interlace.LanguageModel, et_prompt: str, counter: Any) -> None:
    inner = gpt2._module
    head_calls = counter(inner.lm_head)
    with gpt2.trace(et_prompt):
        h = hidden(gpt2.transformer.h[1].output)
        lens = gpt2.lm_head(gpt2.transformer.ln_f(h)).save()
        h1 = h.save()
        logits = gpt2.lm_head.output.save()
    assert head_calls.calls == 2  # the direct call and the model's own
    manual = inner.lm_head(inner.transformer.ln_f(h1))
    assert torch.equal(lens, manual)
    assert not torch.equal(lens, logits)  # the lens is layer 1, not the final layer
    assert torch.equal(logits, inner(**encode(gpt2, et_prompt)).logits)


def test_logit_lens_inside_trace_does_not_disturb_served_values(gpt2: interlace.LanguageModel, et_prompt: str) -> None:
    """Calling lm_head directly before the model reaches it must not count as its call."""
    with gpt2.trace(et_prompt):
        h = hidden(gpt2.transformer.h[0].output)
        lens = gpt2.lm_head(gpt2.transformer.ln_f(h)).save()
        logits = gpt2.lm_head.output.save()
    expected = gpt2._module(**encode(gpt2, et_prompt)).logits
    assert torch.equal(logits, expected)
    inner = gpt2._module
    raw: list[torch.Tensor] = []
    with hooks((inner.transformer.h[0], lambda m, a, o: raw.append(hidden(o)))):
        inner(**encode(gpt2, et_prompt))
    assert torch.allclose(lens, inner.lm_head(inner.transformer.ln_f(raw[0])), atol=1e-6)  # layer 0's lens


def test_saving_all_layers_by_comprehension(gpt2: interlace.LanguageModel, et_prompt: str) -> None:
    with gpt2.trace(et_prompt):
        outs = interlace.save([hidden(gpt2.transformer.h[i].output) for i in range(4)])
    raw: list[torch.Tensor] = []
    with hooks(*[(layer, lambda m, a, o: raw.append(hidden(o))) for layer in gpt2._module.transformer.h]):
        gpt2._module(**encode(gpt2, et_prompt))
    assert len(outs) == 4
    for a, b in zip(outs, raw):
        assert torch.equal(a, b)


def test_forward_signature_is_the_models_own_during_a_run(gpt2: interlace.LanguageModel) -> None:
    import inspect

    module = gpt2._module
    expected = inspect.signature(type(module).forward.__get__(module))
    with gpt2.trace("Hello"):
        during = interlace.save(inspect.signature(gpt2._module.forward))  # wrapped for the run
        logits = gpt2.lm_head.output.save()
    assert during == expected and "input_ids" in during.parameters
    assert "forward" not in module.__dict__ and logits.shape[0] == 1
