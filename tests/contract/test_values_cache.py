"""Value codec: `tracer.cache()`'s Cache and Hugging Face model outputs travel as data."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from interlace.contract.errors import UnsupportedValueError, WireFormatError
from interlace.contract.values.decode import ValueDecoder
from interlace.contract.values.encode import ValueEncoder
from interlace.contract.wire.decode import decode_message
from interlace.contract.wire.encode import encode_message
from interlace.tracing.cache_entries import NOT_CACHED, Cache, CacheEntry

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def round_trip(value: Any) -> Any:
    """Python -> nodes -> bytes -> nodes -> Python, as a result travels (no extension)."""
    encoder = ValueEncoder()
    node = encoder.encode(value)
    msg = decode_message(encode_message("test", {"v": node}, encoder.tensors))
    return ValueDecoder(msg.tensors).decode(msg.body["v"])


def canon(v: Any) -> Any:
    """Exact about types and tensor bytes, including Cache/CacheEntry internals."""
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.shape), v.contiguous().view(-1).view(torch.uint8).tolist() if v.numel() else [])
    if type(v) is Cache:
        return ("cache", [(k, canon(x)) for k, x in dict.items(v)], v.root_aliases, v.name_aliases)
    if type(v) is CacheEntry:
        return ("entry", v.has_output and canon(v.output), v.has_inputs and canon(v.inputs))
    if type(v) in (list, tuple):
        return (type(v).__name__, [canon(x) for x in v])
    if type(v) is dict:
        return ("dict", [(k, canon(x)) for k, x in v.items()])
    return (type(v).__name__, v)


small_tensors = st.builds(
    lambda shape, seed: torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),
    st.lists(st.integers(1, 3), min_size=1, max_size=3), st.integers(0, 2**16),
)
outputs = small_tensors | st.tuples(small_tensors, small_tensors | st.none())
inputs = st.tuples(st.lists(small_tensors, max_size=2).map(tuple), st.dictionaries(st.sampled_from(["mask", "x"]), small_tensors, max_size=2))


def _entry(out: Any, inp: Any, which: str) -> CacheEntry:
    return CacheEntry(out if which != "in" else NOT_CACHED, inp if which != "out" else NOT_CACHED)


entries = st.builds(_entry, outputs, inputs, st.sampled_from(["out", "in", "both"]))
paths = st.lists(st.sampled_from(["0", "1", "h", "mlp", "attn", "ln_f"]), min_size=0, max_size=3).map(lambda p: ".".join(["model", *p]))
caches = st.builds(
    lambda items, roots, names: Cache(items, root_aliases=roots, name_aliases=names),
    st.dictionaries(paths, entries | st.lists(entries, min_size=1, max_size=3), max_size=4),
    st.dictionaries(st.sampled_from(["layers", "body"]), st.sampled_from(["transformer.h", "h"]), max_size=2),
    st.dictionaries(st.sampled_from(["ffn", "att"]), st.sampled_from(["mlp", "attn"]), max_size=2),
)


@FAST
@given(caches)
def test_caches_round_trip_exactly(cache: Cache) -> None:
    back = round_trip({"c": cache, "inside": [cache]})
    assert type(back["c"]) is Cache and back["c"] is not cache
    assert canon(back["c"]) == canon(cache)
    assert canon(back["inside"][0]) == canon(cache)


def test_decoded_cache_keeps_every_lookup() -> None:
    h0, mlp = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    cache = Cache({"model.transformer.h.0": CacheEntry(h0, ((h0 * 2,), {})),
                   "model.transformer.h.0.mlp": CacheEntry(mlp)},
                  root_aliases={"layers": "transformer.h"}, name_aliases={"ffn": "mlp"})
    back = round_trip(cache)
    assert torch.equal(back["model.transformer.h.0"].output, h0)
    assert torch.equal(back["transformer.h.0"].output, h0)
    assert torch.equal(back.model.transformer.h[0].output, h0)
    assert torch.equal(back.model.transformer["h.0"].input, h0 * 2)
    assert torch.equal(back.model.layers[0].ffn.output, mlp)
    assert torch.equal(back["model.layers.0.ffn"].output, mlp)
    assert back.model.transformer.h[0].mlp.input is None  # not cached: None, as in nnsight


def test_model_outputs_round_trip_as_their_class() -> None:
    out = CausalLMOutputWithPast(logits=torch.randn(1, 2, 5), hidden_states=(torch.randn(1, 2, 3),))
    back = round_trip({"o": out, "b": BaseModelOutputWithPast(last_hidden_state=torch.ones(1, 2))})
    assert type(back["o"]) is CausalLMOutputWithPast and list(back["o"].keys()) == ["logits", "hidden_states"]
    assert torch.equal(back["o"].logits, out.logits) and torch.equal(back["o"][0], out.logits)
    assert torch.equal(back["o"].hidden_states[0], out.hidden_states[0])
    assert type(back["b"]) is BaseModelOutputWithPast


def test_cache_with_foreign_items_is_refused_with_a_fix() -> None:
    cache = Cache({"model.x": CacheEntry(torch.ones(1))})
    dict.__setitem__(cache, "model.y", object())
    with pytest.raises(UnsupportedValueError, match=r"keep only what `tracer.cache\(\)` put in it"):
        ValueEncoder().encode(cache)


def _node(**fields: Any) -> dict:
    return {"$t": "cache", "items": [], "root_aliases": {}, "name_aliases": {}, **fields}


@pytest.mark.parametrize(
    "node, match",
    [
        (_node(items=[["model.x", 3]]), "must be a cacheentry"),
        (_node(items=[["model.x", {"$t": "cacheentry"}], ["model.x", {"$t": "cacheentry"}]]), "appears twice"),
        (_node(items=[[1, {"$t": "cacheentry"}]]), r"\[path string, entry\]"),
        (_node(root_aliases={"a": 1}), "alias strings"),
        ({"$t": "cache", "items": []}, "needs fields"),
        ({"$t": "cacheentry", "inputs": {"$t": "list", "items": []}}, r"\(tuple, dict\) pair"),
        ({"$t": "cacheentry", "bogus": 1}, "needs fields"),
        ({"$t": "hfoutput", "module": "os", "name": "system", "fields": {}}, "not a transformers ModelOutput"),
        ({"$t": "hfoutput", "module": "transformers.not_loaded_here", "name": "X", "fields": {}}, "not a transformers ModelOutput"),
        ({"$t": "hfoutput", "module": "transformers.modeling_outputs", "name": "BaseModelOutputWithPast",
          "fields": {"nope": 1}}, "has no fields"),
    ],
)
def test_decoder_rejects_bad_cache_and_output_nodes(node: Any, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        ValueDecoder({}).decode(node)


def test_result_warnings_travel_and_only_known_categories_are_rebuilt():
    """A job's engine warnings come back with its result and are raised on the client."""
    import warnings

    from interlace.errors import GenerationEndedWarning
    from interlace.contract.result import decode_result, encode_result

    class Strange(UserWarning):
        pass

    data = encode_result({"x": 1}, warnings=[(GenerationEndedWarning, "ended early"), (Strange, "odd")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert decode_result(data) == {"x": 1}
    assert [(w.category, str(w.message)) for w in caught] == [(GenerationEndedWarning, "ended early"), (UserWarning, "odd")]
