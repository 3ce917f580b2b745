"""nnsight habit: torch.nn.Module methods that return the module return the wrapper, so
`NNsight(net).to("cpu")` and `LanguageModel(path).eval()` are still wrappers that trace.

Truth: raw forward hooks on the module itself (or a separately loaded copy), with the same
method applied.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from interlace import LanguageModel, NNsight
from interlace.models.nnsight import SELF_RETURNING_METHODS

PROMPT = "The Eiffel Tower is in the city of"
SHORT = "Hello"

CPU_CALLS = {  # every self-returning method that can run on a CPU-only machine
    "to": (("cpu",), {}),
    "cpu": ((), {}),
    "type": ((torch.float64,), {}),
    "half": ((), {}),
    "float": ((), {}),
    "double": ((), {}),
    "bfloat16": ((), {}),
    "train": ((), {}),
    "eval": ((), {}),
    "requires_grad_": ((False,), {}),
    "apply": ((lambda m: None,), {}),
    "share_memory": ((), {}),
    "to_empty": ((), {"device": "cpu"}),
}


def test_every_self_returning_torch_method_is_covered():
    """The list matches torch: a method torch documents as returning the module is listed."""
    import inspect
    import typing

    returning_self = {
        name for name, fn in vars(torch.nn.Module).items()
        if callable(fn) and not name.startswith("_")
        and inspect.signature(fn).return_annotation is typing.Self
    } | {"to"}  # `to` has overloads, so no single annotation
    assert returning_self == set(SELF_RETURNING_METHODS)
    assert set(CPU_CALLS) <= returning_self


@pytest.mark.parametrize("name", sorted(CPU_CALLS))
def test_method_returns_the_wrapper_and_applies_to_the_module(tiny_mlp, name):
    model = NNsight(tiny_mlp)
    args, kwargs = CPU_CALLS[name]
    expected = getattr(torch.nn.Sequential(torch.nn.Linear(2, 2)), name)(*args, **kwargs)  # torch: returns self
    assert isinstance(expected, torch.nn.Sequential)
    assert getattr(model, name)(*args, **kwargs) is model
    weight = tiny_mlp[0].weight
    if name in ("half", "double", "bfloat16", "type"):
        assert weight.dtype == {"half": torch.float16, "double": torch.float64, "bfloat16": torch.bfloat16,
                                "type": torch.float64}[name]
    if name == "train":
        assert tiny_mlp.training
    if name == "eval":
        assert not tiny_mlp.training
    if name == "requires_grad_":
        assert not any(p.requires_grad for p in tiny_mlp.parameters())


def test_chained_wrapper_still_traces(tiny_mlp, tiny_input):
    """`NNsight(net).to("cpu").eval().double()` is the same NNsight; a trace of it reads and
    edits the double-precision module (truth: raw hooks on the module)."""
    model = NNsight(tiny_mlp).to("cpu").eval().double()
    assert isinstance(model, NNsight) and tiny_mlp[0].weight.dtype is torch.float64
    x = tiny_input.double()
    scale = torch.linspace(0.5, 2.0, tiny_mlp[0].out_features, dtype=torch.float64)
    with model.trace(x):
        model[0].output[:] = model[0].output * scale
        hidden = model[1].output.save()
        out = model.output.save()

    seen = {}
    h0 = tiny_mlp[0].register_forward_hook(lambda m, a, o: o * scale)
    h1 = tiny_mlp[1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o.clone()))
    try:
        with torch.no_grad():
            true_out = tiny_mlp(x)
    finally:
        h0.remove()
        h1.remove()
    assert out.dtype is torch.float64
    torch.testing.assert_close(hidden, seen["h"], rtol=0, atol=0)
    torch.testing.assert_close(out, true_out, rtol=0, atol=0)


def test_methods_returning_none_still_pass_through(tiny_mlp):
    model = NNsight(tiny_mlp)
    assert model.zero_grad() is None  # as torch: not a self-returning method
    assert isinstance(model.state_dict(), dict)


# -- LanguageModel: before the weights exist, and after ----------------------------------------


@pytest.fixture(scope="module")
def raw_double(tiny_gpt2_path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_path)).double().eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_gpt2_path))


def test_language_model_methods_before_dispatch_wait_for_the_weights(tiny_gpt2_path, raw_double):
    """On a lazily loaded model, `.to("cpu")`, `.double()`, `.train()` return the wrapper
    without loading; the weights get them when they load (in order), so the trace runs the
    double-precision model in train mode."""
    model = LanguageModel(str(tiny_gpt2_path))
    assert model.to("cpu").double().train() is model
    assert not model.dispatched  # still lazy
    assert next(model._module.parameters()).dtype is torch.float64  # the meta module took the dtype
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    assert model.dispatched
    assert model._module.training
    assert next(model._module.parameters()).dtype is torch.float64
    raw, tokenizer = raw_double
    raw.train()  # GPT-2 dropout is 0 in the tiny model's config, so train mode is deterministic
    try:
        with torch.no_grad():
            expected = raw(**tokenizer(PROMPT, return_tensors="pt")).logits
    finally:
        raw.eval()
    assert logits.dtype is torch.float64
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


def test_language_model_methods_after_dispatch(tiny_gpt2_path, raw_double, mode):
    """`.eval().double()` on a loaded model: the same wrapper, and every mode traces it
    (the server runs its own float32 copy, so compare there with float tolerance)."""
    model = LanguageModel(str(tiny_gpt2_path), dispatch=True)
    assert model.eval().double() is model
    raw, tokenizer = raw_double
    for prompt in (PROMPT, SHORT):
        with model.trace(prompt, remote=mode):
            hidden = model.transformer.h[1].output.save()
        seen = {}
        handle = raw.transformer.h[1].register_forward_hook(lambda m, a, o: seen.setdefault("h", o.clone()))
        try:
            with torch.no_grad():
                raw(**tokenizer(prompt, return_tensors="pt"))
        finally:
            handle.remove()
        if mode is True:
            torch.testing.assert_close(hidden.double(), seen["h"], rtol=0, atol=1e-5)
        else:
            assert hidden.dtype is torch.float64
            torch.testing.assert_close(hidden, seen["h"], rtol=0, atol=1e-10)
