"""LanguageModel: meta loading, input forms, left padding, pad token, tokenizer options,
renames and the printed tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import interlace

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_gpt2(tiny_gpt2_path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_path)).eval()


@pytest.fixture(scope="module")
def hf_tok(tiny_gpt2_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_gpt2_path))


def _hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_meta_until_first_run_then_real_weights(tiny_gpt2_path: Path, hf_gpt2: Any, hf_tok: Any, et_prompt: str) -> None:
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    assert model.dispatched is False
    assert all(p.device.type == "meta" for p in model._module.parameters())
    # Module structure is browsable before loading.
    assert len(model.transformer.h) == 4
    with model.trace(et_prompt):
        logits = model.lm_head.output.save()
    assert model.dispatched is True
    assert all(p.device.type == "cpu" for p in model._module.parameters())
    assert torch.equal(logits[0], _hf_logits(hf_gpt2, hf_tok(et_prompt)["input_ids"]))


def test_dispatch_true_loads_at_once(tiny_gpt2_path: Path) -> None:
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    assert model.dispatched is True
    assert all(p.device.type == "cpu" for p in model._module.parameters())


def test_dispatch_is_idempotent_and_envoys_follow_new_module(tiny_gpt2_path: Path) -> None:
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    meta_h0 = model.transformer.h[0]
    model.dispatch()
    first = model._module
    model.dispatch()
    assert model._module is first
    assert model.transformer.h[0]._module is first.transformer.h[0]
    # An envoy taken before dispatch stands for the same path afterwards (nnsight's `_update`).
    assert meta_h0._module is first.transformer.h[0]


def test_pad_token_set_from_eos_where_missing(gpt2: interlace.LanguageModel, hf_tok: Any) -> None:
    assert hf_tok.pad_token is None  # the tokenizer on disk has none
    assert gpt2.tokenizer.pad_token == gpt2.tokenizer.eos_token
    assert gpt2.tokenizer.padding_side == "left"


def _input_forms(tok: Any) -> list[tuple[str, Any, list[list[int]]]]:
    a, b = "Hello world", "The Eiffel Tower is in the city of"
    ia, ib = tok(a)["input_ids"], tok(b)["input_ids"]
    padded = tok([a, b], padding=True, return_tensors="pt")
    return [
        ("str", a, [ia]),
        ("list[str]", [a, b], [ia, ib]),
        ("list[int]", ia, [ia]),
        ("list[list[int]]", [ia, ib], [ia, ib]),
        ("1-D tensor", torch.tensor(ib), [ib]),
        ("2-D tensor", torch.tensor([ib, ib]), [ib, ib]),
        ("dict", {"input_ids": torch.tensor([ia])}, [ia]),
        ("padded BatchEncoding", padded, [ia, ib]),
    ]


def test_every_input_form_equals_plain_hf(gpt2: interlace.LanguageModel, hf_gpt2: Any, hf_tok: Any) -> None:
    hf_tok.pad_token = hf_tok.eos_token
    for name, value, rows in _input_forms(hf_tok):
        with gpt2.trace(value):
            logits = gpt2.lm_head.output.save()
        assert logits.shape[0] == len(rows), name
        for i, ids in enumerate(rows):
            n = len(ids)
            torch.testing.assert_close(logits[i, -n:], _hf_logits(hf_gpt2, ids), rtol=0, atol=TOL, msg=name)
    hf_tok.pad_token = None


def test_input_ids_keyword(gpt2: interlace.LanguageModel, hf_gpt2: Any, hf_tok: Any) -> None:
    ids = hf_tok("Hello world")["input_ids"]
    with gpt2.trace(input_ids=torch.tensor([ids])):
        logits = gpt2.lm_head.output.save()
    assert torch.equal(logits[0], _hf_logits(hf_gpt2, ids))


def test_id_tensor_input_reaches_the_model_as_a_copy(gpt2: interlace.LanguageModel, hf_tok: Any) -> None:
    ids = torch.tensor([hf_tok("Hello world")["input_ids"]])
    before = ids.clone()
    with gpt2.trace(ids):
        args, kwargs = gpt2.inputs
        seen = interlace.save(kwargs["input_ids"])
        kwargs["input_ids"][:] = 0  # an edit of the model's input must not reach the caller's tensor
    assert torch.equal(ids, before)
    assert seen is not ids

    with gpt2.trace(ids.to(torch.int32)):  # any integer dtype; the model gets int64 ids
        args, kwargs = gpt2.inputs
        seen = interlace.save(kwargs["input_ids"])
    assert seen.dtype == torch.long and torch.equal(seen, before)


def test_id_tensor_and_text_invokes_pad_together(gpt2: interlace.LanguageModel, hf_gpt2: Any, hf_tok: Any) -> None:
    short, long = hf_tok("Hello")["input_ids"], hf_tok("The Eiffel Tower is in the city of")["input_ids"]
    with gpt2.trace() as tracer:
        with tracer.invoke(torch.tensor(short)):
            a = gpt2.lm_head.output.save()
        with tracer.invoke("The Eiffel Tower is in the city of"):
            b = gpt2.lm_head.output.save()
    assert a.shape[1] == b.shape[1] == len(long)
    torch.testing.assert_close(a[0, -len(short):], _hf_logits(hf_gpt2, short), rtol=0, atol=TOL)
    torch.testing.assert_close(b[0], _hf_logits(hf_gpt2, long), rtol=0, atol=TOL)


def test_left_padding_with_attention_mask(gpt2: interlace.LanguageModel, hf_tok: Any) -> None:
    short, long = "Hello", "The Eiffel Tower is in the city of"
    n_short, n_long = len(hf_tok(short)["input_ids"]), len(hf_tok(long)["input_ids"])
    with gpt2.trace([short, long]):
        args, kwargs = gpt2.inputs
        ids = interlace.save(kwargs["input_ids"])
        mask = interlace.save(kwargs["attention_mask"])
    pad = gpt2.tokenizer.pad_token_id
    assert ids.shape == mask.shape == (2, n_long)
    assert ids[0, : n_long - n_short].eq(pad).all()
    assert mask[0].tolist() == [0] * (n_long - n_short) + [1] * n_short
    assert mask[1].eq(1).all()
    assert ids[0, -n_short:].tolist() == hf_tok(short)["input_ids"]


def test_tokenizer_option_as_trace_kwarg_is_a_clear_error(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(interlace.TracingError, match="tokenizer_kwargs") as info:
        with gpt2.trace("Hello", return_length=True):
            gpt2.lm_head.output.save()
    assert "return_length" in str(info.value)
    with pytest.raises(interlace.TracingError, match="max_new_tokens"):
        with gpt2.generate("Hello", max_length=6):
            pass


def test_tokenizer_kwargs_reach_the_tokenizer(gpt2: interlace.LanguageModel, hf_gpt2: Any, hf_tok: Any) -> None:
    with gpt2.trace("Hello world", tokenizer_kwargs={"add_special_tokens": False}):
        logits = gpt2.lm_head.output.save()
    ids = hf_tok("Hello world", add_special_tokens=False)["input_ids"]
    assert torch.equal(logits[0], _hf_logits(hf_gpt2, ids))


def test_generate_matches_hf_and_steps_see_each_token(gpt2: interlace.LanguageModel, hf_gpt2: Any, hf_tok: Any) -> None:
    ids = hf_tok("Hello")["input_ids"]
    with gpt2.generate("Hello", max_new_tokens=4, do_sample=False) as tracer:
        toks = interlace.save([])
        for step in tracer.iter[:]:
            toks.append(gpt2.lm_head.output.argmax(-1)[:, -1])
        out = gpt2.generator.output.save()
    with torch.no_grad():
        expected = hf_gpt2.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=hf_tok.eos_token_id)
    assert torch.equal(out, expected)
    assert torch.equal(torch.stack(toks, dim=1), expected[:, len(ids):])


# -- renames and printing -------------------------------------------------------------------


def test_rename_path_alias_and_name_alias(tiny_gpt2_path: Path, hf_tok: Any) -> None:
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True, rename={"transformer.h": "layers", "mlp": "ffn"})
    with model.trace("Hello world"):
        via_alias = model.layers[1].ffn.output.save()
        via_real = model.transformer.h[1].mlp.output.save()
        block = model.layers[2].output.save()
    assert torch.equal(via_alias, via_real)
    assert model.layers[1].ffn._module is model._module.transformer.h[1].mlp
    assert model.layers[1].ffn.path == "model.transformer.h.1.mlp"
    raw: dict[str, Any] = {}
    handle = model._module.transformer.h[2].register_forward_hook(lambda m, a, o: raw.__setitem__("o", o))
    try:
        model._module(**hf_tok("Hello world", return_tensors="pt"))
    finally:
        handle.remove()
    assert torch.equal(block, raw["o"])


def test_rename_on_nnsight(tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    model = interlace.NNsight(tiny_mlp, rename={"layer1": "first"})
    with model.trace(tiny_input):
        h = model.first.output.save()
    assert torch.equal(h, tiny_mlp.layer1(tiny_input))


def test_print_shows_the_tree_with_aliases(tiny_gpt2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = interlace.LanguageModel(str(tiny_gpt2_path), rename={"transformer.h": "layers", "mlp": "ffn"})
    print(model)
    text = capsys.readouterr().out
    for name in ("GPT2LMHeadModel", "transformer", "GPT2Block", "lm_head", "ln_f", "wte"):
        assert name in text
    assert "mlp/ffn" in text
    assert "layers" in text
    assert text.count("GPT2Block") == 4
    assert repr(model.transformer.h[0]).startswith("GPT2Block(")
