"""`model.generate(...)` without `max_new_tokens` follows the generation config as Hugging
Face does, and step loops cover exactly the steps that run, in all three modes.

The truth is Hugging Face's own `generate` on the plain model (`output_logits=True`): the
same tokens, and one step-loop iteration per logits entry it returns.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import GenerationConfig

import interlace

A = "The Eiffel Tower is in the city of"
B = "Madison Square Garden is"


def hf_generate(model, prompts, **kwargs):
    tok = model.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's "model-agnostic default max_length" notice
        return model._module.generate(**enc, pad_token_id=tok.pad_token_id, output_logits=True,
                                      return_dict_in_generate=True, **kwargs)


def steps_and_ids(model, mode, prompts, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model.generate(remote=mode, **kwargs) as tracer:
            with tracer.invoke(prompts[0]):
                logits = list().save()
                for step in tracer.iter[:]:
                    logits.append(model.lm_head.output[:, -1].clone())
                after = list().save()
                after.append("ran")
            for prompt in prompts[1:]:
                with tracer.invoke(prompt):
                    pass
            with tracer.invoke():
                ids = model.generator.output.save()
    return logits, ids, after


@pytest.mark.parametrize("prompts", [[A], [A, B]], ids=["one", "two-invokes"])
def test_default_length_matches_hf(feat_gpt2, mode, prompts):
    truth = hf_generate(feat_gpt2, prompts)
    logits, ids, after = steps_and_ids(feat_gpt2, mode, prompts)
    assert torch.equal(ids, truth.sequences)
    assert len(logits) == len(truth.logits) == truth.sequences.shape[1] - len(feat_gpt2.tokenizer(prompts, padding=True)["input_ids"][0])
    for mine, theirs in zip(logits, truth.logits):
        assert torch.allclose(mine, theirs[0:1], atol=1e-5)  # the first invoke's row at each step
    assert after == ["ran"]  # the loop ended where generation ended and the code after it ran


def test_tracer_all_covers_the_default_steps(feat_gpt2, mode):
    truth = hf_generate(feat_gpt2, [A])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with feat_gpt2.generate(A, remote=mode) as tracer:
            tokens = list().save()
            for step in tracer.all():
                tokens.append(int(feat_gpt2.lm_head.output[0, -1].argmax()))
    n = feat_gpt2.tokenizer(A, return_tensors="pt")["input_ids"].shape[1]
    assert tokens == truth.sequences[0, n:].tolist()


@pytest.mark.parametrize("config", [dict(max_new_tokens=3), dict(max_length=14)], ids=["max_new_tokens", "max_length"])
def test_the_models_generation_config_is_followed(tiny_gpt2_path, mode, config):
    if mode is True:
        pytest.skip("the server's model keeps the generation config it was loaded with; set here, it is the client's")
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    for key, value in config.items():
        setattr(model._module.generation_config, key, value)
    truth = hf_generate(model, [A, B])
    logits, ids, _ = steps_and_ids(model, mode, [A, B])
    assert torch.equal(ids, truth.sequences)
    assert len(logits) == len(truth.logits)
    expected = 3 if "max_new_tokens" in config else 14 - len(model.tokenizer([A, B], padding=True)["input_ids"][0])
    assert len(logits) == expected


def test_a_generation_config_argument_is_followed(feat_gpt2):
    config = copy.deepcopy(feat_gpt2._module.generation_config)
    config.max_new_tokens = 4
    truth = hf_generate(feat_gpt2, [A], generation_config=config)
    logits, ids, _ = steps_and_ids(feat_gpt2, False, [A], generation_config=config)
    assert torch.equal(ids, truth.sequences) and len(logits) == len(truth.logits) == 4


def test_explicit_max_new_tokens_still_wins(feat_gpt2, mode):
    truth = hf_generate(feat_gpt2, [A], max_new_tokens=2)
    logits, ids, _ = steps_and_ids(feat_gpt2, mode, [A], max_new_tokens=2)
    assert torch.equal(ids, truth.sequences) and len(logits) == len(truth.logits) == 2


def test_default_is_capped_at_the_models_positions(tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    n = model.tokenizer(A, return_tensors="pt")["input_ids"].shape[1]
    positions = model._module.config.max_position_embeddings
    from interlace.models.generation import generation_steps

    assert generation_steps(model, {}, n) == min(20, positions - n)
    assert generation_steps(model, {}, positions - 5) == 5
    assert generation_steps(model, {"generation_config": GenerationConfig(max_length=n + 7)}, n) == 7
