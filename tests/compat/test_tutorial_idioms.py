"""Idioms from nnsight's public tutorials (the walkthrough and the feature pages), written the
way researchers write them, each run in every mode and checked against an independent truth:
raw torch hooks on the plain module (`model._module`) or torch.autograd.

Ported to the tiny GPT-2 (4 layers, width 128, vocab 512): with transformers 5.x a GPT-2 block
returns a plain tensor, so the tutorials' `h[i].output[0]` is `h[i].output` here.
"""

from __future__ import annotations

import pytest
import torch

import interlace

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "Madison Square Garden is located in the city of"
CLEAN, CORRUPT = "The Eiffel Tower is in", "The Colosseum is in"  # the same number of tokens


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


# --- Independent truth: the plain module under raw hooks ---------------------------------------

@torch.no_grad()
def raw(model, prompts, capture=(), edits=None, inputs=None):
    """(logits, {name: output}) of the plain module for `prompts`, with hooks: `edits` maps a
    module name to fn(output) -> new output; `capture` names modules whose output to record."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if inputs is None:
        enc = dict(model.tokenizer(texts, return_tensors="pt", padding=True))
        enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    else:
        enc = inputs
    seen, handles = {}, []
    names = set(capture) | set(edits or {})
    for name in names:
        def hook(mod, args, out, name=name):
            if edits and name in edits:
                out = edits[name](out.clone())
            seen[name] = out.clone() if isinstance(out, torch.Tensor) else out
            return out
        handles.append(model._module.get_submodule(name).register_forward_hook(hook))
    try:
        logits = model._module(**enc).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def n_layers(model):
    return len(model._module.transformer.h)


# Helper functions defined in the test file, used inside bodies (they travel by source remotely).

def last_token_logits(m):
    return m.lm_head.output[:, -1, :]


def steer(hidden, vector, scale=2.0):
    return hidden + scale * vector


# --- Reading ------------------------------------------------------------------------------------

def test_read_hidden_states(model, mode):
    with model.trace(PROMPT, remote=mode):
        hidden = model.transformer.h[-1].output.save()
    _, seen = raw(model, PROMPT, capture=["transformer.h.3"])
    assert torch.allclose(hidden, seen["transformer.h.3"], atol=1e-5)


def test_model_output_save_and_logits(model, mode):
    with model.trace(PROMPT, remote=mode):
        output = model.output.save()
    logits, _ = raw(model, PROMPT)
    assert torch.allclose(output.logits, logits, atol=1e-5)
    assert torch.allclose(output["logits"], logits, atol=1e-5)


def test_tracer_result(model, mode):
    with model.trace(PROMPT, remote=mode) as tracer:
        result = tracer.result.save()
    logits, _ = raw(model, PROMPT)
    assert torch.allclose(result.logits, logits, atol=1e-5)


def test_softmax_argmax_decoding(model, mode):
    with model.trace(PROMPT, remote=mode):
        probs = torch.nn.functional.softmax(model.lm_head.output[0, -1], dim=-1).save()
        token = model.lm_head.output.argmax(dim=-1)[0, -1].save()
    logits, _ = raw(model, PROMPT)
    assert torch.allclose(probs, logits[0, -1].softmax(-1), atol=1e-5)
    assert int(token) == int(logits[0, -1].argmax())
    assert isinstance(model.tokenizer.decode(token), str)
    assert model.tokenizer.decode(token) == model.tokenizer.decode(int(logits[0, -1].argmax()))


def test_output_logits_argmax_after_trace(model, mode):
    with model.trace(PROMPT, remote=mode):
        out = model.output.save()
    ids = out.logits.argmax(dim=-1)
    decoded = model.tokenizer.decode(ids[0][-1])
    logits, _ = raw(model, PROMPT)
    assert decoded == model.tokenizer.decode(logits[0, -1].argmax())


def test_topk_inside_body(model, mode):
    with model.trace(PROMPT, remote=mode):
        top = model.lm_head.output[0, -1].topk(5).indices.save()
    logits, _ = raw(model, PROMPT)
    assert top.tolist() == logits[0, -1].topk(5).indices.tolist()


def test_helper_function_in_body(model, mode):
    with model.trace(PROMPT, remote=mode):
        last = last_token_logits(model).save()
    logits, _ = raw(model, PROMPT)
    assert torch.allclose(last, logits[:, -1], atol=1e-5)


def test_model_config_and_layer_count(model, mode):
    assert len(model.transformer.h) == n_layers(model)
    assert model.config.n_layer == n_layers(model)
    with model.trace(PROMPT, remote=mode):
        outs = interlace.save([])
        for i in range(len(model.transformer.h)):
            outs.append(model.transformer.h[i].output.mean())
    _, seen = raw(model, PROMPT, capture=[f"transformer.h.{i}" for i in range(n_layers(model))])
    assert len(outs) == n_layers(model)
    for i, v in enumerate(outs):
        assert torch.allclose(v, seen[f"transformer.h.{i}"].mean(), atol=1e-5)


def test_iterate_layers(model, mode):
    with model.trace(PROMPT, remote=mode):
        norms = interlace.save([])
        for layer in model.transformer.h:
            norms.append(layer.output.norm())
    _, seen = raw(model, PROMPT, capture=[f"transformer.h.{i}" for i in range(n_layers(model))])
    assert [round(float(n.detach()), 3) for n in norms] == [round(float(seen[f"transformer.h.{i}"].norm()), 3)
                                                   for i in range(n_layers(model))]


def test_saved_dict_of_values(model, mode):
    with model.trace(PROMPT, remote=mode):
        acts = interlace.save({})
        for i, layer in enumerate(model.transformer.h):
            acts[i] = layer.output[0, -1]
    _, seen = raw(model, PROMPT, capture=[f"transformer.h.{i}" for i in range(n_layers(model))])
    assert sorted(acts) == list(range(n_layers(model)))
    for i in acts:
        assert torch.allclose(acts[i], seen[f"transformer.h.{i}"][0, -1], atol=1e-5)


def test_input_and_inputs_reads(model, mode):
    with model.trace(PROMPT, remote=mode):
        prev = model.transformer.h[1].output.save()
        x = model.transformer.h[2].input.save()
        args_kwargs = model.transformer.h[2].inputs.save()
    assert torch.equal(x, args_kwargs[0][0])
    assert isinstance(args_kwargs[1], dict)
    assert torch.allclose(x, prev, atol=1e-6)


def test_mlp_and_attention_submodules(model, mode):
    with model.trace(PROMPT, remote=mode):
        attn = model.transformer.h[0].attn.output[0].save()
        mlp = model.transformer.h[0].mlp.output.save()
    _, seen = raw(model, PROMPT, capture=["transformer.h.0.mlp"])
    assert torch.allclose(mlp, seen["transformer.h.0.mlp"], atol=1e-5)
    assert attn.shape[-1] == model.config.n_embd


def test_logit_lens(model, mode):
    with model.trace(PROMPT, remote=mode):
        lens = interlace.save([])
        for layer in model.transformer.h:
            logits = model.lm_head(model.transformer.ln_f(layer.output))
            lens.append(logits[0, -1].argmax(dim=-1))
    _, seen = raw(model, PROMPT, capture=[f"transformer.h.{i}" for i in range(n_layers(model))])
    m = model._module
    with torch.no_grad():
        want = [int(m.lm_head(m.transformer.ln_f(seen[f"transformer.h.{i}"]))[0, -1].argmax())
                for i in range(n_layers(model))]
    assert [int(t) for t in lens] == want


def test_print_inside_body(model, mode, capsys, monkeypatch):
    # Remotely a body's print() comes back as the job's LOG lines, shown with the status display.
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", True)
    with model.trace(PROMPT, remote=mode):
        print("shape", model.transformer.h[0].output.shape)
    out = capsys.readouterr().out
    assert "shape" in out and "128" in out


def test_conditional_in_body(model, mode):
    with model.trace(PROMPT, remote=mode):
        hidden = model.transformer.h[0].output
        if hidden.norm() > 0:
            flag = interlace.save(1)
        else:
            flag = interlace.save(0)
        total = interlace.save([])
        for i in range(3):
            if i % 2 == 0:
                total.append(model.transformer.h[i].output.sum())
    assert flag == 1
    assert len(total) == 2


# --- Editing ------------------------------------------------------------------------------------

def test_zero_last_position(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[1].output[:, -1] = 0
        after = model.transformer.h[1].output.save()
        logits = model.lm_head.output.save()

    def edit(o):
        o[:, -1] = 0
        return o
    want, _ = raw(model, PROMPT, edits={"transformer.h.1": edit})
    assert torch.all(after[:, -1] == 0)
    assert torch.allclose(logits, want, atol=1e-5)


def test_before_clone_after(model, mode):
    with model.trace(PROMPT, remote=mode):
        before = model.transformer.h[0].output.clone().save()
        model.transformer.h[0].output[:] = 0
        after = model.transformer.h[0].output.save()
    _, seen = raw(model, PROMPT, capture=["transformer.h.0"])
    assert torch.allclose(before, seen["transformer.h.0"], atol=1e-5)
    assert torch.all(after == 0)


def test_steering_plus_equals(model, mode):
    torch.manual_seed(0)
    vec = torch.randn(128)
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[2].output[:] += vec
        logits = model.lm_head.output.save()
    want, _ = raw(model, PROMPT, edits={"transformer.h.2": lambda o: o + vec})
    assert torch.allclose(logits, want, atol=1e-4)


def test_steering_whole_output_replacement_with_helper(model, mode):
    torch.manual_seed(1)
    vec = torch.randn(128)
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[1].output = steer(model.transformer.h[1].output, vec)
        logits = model.lm_head.output.save()
    want, _ = raw(model, PROMPT, edits={"transformer.h.1": lambda o: o + 2.0 * vec})
    assert torch.allclose(logits, want, atol=1e-4)


def test_mlp_output_scaling(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[0].mlp.output *= 0.5
        logits = model.lm_head.output.save()
    want, _ = raw(model, PROMPT, edits={"transformer.h.0.mlp": lambda o: o * 0.5})
    assert torch.allclose(logits, want, atol=1e-4)


def test_input_write(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[2].input = model.transformer.h[2].input * 0
        logits = model.lm_head.output.save()
    with model.trace(PROMPT, remote=False):
        model.transformer.h[1].output[:] = 0
        want = model.lm_head.output.save()
    assert torch.allclose(logits, want, atol=1e-5)


def test_skip_layer(model, mode):
    with model.trace(PROMPT, remote=mode):
        h0 = model.transformer.h[0].output
        model.transformer.h[1].skip(h0)
        h1 = model.transformer.h[1].output.save()
        logits = model.lm_head.output.save()
    _, seen = raw(model, PROMPT, capture=["transformer.h.0"])
    want, _ = raw(model, PROMPT, edits={"transformer.h.1": lambda o: seen["transformer.h.0"]})
    assert torch.allclose(h1, seen["transformer.h.0"], atol=1e-5)
    assert torch.allclose(logits, want, atol=1e-4)


def test_stop_early(model, mode):
    with model.trace(PROMPT, remote=mode) as tracer:
        h0 = model.transformer.h[0].output.save()
        tracer.stop()
    _, seen = raw(model, PROMPT, capture=["transformer.h.0"])
    assert torch.allclose(h0, seen["transformer.h.0"], atol=1e-5)


# --- Inputs -------------------------------------------------------------------------------------

def test_token_id_tensor_input(model, mode):
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with model.trace(ids, remote=mode):
        logits = model.lm_head.output.save()
    want, _ = raw(model, PROMPT)
    assert torch.allclose(logits, want, atol=1e-5)


def test_token_id_list_input(model, mode):
    ids = model.tokenizer(PROMPT)["input_ids"]
    with model.trace(ids, remote=mode):
        logits = model.lm_head.output.save()
    want, _ = raw(model, PROMPT)
    assert torch.allclose(logits, want, atol=1e-5)


def test_batched_list_prompt(model, mode):
    with model.trace([PROMPT, OTHER], remote=mode):
        hidden = model.transformer.h[0].output.save()
        logits = model.lm_head.output.save()
    want, _ = raw(model, [PROMPT, OTHER])
    assert logits.shape[0] == 2 and hidden.shape[0] == 2
    assert torch.allclose(logits[:, -1], want[:, -1], atol=1e-4)


def test_invoker_inputs_decode(model, mode):
    with model.trace(remote=mode) as tracer:
        with tracer.invoke(PROMPT) as invoker:
            ids = invoker.inputs[1]["input_ids"].save()
    assert model.tokenizer.decode(ids[0]) == PROMPT


# --- Invokes and patching -----------------------------------------------------------------------

def test_two_invokes_separate_rows(model, mode):
    with model.trace(remote=mode) as tracer:
        with tracer.invoke(PROMPT):
            a = model.lm_head.output[:, -1].save()
        with tracer.invoke(OTHER):
            b = model.lm_head.output[:, -1].save()
    wa, _ = raw(model, PROMPT)
    wb, _ = raw(model, OTHER)
    assert torch.allclose(a, wa[:, -1], atol=1e-4)
    assert torch.allclose(b, wb[:, -1], atol=1e-4)


def test_cross_invoke_patching(model, mode):
    clean, corrupt = "The Eiffel Tower is in", "The Colosseum is in"
    n = len(model.tokenizer(corrupt)["input_ids"])
    assert n == len(model.tokenizer(clean)["input_ids"])
    # Both invokes touch h[1], so (as in nnsight) a barrier makes the first wait for the second.
    with model.trace(remote=mode) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(clean):
            clean_h = model.transformer.h[1].output[:, -1].clone()
            barrier()
        with tracer.invoke(corrupt):
            barrier()
            model.transformer.h[1].output[:, -1] = clean_h
            patched = model.lm_head.output[:, -1].save()
    _, seen = raw(model, clean, capture=["transformer.h.1"])

    def edit(o):
        o[:, -1] = seen["transformer.h.1"][:, -1]
        return o
    want, _ = raw(model, corrupt, edits={"transformer.h.1": edit})
    assert torch.allclose(patched, want[:, -1], atol=1e-4)


def test_empty_invoke_sees_whole_batch(model, mode):
    with model.trace(remote=mode) as tracer:
        with tracer.invoke(PROMPT):
            pass
        with tracer.invoke(OTHER):
            pass
        with tracer.invoke():
            everything = model.lm_head.output.save()
    assert everything.shape[0] == 2


def test_patching_loop_over_layers(model, mode):
    clean, corrupt = "The Eiffel Tower is in", "The Colosseum is in"
    results = {}
    for layer in range(n_layers(model)):
        with model.trace(remote=mode) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(clean):
                h = model.transformer.h[layer].output[:, -1].clone()
                barrier()
            with tracer.invoke(corrupt):
                barrier()
                model.transformer.h[layer].output[:, -1] = h
                top = model.lm_head.output[0, -1].argmax().save()
        # (Bound to a name, then stored: as in nnsight, mutating an outer dict inside a remote
        # body changes only the server's copy.)
        results[layer] = top
    clean_logits, _ = raw(model, clean)
    # patching the last layer's last position restores the clean prediction
    assert int(results[n_layers(model) - 1]) == int(clean_logits[0, -1].argmax())


# --- Gradients ----------------------------------------------------------------------------------

def test_backward_and_grad(model, mode):
    with model.trace(PROMPT, remote=mode):
        hidden = model.transformer.h[1].output
        hidden.requires_grad_(True)
        logits = model.lm_head.output
        loss = logits[0, -1].max()
        with loss.backward():
            grad = hidden.grad.save()
        saved_h = hidden.save()
    m = model._module
    captured = {}

    def hook(mod, args, out):
        out = out.detach().requires_grad_(True)
        captured["h"] = out
        return out
    handle = m.transformer.h[1].register_forward_hook(hook)
    try:
        enc = dict(model.tokenizer(PROMPT, return_tensors="pt"))
        out = m(**enc).logits
    finally:
        handle.remove()
    (want,) = torch.autograd.grad(out[0, -1].max(), captured["h"])
    assert torch.allclose(grad, want, atol=1e-5)
    assert saved_h.shape == grad.shape


# --- Generation ---------------------------------------------------------------------------------

def hf_generate(model, prompt, n):
    enc = model.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model._module.generate(**enc, max_new_tokens=n, do_sample=False,
                                      pad_token_id=model.tokenizer.eos_token_id)


def test_generate_generator_output(model, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode):
        out = model.generator.output.save()
    assert torch.equal(out, hf_generate(model, PROMPT, 3))
    assert isinstance(model.tokenizer.decode(out[0]), str)


def test_generate_iter_collects_tokens(model, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode) as tracer:
        tokens = interlace.save([])
        for step in tracer.iter[:]:
            tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
        out = model.generator.output.save()
    want = hf_generate(model, PROMPT, 3)
    assert [int(t) for t in tokens] == want[0, -3:].tolist()
    assert torch.equal(out, want)


def test_generate_all_steering(model, mode):
    torch.manual_seed(2)
    vec = torch.randn(128) * 4
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode) as tracer:
        with tracer.all():
            model.transformer.h[2].output[:] += vec
        out = model.generator.output.save()
    m = model._module
    handle = m.transformer.h[2].register_forward_hook(lambda mod, a, o: o + vec)
    try:
        want = hf_generate(model, PROMPT, 3)
    finally:
        handle.remove()
    assert torch.equal(out, want)


def test_generate_hidden_per_step_shapes(model, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode) as tracer:
        shapes = interlace.save([])
        with tracer.iter[:]:
            shapes.append(model.transformer.h[0].output.shape[1])
    n = len(model.tokenizer(PROMPT)["input_ids"])
    assert list(shapes) == [n, 1, 1]


def test_generate_output_decode_after(model, mode):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False, remote=mode):
        out = model.generator.output.save()
    text = model.tokenizer.batch_decode(out)
    assert text == model.tokenizer.batch_decode(hf_generate(model, PROMPT, 2))


# --- Sessions and cache -------------------------------------------------------------------------

def test_session_values_flow(model, mode):
    with model.session(remote=mode):
        with model.trace(PROMPT):
            h = model.transformer.h[0].output
        with model.trace(OTHER):
            model.transformer.h[0].output[:, -1] = h[:, -1]
            logits = model.lm_head.output.save()
    _, seen = raw(model, PROMPT, capture=["transformer.h.0"])

    def edit(o):
        o[:, -1] = seen["transformer.h.0"][:, -1]
        return o
    want, _ = raw(model, OTHER, edits={"transformer.h.0": edit})
    assert torch.allclose(logits, want, atol=1e-4)


def test_session_saved_list_across_traces(model, mode):
    with model.session(remote=mode):
        means = interlace.save([])
        for prompt in (PROMPT, OTHER):
            with model.trace(prompt):
                means.append(model.transformer.h[-1].output.mean())
    _, a = raw(model, PROMPT, capture=["transformer.h.3"])
    _, b = raw(model, OTHER, capture=["transformer.h.3"])
    assert len(means) == 2
    assert torch.allclose(means[0], a["transformer.h.3"].mean(), atol=1e-5)
    assert torch.allclose(means[1], b["transformer.h.3"].mean(), atol=1e-5)


def test_tracer_cache(model, mode):
    with model.trace(PROMPT, remote=mode) as tracer:
        cache = tracer.cache()
    _, seen = raw(model, PROMPT, capture=["transformer.h.2"])
    assert torch.allclose(cache["model.transformer.h.2"].output, seen["transformer.h.2"], atol=1e-5)
    assert torch.allclose(cache.model.transformer.h[2].output, seen["transformer.h.2"], atol=1e-5)


def test_tracer_cache_selected_modules_with_inputs(model, mode):
    with model.trace(PROMPT, remote=mode) as tracer:
        cache = tracer.cache(modules=[layer for layer in model.transformer.h], include_inputs=True)
    _, seen = raw(model, PROMPT, capture=["transformer.h.0", "transformer.h.1"])
    assert torch.allclose(cache.model.transformer.h[1].inputs[0][0], seen["transformer.h.0"], atol=1e-5)
    assert torch.allclose(cache["model.transformer.h.1"].output, seen["transformer.h.1"], atol=1e-5)


# --- More idioms --------------------------------------------------------------------------------

def test_inputs_write_tuple(model, mode):
    with model.trace(PROMPT, remote=mode):
        args, kwargs = model.transformer.h[2].inputs
        model.transformer.h[2].inputs = ((args[0] * 0,), kwargs)
        logits = model.lm_head.output.save()
    with model.trace(PROMPT, remote=False):
        model.transformer.h[1].output[:] = 0
        want = model.lm_head.output.save()
    assert torch.allclose(logits, want, atol=1e-5)


def test_item_and_tolist_in_body(model, mode):
    with model.trace(PROMPT, remote=mode):
        top = model.lm_head.output[0, -1].argmax().item().save()
        ids = model.lm_head.output[0].argmax(dim=-1).tolist().save()
    logits, _ = raw(model, PROMPT)
    assert top == int(logits[0, -1].argmax())
    assert ids == logits[0].argmax(-1).tolist()


def test_save_function_form_and_stack(model, mode):
    with model.trace(PROMPT, remote=mode):
        outs = [layer.output[0, -1] for layer in model.transformer.h]
        stacked = interlace.save(torch.stack(outs))
    _, seen = raw(model, PROMPT, capture=[f"transformer.h.{i}" for i in range(n_layers(model))])
    assert stacked.shape == (n_layers(model), 128)
    assert torch.allclose(stacked[2], seen["transformer.h.2"][0, -1], atol=1e-5)


def test_direct_unembedding_with_weights(model, mode):
    with model.trace(PROMPT, remote=mode):
        hidden = model.transformer.ln_f.output[0, -1]
        logits = (hidden @ model.lm_head.weight.T).save()
    want, _ = raw(model, PROMPT)
    assert torch.allclose(logits, want[0, -1], atol=1e-4)


def test_nested_submodule_edit(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[0].mlp.act.output[:] = 0
        logits = model.lm_head.output.save()
    want, _ = raw(model, PROMPT, edits={"transformer.h.0.mlp.act": lambda o: o * 0})
    assert torch.allclose(logits, want, atol=1e-5)


def test_dict_input_and_kwargs_input(model, mode):
    enc = model.tokenizer(PROMPT, return_tensors="pt")
    with model.trace(dict(enc), remote=mode):
        a = model.lm_head.output.save()
    with model.trace(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], remote=mode):
        b = model.lm_head.output.save()
    want, _ = raw(model, PROMPT)
    assert torch.allclose(a, want, atol=1e-5)
    assert torch.allclose(b, want, atol=1e-5)


def test_scan_shape(model):
    with model.scan(PROMPT):
        shape = interlace.save(model.transformer.h[0].output.shape)
        print(model.transformer.h[0].output.shape)       # the tutorials' form
    n = len(model.tokenizer(PROMPT)["input_ids"])
    assert tuple(shape) == (1, n, 128)


def test_step_conditional_in_generate(model, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode) as tracer:
        hidden = interlace.save([])
        for step in tracer.iter[:]:
            if step == 1:
                hidden.append(model.transformer.h[-1].output[0, -1])
        out = model.generator.output.save()
    assert len(hidden) == 1 and hidden[0].shape == (128,)
    assert torch.equal(out, hf_generate(model, PROMPT, 3))


def test_generate_iter_index(model, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode) as tracer:
        with tracer.iter[2]:
            last = model.lm_head.output.argmax(dim=-1).save()
    want = hf_generate(model, PROMPT, 3)
    assert int(last[0, -1]) == int(want[0, -1])


def test_generate_batched_prompts(model, mode):
    with model.generate([PROMPT, OTHER], max_new_tokens=2, do_sample=False, remote=mode):
        out = model.generator.output.save()
    assert out.shape[0] == 2
    texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
    assert texts[0].startswith(PROMPT) and texts[1].startswith(OTHER)


def test_generate_tracer_result(model, mode):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False, remote=mode) as tracer:
        result = tracer.result.save()
    assert torch.equal(result, hf_generate(model, PROMPT, 2))


def test_backward_grad_on_attention_and_plain_backward(model, mode):
    with model.trace(PROMPT, remote=mode):
        attn = model.transformer.h[0].attn.output[0]
        attn.requires_grad_(True)
        logits = model.lm_head.output
        with logits.sum().backward():
            g = attn.grad.save()
    assert g.shape[-1] == 128 and g.abs().sum() > 0


def test_session_saved_value_after_session(model, mode):
    with model.session(remote=mode) as session:
        with model.trace(PROMPT):
            top = model.lm_head.output[0, -1].argmax().save()
        with model.trace(OTHER):
            model.transformer.h[0].output[:] = 0
            zeroed = model.lm_head.output[0, -1].argmax().save()
    logits, _ = raw(model, PROMPT)
    assert int(top) == int(logits[0, -1].argmax())
    want, _ = raw(model, OTHER, edits={"transformer.h.0": lambda o: o * 0})
    assert int(zeroed) == int(want[0, -1].argmax())


def test_cache_in_generate(model, mode):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False, remote=mode) as tracer:
        cache = tracer.cache(modules=[model.transformer.h[0]])
    # one call per generated token, so (as in nnsight) the key holds a list of entries
    entries = cache["model.transformer.h.0"]
    assert isinstance(entries, list) and len(entries) == 2
    n = len(model.tokenizer(PROMPT)["input_ids"])
    assert entries[0].output.shape == (1, n, 128) and entries[1].output.shape == (1, 1, 128)


def test_wte_copy_with_barrier_generate(model, mode):
    # the walkthrough's cross-prompt intervention: copy the embeddings of one prompt into another
    with model.generate(max_new_tokens=2, do_sample=False, remote=mode) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(CLEAN):
            embeddings = model.transformer.wte.output
            barrier()
        with tracer.invoke(CORRUPT):
            barrier()
            model.transformer.wte.output = embeddings
        with tracer.invoke():        # the whole batch (body code outside an invoke is not)
            out = model.generator.output.save()
    assert out.shape[0] == 2
    n = len(model.tokenizer(CLEAN)["input_ids"])
    assert n == len(model.tokenizer(CORRUPT)["input_ids"])
    # same embeddings and positions in both rows: the same continuation
    assert torch.equal(out[1, -2:], out[0, -2:])
    assert torch.equal(out[0], hf_generate(model, CLEAN, 2)[0])


def test_trace_with_model_tokenizer_attrs(model, mode):
    eos = model.tokenizer.eos_token_id
    ids = torch.tensor([[eos] + model.tokenizer(PROMPT)["input_ids"]])
    with model.trace(ids, remote=mode):
        first = model.transformer.wte.output[0, 0].save()
    with torch.no_grad():
        want = model._module.transformer.wte.weight[eos]
    assert torch.allclose(first, want)


def test_print_with_fstring_and_saved_len(model, mode, capsys, monkeypatch):
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", True)
    with model.trace(PROMPT, remote=mode):
        hs = interlace.save([])
        for i, layer in enumerate(model.transformer.h):
            hs.append(layer.output)
            print(f"layer {i}: {tuple(layer.output.shape)}")
    assert len(hs) == n_layers(model)
    assert "layer 3" in capsys.readouterr().out


class LayerAnalyzer:
    """A small class defined in the test file and used inside bodies."""

    def __init__(self, layer_idx):
        self.layer_idx = layer_idx

    def analyze(self, m):
        return m.transformer.h[self.layer_idx].output.norm(dim=-1)


def test_helper_class_in_body(model, mode):
    analyzer = LayerAnalyzer(2)
    with model.trace(PROMPT, remote=mode):
        norms = analyzer.analyze(model).save()
    _, seen = raw(model, PROMPT, capture=["transformer.h.2"])
    assert torch.allclose(norms, seen["transformer.h.2"].norm(dim=-1), atol=1e-4)


def test_lambda_and_loop_over_positions(model, mode):
    double = lambda x: x * 2  # noqa: E731
    with model.trace(PROMPT, remote=mode):
        hidden = model.transformer.h[0].output
        per_pos = interlace.save([])
        for pos in range(hidden.shape[1]):
            per_pos.append(double(hidden[0, pos]).norm())
    _, seen = raw(model, PROMPT, capture=["transformer.h.0"])
    n = len(model.tokenizer(PROMPT)["input_ids"])
    assert len(per_pos) == n
    assert torch.allclose(per_pos[1], (seen["transformer.h.0"][0, 1] * 2).norm(), atol=1e-4)


def test_hf_kwargs_hidden_states_and_attentions(model, mode):
    with model.trace(PROMPT, output_hidden_states=True, output_attentions=True, remote=mode):
        out = model.output.save()
    enc = dict(model.tokenizer(PROMPT, return_tensors="pt"))
    with torch.no_grad():
        want = model._module(**enc, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == n_layers(model) + 1
    assert torch.allclose(out.hidden_states[2], want.hidden_states[2], atol=1e-5)
    assert torch.allclose(out.attentions[0], want.attentions[0], atol=1e-5)


def test_output_logits_inside_body(model, mode):
    with model.trace(PROMPT, remote=mode):
        probs = torch.nn.functional.softmax(model.output.logits[:, -1], dim=-1).save()
    logits, _ = raw(model, PROMPT)
    assert torch.allclose(probs, logits[:, -1].softmax(-1), atol=1e-5)


def test_apply_block_to_hidden(model, mode):
    with model.trace(PROMPT, remote=mode):
        h2 = model.transformer.h[2].output
        again = model.transformer.h[3](h2).save()
        real = model.transformer.h[3].output.save()
    # called on its own the block gets no causal mask, so only the last position (which sees
    # every position either way) matches the real run; the rest match the plain module's call
    _, seen = raw(model, PROMPT, capture=["transformer.h.2"])
    with torch.no_grad():
        want = model._module.transformer.h[3](seen["transformer.h.2"])
    want = want[0] if isinstance(want, tuple) else want
    assert torch.allclose(again, want, atol=1e-5)
    assert torch.allclose(again[:, -1], real[:, -1], atol=1e-5)


def test_attn_output_tuple_replacement(model, mode):
    with model.trace(PROMPT, remote=mode):
        attn = model.transformer.h[0].attn.output
        model.transformer.h[0].attn.output = (torch.zeros_like(attn[0]),) + tuple(attn[1:])
        logits = model.lm_head.output.save()

    def zero_first(o):
        return (torch.zeros_like(o[0]),) + tuple(o[1:])
    m = model._module
    handle = m.transformer.h[0].attn.register_forward_hook(lambda mod, a, o: zero_first(o))
    try:
        want, _ = raw(model, PROMPT)
    finally:
        handle.remove()
    assert torch.allclose(logits, want, atol=1e-5)


def test_neuron_edit_fancy_index(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[1].mlp.output[0, :, [3, 7]] = 10.0
        logits = model.lm_head.output.save()

    def edit(o):
        o[0, :, [3, 7]] = 10.0
        return o
    want, _ = raw(model, PROMPT, edits={"transformer.h.1.mlp": edit})
    assert torch.allclose(logits, want, atol=1e-4)


def test_body_exception_type_kept(model, mode):
    with pytest.raises(IndexError):
        with model.trace(PROMPT, remote=mode):
            model.transformer.h[0].output[5, 0].save()


def test_detach_cpu_numpy_save(model, mode):
    with model.trace(PROMPT, remote=mode):
        arr = model.transformer.h[0].output.detach().cpu().numpy().save()
    _, seen = raw(model, PROMPT, capture=["transformer.h.0"])
    assert arr.shape == tuple(seen["transformer.h.0"].shape)
    assert abs(float(arr[0, 0, 0]) - float(seen["transformer.h.0"][0, 0, 0])) < 1e-5


def test_save_dict_literal_and_tuple(model, mode):
    with model.trace(PROMPT, remote=mode):
        stats = {"mean": model.transformer.h[0].output.mean(), "max": model.transformer.h[0].output.max()}
        stats = interlace.save(stats)
        pair = interlace.save((model.lm_head.output[0, -1].argmax(), model.lm_head.output[0, -1].max()))
    logits, seen = raw(model, PROMPT, capture=["transformer.h.0"])
    assert torch.allclose(stats["mean"], seen["transformer.h.0"].mean(), atol=1e-5)
    assert int(pair[0]) == int(logits[0, -1].argmax())


def test_generate_stop_after_first_step(model, mode):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, remote=mode) as tracer:
        first = model.lm_head.output[0, -1].argmax().save()
        tracer.stop()
    assert int(first) == int(hf_generate(model, PROMPT, 1)[0, -1])


def test_generate_skip_every_step(model, mode):
    with model.generate(PROMPT, max_new_tokens=2, do_sample=False, remote=mode) as tracer:
        with tracer.all():
            model.transformer.h[1].skip(model.transformer.h[0].output)
        out = model.generator.output.save()
    m = model._module
    seen = {}
    h0 = m.transformer.h[0].register_forward_hook(lambda mod, a, o: seen.__setitem__("h0", o))
    h1 = m.transformer.h[1].register_forward_hook(lambda mod, a, o: seen["h0"])
    try:
        want = hf_generate(model, PROMPT, 2)
    finally:
        h0.remove()
        h1.remove()
    assert torch.equal(out, want)


def test_no_grad_around_trace(model, mode):
    with torch.no_grad():
        with model.trace(PROMPT, remote=mode):
            hidden = model.transformer.h[0].output.save()
    assert hidden.shape[-1] == 128


def test_session_value_item_drives_next_trace(model, mode):
    with model.session(remote=mode):
        with model.trace(PROMPT):
            top = model.lm_head.output[0, -1].argmax().item()
        with model.trace(torch.tensor([[top]])):
            nxt = model.lm_head.output[0, -1].save()
    logits, _ = raw(model, PROMPT)
    t = int(logits[0, -1].argmax())
    with torch.no_grad():
        want = model._module(input_ids=torch.tensor([[t]])).logits[0, -1]
    assert torch.allclose(nxt, want, atol=1e-5)


SCALE = 3.0


def scaled(x):
    return x * SCALE          # a module-level constant


def scaled_twice(x):
    return scaled(scaled(x))  # a helper calling a helper


def test_helper_chain_with_module_constant(model, mode):
    with model.trace(PROMPT, remote=mode):
        model.transformer.h[0].output = scaled_twice(model.transformer.h[0].output)
        logits = model.lm_head.output.save()
    want, _ = raw(model, PROMPT, edits={"transformer.h.0": lambda o: o * 9.0})
    assert torch.allclose(logits, want, atol=1e-4)


def test_trace_inside_function_returns_saved(model, mode):
    def last_logits(prompt, layer=None):
        with model.trace(prompt, remote=mode):
            if layer is not None:
                model.transformer.h[layer].output[:] = 0
            out = model.lm_head.output[0, -1].save()
        return out

    a = last_logits(PROMPT)
    b = last_logits(PROMPT, layer=1)
    want_a, _ = raw(model, PROMPT)
    want_b, _ = raw(model, PROMPT, edits={"transformer.h.1": lambda o: o * 0})
    assert torch.allclose(a, want_a[0, -1], atol=1e-5)
    assert torch.allclose(b, want_b[0, -1], atol=1e-5)


def test_grad_edit_in_backward(model, mode):
    with model.trace(PROMPT, remote=mode):
        h1 = model.transformer.h[1].output
        h1.requires_grad_(True)
        h2 = model.transformer.h[2].output
        loss = model.lm_head.output[0, -1].logsumexp(-1)
        with loss.backward():
            h2.grad[:] = 0
            g1 = h1.grad.save()
    assert torch.all(g1 == 0)


def test_two_backward_passes_retain_graph(model, mode):
    with model.trace(PROMPT, remote=mode):
        h1 = model.transformer.h[1].output
        h1.requires_grad_(True)
        logits = model.lm_head.output
        with logits[0, -1].max().backward(retain_graph=True):
            g_a = h1.grad.save()
        with logits[0, -1].min().backward():
            g_b = h1.grad.save()
    assert g_a.shape == g_b.shape and not torch.allclose(g_a, g_b)


def test_generate_per_invoke_prompts(model, mode):
    with model.generate(max_new_tokens=2, do_sample=False, remote=mode) as tracer:
        with tracer.invoke(PROMPT):
            a = model.lm_head.output[0, -1].argmax().save()
        with tracer.invoke(OTHER):
            b = model.lm_head.output[0, -1].argmax().save()
    wa, _ = raw(model, PROMPT)
    wb, _ = raw(model, OTHER)
    assert int(a) == int(wa[0, -1].argmax())
    assert int(b) == int(wb[0, -1].argmax())


def test_iter_on_plain_trace(model, mode):
    with model.trace(PROMPT, remote=mode) as tracer:
        seen = interlace.save([])
        for step in tracer.iter[:]:
            seen.append(model.lm_head.output.shape[1])
    assert seen == [len(model.tokenizer(PROMPT)["input_ids"])]


def test_outer_container_mutation(model, mode):
    # Locally the body changes the caller's own dict. Remotely (nnsight too) it changes the
    # server's copy only; Interlace says so at the line instead of losing the value silently.
    import warnings

    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.trace(PROMPT, remote=mode):
            results["top"] = model.lm_head.output[0, -1].argmax().save()
    lost = [w for w in caught if "made before this remote block" in str(w.message)]
    if mode is False:
        assert not lost and "top" in results
    else:
        assert results == {}
        assert len(lost) == 1 and "results[key] = value" in str(lost[0].message)
        assert lost[0].lineno == test_outer_container_mutation.__code__.co_firstlineno + 9


def test_no_mutation_warning_for_containers_made_inside(model, mode):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.session(remote=mode):
            means = interlace.save([])
            for prompt in (PROMPT, OTHER):
                with model.trace(prompt):
                    found = interlace.save({})
                    found["m"] = model.transformer.h[0].output.mean()
                    means.append(found["m"])
    assert len(means) == 2


def test_hidden_states_every_time(model, mode):
    # transformers installs its output-capturing hooks in the first forward that asks for
    # hidden states; a job's cleanup once removed them but left the model marked as hooked,
    # so every later run (and the caller's own model under the simulation) got `()`.
    for _ in range(2):
        with model.trace(PROMPT, output_hidden_states=True, remote=mode):
            out = model.output.save()
        assert len(out.hidden_states) == n_layers(model) + 1
    enc = dict(model.tokenizer(PROMPT, return_tensors="pt"))
    with torch.no_grad():
        plain = model._module(**enc, output_hidden_states=True)
    assert len(plain.hidden_states) == n_layers(model) + 1
    assert torch.allclose(out.hidden_states[-1], plain.hidden_states[-1], atol=1e-5)
