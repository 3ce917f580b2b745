"""`@interlace.trace` local-only functions, and live output (`print`, `tracer.log`) from a
remote body: in every mode, against raw hooks."""

from __future__ import annotations

import pytest
import torch

import interlace
from streaming_helpers import PROMPT


def _rows(width: int) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, width)


def test_a_local_only_function_works_inside_a_block(gpt2, raw_gpt2, mode):
    @interlace.trace
    def tilt(t):
        return t * _rows(t.shape[-1])

    with gpt2.trace(PROMPT, remote=mode):
        hidden = gpt2.transformer.h[1].output
        with interlace.local():
            tilted = tilt(hidden)
        gpt2.transformer.h[1].output[:] = tilted
        logits = gpt2.lm_head.output.save()

    def edit(module, args, output):
        return output * _rows(output.shape[-1])

    expected, _ = raw_gpt2.run(PROMPT, edits={"transformer.h.1": edit})
    plain, _ = raw_gpt2.run(PROMPT)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-3)


def test_a_local_only_function_outside_a_block_is_refused(gpt2, raw_gpt2, mode):
    @interlace.trace
    def tilt_outside(t):
        return t * _rows(t.shape[-1])

    if mode is False:  # nothing is sent anywhere: the function just runs
        with gpt2.trace(PROMPT, remote=mode):
            tilted = tilt_outside(gpt2.transformer.h[1].output).save()
        _, truth = raw_gpt2.run(PROMPT, capture=("transformer.h.1",))
        assert torch.equal(tilted, truth["transformer.h.1"] * _rows(128))
        return
    with pytest.raises(interlace.RemoteValidationError) as info:
        with gpt2.trace(PROMPT, remote=mode):
            hidden = gpt2.transformer.h[1].output
            tilted = tilt_outside(hidden)  # no local block: refused before anything is sent
            gpt2.transformer.h[1].output[:] = tilted
    text = str(info.value)
    assert "tilt_outside" in text and "interlace.local()" in text, text  # names it and shows the fix


def test_a_local_only_function_keeps_working_outside_traces():
    @interlace.trace
    def double(x):
        return x * 2

    assert double(21) == 42 and double.__name__ == "double"


def test_log_lines_arrive_in_order_before_the_job_ends(gpt2, raw_gpt2, mode, capsys, monkeypatch):
    # After `mode`, whose server fixture turns the status display off: the display is on, as
    # for a user, so LOG lines print to this test's captured stdout as they arrive.
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", True)
    snapshots = []

    def snapshot():
        snapshots.append(capsys.readouterr().out)

    with gpt2.trace(PROMPT, remote=mode) as tracer:
        hidden = gpt2.transformer.h[0].output
        print("hybrid-log alpha")
        tracer.log("hybrid-log beta", hidden.shape[1])
        print("hybrid-log gamma", int(hidden.shape[-1]))
        tracer.log("hybrid-log delta")
        with interlace.local():
            snapshot()  # runs on the client while the job waits for it
        logits = gpt2.lm_head.output.save()

    n = raw_gpt2.n_tokens(PROMPT)
    expected = ["hybrid-log alpha", f"hybrid-log beta {n}", "hybrid-log gamma 128", "hybrid-log delta"]
    (before_end,) = snapshots
    positions = [before_end.find(line) for line in expected]
    assert -1 not in positions, (expected, before_end)
    assert positions == sorted(positions), before_end
    truth, _ = raw_gpt2.run(PROMPT)
    torch.testing.assert_close(logits, truth, rtol=0, atol=1e-5)


def test_log_and_print_inside_a_block_print_here(gpt2, raw_gpt2, mode, capsys, monkeypatch):
    # The display is off: what shows comes from the block itself, on the client.
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
    with gpt2.trace(PROMPT, remote=mode) as tracer:
        hidden = gpt2.transformer.h[0].output
        with interlace.local():
            print("hybrid-local first", hidden.shape[1])
            tracer.log("hybrid-local second", hidden[0, 0, 0].item())

    _, truth = raw_gpt2.run(PROMPT, capture=("transformer.h.0",))
    printed = capsys.readouterr().out
    assert f"hybrid-local first {raw_gpt2.n_tokens(PROMPT)}" in printed, printed
    first, second = printed.index("hybrid-local first"), printed.index("hybrid-local second")
    assert first < second, printed
    logged = float(printed[second:].split()[2])
    assert logged == pytest.approx(float(truth["transformer.h.0"][0, 0, 0]), rel=1e-6, abs=1e-7)
