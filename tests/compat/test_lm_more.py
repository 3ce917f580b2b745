"""nnsight's `tests/test_lm.py`, second half (skip, cache, rename, miscellaneous), and the
`LanguageModel` input forms and tracing contexts nnsight documents (behaviour spec §1.3, §1.4).

Ported to the tiny GPT-2 (4 layers, width 128): a GPT-2 block returns a plain tensor with
transformers 5.x, so nnsight's `h[i].output[0]` (the old tuple's first element) is
`h[i].output` here, and counts of 12 layers are 4. Values are checked against the plain module
(raw hooks) or a separate plain trace.
"""

from __future__ import annotations

import pytest
import torch

import interlace

ET = "The Eiffel Tower is located in the city of"
MSG = "Madison Square Garden is located in the city of"
N_LAYERS = 4


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


@torch.no_grad()
def plain(model, prompts, **extra):
    """Logits of the plain module for a (left-padded) batch."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    e = dict(model.tokenizer(texts, return_tensors="pt", padding=True))
    e["position_ids"] = (e["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model._module(**e, **extra).logits


def plain_block_outputs(model, prompt):
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.clone()))
               for i, b in enumerate(model._module.transformer.h)]
    try:
        plain(model, prompt)
    finally:
        for h in handles:
            h.remove()
    return seen


# --- Skip ----------------------------------------------------------------------------------------

def test_basic_skip(gpt2, mode):
    with gpt2.trace("_", remote=mode):
        inp = gpt2.transformer.h[0].output.save()
        gpt2.transformer.h[1].skip(inp)
        out = gpt2.transformer.h[1].output.save()
    assert torch.equal(out[0], inp[0])


def test_skip_with_input_modification(gpt2, mode):
    with gpt2.trace("_", remote=mode):
        inp = gpt2.transformer.h[0].output.save()
        gpt2.transformer.h[1].inputs = ((torch.zeros_like(gpt2.transformer.h[1].input),)) + gpt2.transformer.h[1].inputs[1:]
        gpt2.transformer.h[1].skip(inp)
        out = gpt2.transformer.h[1].output.save()
    assert not torch.all(out[0] == 0)
    assert torch.equal(out[0], inp[0])


def test_multiple_skip(gpt2, mode):
    with gpt2.trace("_", remote=mode):
        inp = gpt2.transformer.h[0].output
        gpt2.transformer.h[1].skip(inp)
        inp_2 = gpt2.transformer.h[1].output
        gpt2.transformer.h[2].skip(inp_2)
        inp_3 = gpt2.transformer.h[2].output.save()
        gpt2.transformer.h[3].skip(inp_3)
        out = gpt2.transformer.h[3].output.save()
    assert torch.equal(out[0], inp_3[0])


def test_skip_inner_module_error(gpt2, raises_in_mode, mode):
    # nnsight: MissedProviderError (older versions: ValueError); the skipped block's attention never runs.
    with raises_in_mode(interlace.MissedProviderError, "attn"):
        with gpt2.trace("Hello World", remote=mode):
            inp = gpt2.transformer.h[0].output
            gpt2.transformer.h[1].skip(inp)
            hs = gpt2.transformer.h[1].attn.output.save()


def test_skip_batched(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(ET):
            inp = gpt2.transformer.h[0].output.save()
            gpt2.transformer.h[1].skip(inp)
            out = gpt2.transformer.h[1].output.save()
        with tracer.invoke(MSG):
            inp_2 = gpt2.transformer.h[0].output.save()
            gpt2.transformer.h[1].skip(inp_2)
            out_2 = gpt2.transformer.h[1].output.save()
    assert not torch.equal(out[0], out_2[0])
    assert torch.equal(out[0], inp[0])
    assert torch.equal(out_2[0], inp_2[0])


# --- Cache ---------------------------------------------------------------------------------------

def test_basic_cache(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache()
    assert cache["model.transformer.h.0"].output is not None
    assert cache["model.transformer.h.0"].inputs is None
    torch.testing.assert_close(cache["model.transformer.h.2"].output, plain_block_outputs(gpt2, MSG)[2])


# nnsight compares `output[0]` (the old tuple's hidden states) with `inputs[0][0]`; a block's
# output is that tensor itself with transformers 5.x.
def test_cache_output_and_inputs(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache(include_inputs=True)
    assert torch.equal(cache["model.transformer.h.0"].output, cache["model.transformer.h.1"].inputs[0][0])


def test_cache_inputs_only(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache(include_inputs=True, include_output=False)
    assert cache["model.transformer.h.0"].inputs is not None
    assert cache["model.transformer.h.0"].output is None


def test_cache_generation(gpt2, mode):
    with gpt2.generate(MSG, max_new_tokens=3, remote=mode) as tracer:
        cache = tracer.cache(modules=[gpt2.transformer.h[0].attn.c_attn])
    assert len(cache["model.transformer.h.0.attn.c_attn"]) == 3


def test_cache_with_intervention(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache()
        gpt2.transformer.h[0].attn.c_attn.output = torch.zeros_like(gpt2.transformer.h[0].attn.c_attn.output)
    assert torch.all(cache["model.transformer.h.0.attn.c_attn"].output == 0)


def test_cache_single_invoker(gpt2, mode):
    with gpt2.trace(remote=mode) as tracer:
        with tracer.invoke(MSG):
            pass
        with tracer.invoke(ET):
            cache = tracer.cache()
            attn_out = gpt2.transformer.h[0].attn.c_attn.output.cpu().save()
    assert torch.equal(cache["model.transformer.h.0.attn.c_attn"].output[0], attn_out[0])
    assert cache["model.transformer.h.0.attn.c_attn"].output.shape[0] == 1


def test_cache_after_intervention(gpt2, mode):
    # A cache made mid-run misses what already ran, and says so in every mode (the warning
    # travels back with a remote job's result).
    with pytest.warns(UserWarning, match="was created after model.transformer.wte"):
        with gpt2.trace(MSG, remote=mode) as tracer:
            gpt2.transformer.h[1].attn.c_attn.output = torch.zeros_like(gpt2.transformer.h[1].attn.c_attn.output)
            cache = tracer.cache(include_inputs=True)
    assert "model.transformer.h.0" not in cache
    assert cache["model.transformer"].inputs is None
    assert cache["model.transformer.h.1.attn.c_attn"].inputs is None
    assert torch.equal(cache["model.transformer.h.2"].output, cache["model.transformer.h.3"].inputs[0][0])
    assert not cache["model.transformer.h.1.attn.c_attn"].output.any()  # the cache sees the edit
    assert cache["model.transformer"].output is not None


def test_cache_skip(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache()
        out = gpt2.transformer.h[0].output.save()
        gpt2.transformer.h[1].skip(gpt2.transformer.h[0].output)
    assert torch.equal(cache["model.transformer.h.1"].output[0], out[0].cpu())
    assert "model.transformer.h.1.attn" not in cache


def test_cache_some_modules(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache(modules=["model.transformer.h.0", "model.transformer.h.1", "model.transformer.h.2"],
                             include_inputs=True)
    assert len(cache.keys()) == 3
    assert torch.equal(cache["model.transformer.h.0"].output, cache["model.transformer.h.1"].inputs[0][0])


def test_cache_some_modules_by_ref(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache(modules=[module for module in gpt2.transformer.h], include_inputs=True)
    assert len(cache.keys()) == N_LAYERS
    assert torch.equal(cache["model.transformer.h.0"].output, cache["model.transformer.h.1"].inputs[0][0])


def test_cache_some_modules_generation(gpt2, mode):
    with gpt2.generate(MSG, max_new_tokens=2, remote=mode) as tracer:
        cache = tracer.cache(modules=["model.transformer.h.0", "model.transformer.h.1", "model.transformer.h.2"])
    assert len(cache.keys()) == 3
    assert len(cache["model.transformer.h.0"]) == 2


def test_multiple_caches(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        attn_cache = tracer.cache(modules=[layer.attn for layer in gpt2.transformer.h])
        mlp_cache = tracer.cache(modules=[layer.mlp for layer in gpt2.transformer.h])
    assert len(attn_cache.keys()) == N_LAYERS
    assert len(mlp_cache.keys()) == N_LAYERS
    assert "model.transformer.h.0.attn" in attn_cache and "model.transformer.h.0.mlp" not in attn_cache
    assert "model.transformer.h.0.mlp" in mlp_cache and "model.transformer.h.0.attn" not in mlp_cache


def test_cache_attribute_access(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        modules = [layer for layer in gpt2.transformer.h] + [gpt2.lm_head]
        cache = tracer.cache(modules=modules)
    assert len(cache) == N_LAYERS + 1
    assert cache["model.transformer.h.0"].output is not None
    assert cache.model.transformer.h[0].output is not None
    assert cache.model.transformer["h.0"].output is not None
    assert torch.equal(cache["model.transformer.h.0"].output[0], cache.model.transformer.h[0].output[0])
    assert torch.equal(cache["model.transformer.h.0"].output[0], cache.model.transformer["h.0"].output[0])
    assert cache.model.lm_head.output is not None
    with pytest.raises(IndexError):
        cache.model.transformer.h[N_LAYERS]
    with pytest.raises(AttributeError):
        cache.model.transformer.h[0].mlp
    with pytest.raises(KeyError):
        cache.model.transformer[0]


def test_cache_no_entry_input(gpt2, mode):
    with gpt2.trace(MSG, remote=mode) as tracer:
        cache = tracer.cache(modules=[gpt2.transformer.h[0]])
    assert cache["model.transformer.h.0"].input is None


def test_cache_alias(tiny_gpt2_path):
    gpt2 = interlace.LanguageModel(str(tiny_gpt2_path),
                                   rename={"transformer": "model", "h.0": "first_layer", "1": "second_layer"})
    with gpt2.trace(MSG) as tracer:
        cache = tracer.cache()
    assert torch.equal(cache["model.transformer.h.0"].output[0], cache.model.model.first_layer.output[0])
    assert torch.equal(cache["model.transformer.h.1"].output[0], cache.model.model.h["second_layer"].output[0])
    assert torch.equal(cache.model.transformer.h[0].output[0], cache.model.model.first_layer.output[0])
    assert torch.equal(cache.model.transformer.h[1].output[0], cache.model.model.h["second_layer"].output[0])
    assert torch.equal(cache["model.model.first_layer"].output[0], cache.model.model.first_layer.output[0])
    assert torch.equal(cache["model.model.h.second_layer"].output[0], cache.model.model.h["second_layer"].output[0])


# --- Rename --------------------------------------------------------------------------------------

def test_rename_module(tiny_gpt2_path):
    gpt2 = interlace.LanguageModel(str(tiny_gpt2_path), rename={"mlp": "my_mlp"})
    with gpt2.trace(MSG):
        mlp_out_0 = gpt2.transformer.h[0].mlp.output.save()
        mlp_out_1 = gpt2.transformer.h[1].my_mlp.output.save()
    assert mlp_out_0 is not None and mlp_out_1 is not None
    assert not torch.equal(mlp_out_0, mlp_out_1)


def test_rename_path(tiny_gpt2_path):
    gpt2 = interlace.LanguageModel(str(tiny_gpt2_path), rename={"transformer.h.2.mlp": "my_mlp"})  # nnsight: h.3
    with gpt2.trace(MSG):
        mlp_out_0 = gpt2.transformer.h[0].mlp.output.save()
        mlp_out_2 = gpt2.transformer.h[2].mlp.output.save()
        my_mlp_out_2 = gpt2.my_mlp.output.save()
        mlp_out_3 = gpt2.transformer.h[3].mlp.output.save()
    assert mlp_out_0 is not None and mlp_out_3 is not None
    assert torch.equal(mlp_out_2, my_mlp_out_2)


@pytest.mark.parametrize("rename,path", [({".h": "layers"}, "transformer.layers"), ({"transformer.h": "layers"}, "layers")])
def test_rename_module_list(tiny_gpt2_path, rename, path):
    gpt2 = interlace.LanguageModel(str(tiny_gpt2_path), rename=rename)
    layers = gpt2.get(path)
    with gpt2.trace(MSG):
        mlp_out_0 = layers[0].mlp.output.save()
        mlp_out_1 = layers[1].mlp.output.save()
    with gpt2.trace(MSG):
        real_1 = gpt2.transformer.h[1].mlp.output.save()
    assert mlp_out_0 is not None and torch.equal(mlp_out_1, real_1)


def test_rename_module_list_attribute_spelling(tiny_gpt2_path):
    gpt2 = interlace.LanguageModel(str(tiny_gpt2_path), rename={".h": "layers"})
    with gpt2.trace(MSG):
        out = gpt2.transformer.layers[1].mlp.output.save()
    gpt2 = interlace.LanguageModel(str(tiny_gpt2_path), rename={"transformer.h": "layers"})
    with gpt2.trace(MSG):
        out_2 = gpt2.layers[1].mlp.output.save()
    assert torch.equal(out, out_2)


# --- Miscellaneous -------------------------------------------------------------------------------

def test_undispatched_generate_dispatches(tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=False)
    assert not model.dispatched
    with model.generate(MSG, max_new_tokens=1):
        output = model.generator.output.save()
    assert model.dispatched and output.shape[1] == len(model.tokenizer(MSG)["input_ids"]) + 1


def test_iter_with_streamer(gpt2, mode):
    with gpt2.generate(MSG, max_new_tokens=10, min_new_tokens=10, remote=mode) as tracer:
        hs = list()
        hs.save()
        strm = list()
        strm.save()
        with tracer.iter[2:6]:
            hs.append(gpt2.transformer.h[-2].output)
            strm.append(gpt2.generator.streamer.output)
        with tracer.iter[6:8]:
            hs.append(gpt2.transformer.h[-2].output)
            strm.append(gpt2.generator.streamer.output)
    assert len(hs) == 6
    assert len(strm) == 6


def test_iter_with_streamer_read_before(gpt2, mode):
    with gpt2.generate(MSG, max_new_tokens=10, min_new_tokens=10, remote=mode) as tracer:
        hs = list()
        hs.save()
        strm = list()
        strm.save()
        strm.append(gpt2.generator.streamer.output)
        with tracer.iter[2:6]:
            hs.append(gpt2.transformer.h[-2].output)
            strm.append(gpt2.generator.streamer.output)
        with tracer.iter[6:8]:
            hs.append(gpt2.transformer.h[-2].output)
            strm.append(gpt2.generator.streamer.output)
    assert len(hs) == 6
    assert len(strm) == 7


# --- LanguageModel inputs (§1.3) -----------------------------------------------------------------

def test_input_forms_equal_the_plain_model(gpt2, mode):
    text = "Hello world"
    ids = gpt2.tokenizer(text)["input_ids"]
    forms = [text, [text], ids, [ids], torch.tensor(ids), torch.tensor([ids]),
             dict(gpt2.tokenizer(text, return_tensors="pt")), gpt2.tokenizer(text, return_tensors="pt")]
    truth = plain(gpt2, text)
    for form in forms:
        with gpt2.trace(form, remote=mode):
            out = gpt2.lm_head.output.save()
        torch.testing.assert_close(out, truth, rtol=0, atol=1e-5)
    with gpt2.trace(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), remote=mode):
        out = gpt2.lm_head.output.save()
    torch.testing.assert_close(out, truth, rtol=0, atol=1e-5)


def test_text_labels_are_tokenized(gpt2, mode):
    text = "Hello world"
    ids = torch.tensor([gpt2.tokenizer(text)["input_ids"]])
    with gpt2.trace(text, labels=text, remote=mode):
        loss = gpt2.output.loss.save()
    with torch.no_grad():
        expected = gpt2._module(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected)


def test_zero_tokens_is_an_error(gpt2, raises_in_mode, mode):
    with raises_in_mode(interlace.TracingError, "zero tokens"):
        with gpt2.trace(torch.tensor([[]], dtype=torch.long), remote=mode):
            out = gpt2.lm_head.output.save()
