"""Streaming generation: a local block in the per-step body sees every token as it is made.

Both spellings of the step loop (`for step in tracer.all():` and the seed's bare
`model.all()` statement), in every mode; the tokens are checked against a plain greedy
`generate` on a separately loaded copy, the client-side timestamps must grow strictly, and the
first token must reach the client well before the job is over (here: before half of the
trace's wall time has passed), which a client that got the tokens with the result could not do.
"""

from __future__ import annotations

import time

import pytest

import interlace
from streaming_helpers import PROMPT

N = 20


@pytest.fixture(scope="module")
def greedy(raw_gpt2) -> list[int]:
    ids = raw_gpt2.encode(PROMPT)
    out = raw_gpt2.model.generate(**ids, max_new_tokens=N, do_sample=False)
    tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    assert len(tokens) == N, "the prompt must not end generation early (EOS)"
    return tokens


def _with_step_loop(model, mode) -> tuple[float, list[tuple[float, int, int]], float, None]:
    stamps = []
    made = 0  # a client name the blocks update at every step: their namespace persists
    start = time.perf_counter()
    with model.generate(PROMPT, max_new_tokens=N, remote=mode) as tracer:
        for step in tracer.all():
            token = model.lm_head.output[0, -1].argmax()
            with interlace.local():
                made = made + 1
                stamps.append((time.perf_counter(), int(token), made))
    end = time.perf_counter()
    return start, stamps, end, None


def _with_bare_all(model, mode) -> tuple[float, list[tuple[float, int, int]], float, list[int]]:
    stamps = []
    made = 0
    start = time.perf_counter()
    with model.generate(PROMPT, max_new_tokens=N, remote=mode) as tracer:
        model.all()
        tokens = interlace.list().save()  # made once, before the steps
        token = model.lm_head.output[0, -1].argmax()
        tokens.append(int(token))
        with interlace.local():
            made = made + 1
            stamps.append((time.perf_counter(), int(token), made))
    end = time.perf_counter()
    return start, stamps, end, tokens


@pytest.mark.parametrize("spelling", [_with_step_loop, _with_bare_all], ids=["tracer-all-loop", "bare-model-all"])
def test_every_token_streams_to_a_local_block_as_it_is_made(gpt2, greedy, mode, spelling):
    spelling(gpt2, mode)  # once to warm the caches: the timing below is of a warm trace
    start, stamps, end, tokens = spelling(gpt2, mode)

    assert [token for _, token, _ in stamps] == greedy
    assert [count for _, _, count in stamps] == list(range(1, N + 1))
    if tokens is not None:
        assert list(tokens) == greedy
    times = [stamp for stamp, _, _ in stamps]
    assert all(a < b for a, b in zip(times, times[1:])), times
    assert start < times[0] and times[-1] < end
    first, whole = times[0] - start, end - start
    assert first < whole / 2, f"first token after {first * 1000:.1f} ms of a {whole * 1000:.1f} ms trace"
