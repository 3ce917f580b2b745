"""A property over the public `trace`/`generate`/`session` keyword arguments, in every mode.

For any mix of client options (`remote/options.py`) and the model's own options, each call
either gives the same values in all three modes (equal to raw torch / plain HF generate), or
fails in each mode with a user error naming the argument: the mode's own refusal for a client
option it does not take, else the same error everywhere. Never an internal error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import interlace
from interlace.contract.options import CLIENT_OPTIONS, TraceOptionError

PROMPTS = ("The Eiffel Tower is in the city of", "Madison Square Garden is")
MODES = (False, "local", True)


@pytest.fixture(scope="module")
def lm(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def client_options(server):
    return {
        "verbose": st.booleans(),
        "strict_remote": st.booleans(),
        "max_upload_mb": st.sampled_from([0, 0.0001, 10.0]),
        "blocking": st.booleans(),
        "host": st.just(server.url),
        "api_key": st.just(server.key),
    }


MODEL_OPTIONS = {
    "trace": {"use_cache": st.booleans(), "output_hidden_states": st.booleans(),
              "not_an_option": st.integers(0, 2), "padding": st.just(True)},
    "generate": {"max_new_tokens": st.integers(1, 3), "repetition_penalty": st.sampled_from([1.0, 1.5]),
                 "no_repeat_ngram_size": st.sampled_from([0, 1]), "not_an_option": st.integers(0, 2),
                 "padding": st.just(True)},
    "session": {"not_an_option": st.integers(0, 2)},
}


def run(lm, kind, prompt, remote, options):
    """The call as a user writes it; returns the saved values (fetched when not waited for)."""
    if kind == "trace":
        with lm.trace(prompt, remote=remote, **options) as tracer:
            h = lm.transformer.h[1].output[:, -1].save()
        values = {"h": h}
    elif kind == "generate":
        with lm.generate(prompt, remote=remote, **options) as tracer:
            h = lm.transformer.h[1].output[:, -1].save()
            out = lm.generator.output.save()
        values = {"h": h, "out": out}
    else:
        with lm.session(remote=remote, **options) as tracer:
            with lm.trace(prompt):
                h = lm.transformer.h[1].output[:, -1].save()
        values = {"h": h}
    if options.get("blocking") is False:
        values = tracer.job.result(timeout=60)
    return values


def truth(lm, kind, prompt, options):
    """Raw torch for block 1's last-position output; plain HF generate for the tokens."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    seen = []
    handle = lm._module.transformer.h[1].register_forward_hook(lambda m, a, out: seen.append(out[:, -1].clone()))
    try:
        with torch.no_grad():
            if kind == "generate":
                # `padding` is the tokenizer's (as in nnsight); one prompt has nothing to pad.
                gen = {k: v for k, v in options.items() if k in MODEL_OPTIONS["generate"] and k != "padding"}
                gen.setdefault("max_new_tokens", lm._module.generation_config.max_new_tokens or 20)
                out = lm._module.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          pad_token_id=lm.tokenizer.eos_token_id, **gen)
                return {"h": seen[0], "out": out}
            lm._module(ids)
    finally:
        handle.remove()
    return {"h": seen[0]}


@st.composite
def calls(draw, server):
    kind = draw(st.sampled_from(["trace", "generate", "session"]))
    model = MODEL_OPTIONS[kind]
    options = draw(st.fixed_dictionaries({}, optional={**client_options(server), **model}))
    return kind, draw(st.sampled_from(PROMPTS)), options


def outcome(lm, kind, prompt, remote, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_upload_mb's size warning
        try:
            return run(lm, kind, prompt, remote, dict(options)), None
        except Exception as error:  # noqa: BLE001 - every outcome is checked below
            return None, error


def test_every_call_agrees_across_modes_or_fails_naming_the_argument(lm, use_server):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(calls(use_server))
    def check(call):
        kind, prompt, options = call
        # The reference: a plain local run with the model's options only. Whether the model
        # takes an option is the model's business (GPT-2's forward ignores unknown keywords);
        # every mode must then agree with it.
        model_options = {k: v for k, v in options.items() if k not in CLIENT_OPTIONS}
        reference, reference_error = outcome(lm, kind, prompt, False, model_options)
        if reference_error is not None:
            assert any(n in str(reference_error) for n in model_options), str(reference_error)
        else:
            expected = truth(lm, kind, prompt, options)
            for key, value in expected.items():
                assert _same(reference[key], value, key), (kind, options, key)
        for remote in MODES:
            values, error = outcome(lm, kind, prompt, remote, options)
            if error is not None:
                text = str(error)
                assert "Internal server error" not in text and "server problem" not in text, text
                assert getattr(error, "category", None) != "internal", text
            refused = [n for n in options if n in CLIENT_OPTIONS and remote not in CLIENT_OPTIONS[n]]
            if refused:
                assert isinstance(error, TraceOptionError), (remote, options, error)
                assert all(f"`{n}=`" in str(error) for n in refused), str(error)
            elif reference_error is not None:
                # The same error in every mode: the local run's message is in the remote ones.
                assert error is not None, (remote, options)
                assert str(reference_error).splitlines()[0] in str(error), (str(reference_error), str(error))
            else:
                assert error is None, (remote, options, error)
                for key, value in reference.items():
                    assert _same(values[key], value, key), (remote, kind, options, key)

    check()


def _same(got, want, key):
    return torch.equal(got, want) if key == "out" else torch.allclose(got, want, atol=1e-5)
