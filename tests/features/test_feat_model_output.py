"""`output = model.output.save()` (nnsight's everyday idiom) and `tracer.result` come back whole
in every mode: logits, and the key/value cache as a transformers DynamicCache."""

from __future__ import annotations

import pytest
import torch

from interlace.contract.errors import WireFormatError
from interlace.contract.values.decode import ValueDecoder

PROMPT = "The Eiffel Tower is in the city of"


def plain_forward(model):
    with torch.no_grad():
        return model._module(**model.tokenizer(PROMPT, return_tensors="pt"), use_cache=True)


def assert_same_output(saved, expected):
    assert type(saved) is type(expected)
    assert torch.allclose(saved.logits, expected.logits, atol=1e-5)
    cache, truth = saved.past_key_values, expected.past_key_values
    assert type(cache) is type(truth) and len(cache.layers) == len(truth.layers)
    for mine, theirs in zip(cache.layers, truth.layers):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-5) and torch.allclose(mine.values, theirs.values, atol=1e-5)
    assert cache.get_seq_length() == truth.get_seq_length()


def test_the_whole_model_output_comes_back(feat_gpt2, mode):
    with feat_gpt2.trace(PROMPT, remote=mode):
        output = feat_gpt2.output.save()
    assert_same_output(output, plain_forward(feat_gpt2))


def test_tracer_result_comes_back(feat_gpt2, mode):
    with feat_gpt2.trace(PROMPT, remote=mode) as tracer:
        result = tracer.result.save()
    assert_same_output(result, plain_forward(feat_gpt2))


@pytest.mark.parametrize("layers", [[[1, 2]], "x", [[{"$t": "tensor", "name": "k"}]], [[1, {"$t": "tensor", "name": "k"}]]])
def test_a_malformed_kv_cache_is_a_wire_error(layers):
    decoder = ValueDecoder({"k": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(WireFormatError):
        decoder.decode({"$t": "kvcache", "layers": layers})
