"""Seed 004, "Streaming": local blocks, local functions and live logs during remote runs.

Changed from the seed: the package name (nnsight -> interlace), the model (the tiny Llama by
path), fewer generated tokens, and `hs[0,0,0]` -> `hs[0, 0]`: with transformers 5.x a decoder
layer returns a tensor, so the seed's `.output[0]` is already batch row 0 and the same element
is one index shorter. Values are checked against raw hooks on a separately loaded copy.
"""

from __future__ import annotations

import pytest
import torch

import interlace

TOL = 1e-5

@pytest.fixture
def llama(tiny_llama_path):
    from interlace import LanguageModel

    return LanguageModel(str(tiny_llama_path))


@pytest.fixture
def remote_logging(monkeypatch):
    """The seed runs with the default status display on (use_server turns it off)."""
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", True)


def _last_layer(raw, prompt):
    logits, seen = raw.run(prompt, capture=("model.layers.1",))
    return logits, seen["model.layers.1"]


def test_tracer_log(llama, raw_llama, mode, remote_logging, capsys):
    # This will give you a remote LOG response because it's coming from the remote server
    with llama.trace("hello", remote=mode) as tracer:

        hs = llama.model.layers[-1].output[0]

        tracer.log(hs[0, 0])

        out = llama.lm_head.output.save()

    print(out)
    logits, last = _last_layer(raw_llama, "hello")
    torch.testing.assert_close(out, logits, rtol=0, atol=TOL)
    assert str(last[0, 0, 0]) in capsys.readouterr().out


def test_local_block_with_tracer_log(llama, raw_llama, mode, remote_logging, capsys):
    # This will print locally because it's already local
    with llama.trace("hello", remote=mode) as tracer:

        with interlace.local():
            hs = llama.model.layers[-1].output[0]
            tracer.log(hs[0, 0])

        out = llama.lm_head.output.save()

    print(out)
    logits, last = _last_layer(raw_llama, "hello")
    torch.testing.assert_close(out, logits, rtol=0, atol=TOL)
    assert str(last[0, 0, 0]) in capsys.readouterr().out


def test_trace_decorated_local_function(llama, raw_llama, mode):
    # first, let's define our function
    @interlace.trace  # decorator that enables this function to be added to the intervention graph
    def my_local_fn(value):
        return value * 0

    # We use a local function to ablate some hidden states
    # This downloads the data for the .local context, and then uploads it back to set the value.
    with llama.generate("hello", remote=mode) as tracer:

        hs = llama.model.layers[-1].output[0]

        with interlace.local():

            hs = my_local_fn(hs)

        llama.model.layers[-1].output[0][:] = hs

        out = llama.lm_head.output.save()

    def ablate(module, args, output):
        output[0][:] = 0

    expected, _ = raw_llama.run("hello", edits={"model.layers.1": ablate})
    # generate computes the first step's logits for the last position only (transformers'
    # `logits_to_keep`); the ablated forward's last position is the truth.
    torch.testing.assert_close(out, expected[:, -1:], rtol=0, atol=TOL)
    unablated, _ = raw_llama.run("hello")
    assert not torch.allclose(out, unablated[:, -1:], atol=1e-3)  # the edit did something


@pytest.mark.parametrize("remote", ["local", True], ids=["simulated", "server"])
def test_local_function_outside_a_local_block_is_refused(request, llama, remote):
    if remote is True:
        request.getfixturevalue("use_server")

    @interlace.trace
    def my_local_fn(value):
        return value * 0

    with pytest.raises(interlace.RemoteValidationError, match="my_local_fn"):
        with llama.trace("hello", remote=remote) as tracer:

            hs = llama.model.layers[-1].output[0]

            hs = my_local_fn(hs)  # no .local - will cause an error

            llama.model.layers[-1].output[0][:] = hs * 2

            out = llama.lm_head.output.save()


def test_live_streaming_chat(llama, raw_llama, mode, capsys, monkeypatch):
    @interlace.trace
    def my_decoding_function(tokens, model, max_length=80, state=None):
        # Initialize state if not provided
        if state is None:
            state = {'current_line': '', 'current_line_length': 0}

        token = tokens[-1]  # only use last token

        # Decode the token
        decoded_token = llama.tokenizer.decode(token).encode("unicode_escape").decode()

        if decoded_token == '\\n':  # Handle explicit newline tokens
            # Print the current line and reset state
            print('', flush=True)
            state['current_line'] = ''
            state['current_line_length'] = 0
        else:
            # Check if adding the token would exceed the max length
            if state['current_line_length'] + len(decoded_token) > max_length:
                print('', flush=True)
                state['current_line'] = decoded_token  # Start a new line with the current token
                state['current_line_length'] = len(decoded_token)
                print(state['current_line'], flush=True, end="")  # Print the current line
            else:
                # Add a space if the line isn't empty and append the token
                if state['current_line']:
                    state['current_line'] += decoded_token
                else:
                    state['current_line'] = decoded_token
                state['current_line_length'] += len(decoded_token)
                print(state['current_line'], flush=True, end="")  # Print the current line

        return state

    # The seed sets `interlace.CONFIG.APP.REMOTE_LOGGING = False`; undone after the test here.
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)

    prompt = "A press release is an official statement delivered to members of the news media for the purpose of"

    print("Prompt: ", prompt, '\n', end="")

    # Initialize the state for decoding
    state = {'current_line': '', 'current_line_length': 0}

    with llama.generate(prompt, remote=mode, max_new_tokens=4) as generator:
        # Call .all() to apply to each new token
        llama.all()

        all_tokens = interlace.list().save()

        # Access model output
        out = llama.lm_head.output.save()

        # Apply softmax to obtain probabilities and save the result
        probs = torch.nn.functional.softmax(out, dim=-1)
        max_probs = torch.max(probs, dim=-1)
        tokens = max_probs.indices.cpu().tolist()
        all_tokens.append(tokens[0]).save()

        with interlace.local():
            state = my_decoding_function(tokens[0], llama, max_length=20, state=state)

    ids = raw_llama.tokenizer(prompt, return_tensors="pt")
    generated = raw_llama.model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert [step[-1] for step in all_tokens] == generated.tolist()
    printed = capsys.readouterr().out
    for token in generated.tolist():
        assert raw_llama.tokenizer.decode(token).encode("unicode_escape").decode() in printed
