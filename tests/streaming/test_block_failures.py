"""A local block that fails ends its job cleanly, with a message that says what and where, and
the worker is free again: after each failure the same server (or simulation) runs an ordinary
job right. The cases of the issue: the block raises, the block sends back a value the codec
refuses, the block runs past the limit, and no client is there to run it."""

from __future__ import annotations

import re
import time
import traceback

import pytest

import interlace
from interlace.backends import LocalSimulationBackend
from interlace.contract.local_block import (
    CATEGORY_CLIENT_GONE,
    CATEGORY_TIMEOUT,
    UnsendableLocalValue,
)
from interlace.contract.policy import Policy
from streaming_helpers import BLOCK_LIMIT_S, GRACE_S, PROMPT, assert_runs_a_normal_job, line_of, wait_until_final


class ProbeFailure(Exception):
    """The user's own exception type: it must come back as itself, in every mode."""


def test_a_block_that_raises_fails_the_job_with_the_users_exception(gpt2, raw_gpt2, mode):
    with pytest.raises(ProbeFailure, match=r"probe failed at \d+\.\d{4}") as info:
        with gpt2.trace(PROMPT, remote=mode):
            hidden = gpt2.transformer.h[0].output
            with interlace.local():
                first = abs(hidden[0, 0, 0].item())
                raise ProbeFailure(f"probe failed at {first:.4f}")  # @raise-line
            logits = gpt2.lm_head.output.save()

    raised_at = line_of(__file__, "# @raise-line")
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.filename == __file__ and f.lineno == raised_at for f in frames), \
        [(f.filename, f.lineno, f.line) for f in frames]
    assert "raise ProbeFailure(" in "".join(traceback.format_exception(info.value))
    assert_runs_a_normal_job(gpt2, raw_gpt2, remote=mode)


def test_a_value_the_codec_refuses_names_the_variable(gpt2, raw_gpt2, mode):
    marker = object()
    if mode is False:  # nothing travels: the block's object reaches the body as it is
        with gpt2.trace(PROMPT, remote=mode):
            hidden = gpt2.transformer.h[0].output
            with interlace.local():
                handle = marker
            kept = interlace.save([handle, hidden.shape[1]])
        assert kept[0] is marker and kept[1] == raw_gpt2.n_tokens(PROMPT)
        return
    with pytest.raises((interlace.InterlaceError, UnsendableLocalValue)) as info:
        with gpt2.trace(PROMPT, remote=mode):
            hidden = gpt2.transformer.h[0].output
            with interlace.local():
                handle = marker  # a plain object(): no codec sends it
            kept = interlace.save([handle, hidden.shape[1]])
    text = str(info.value)
    assert "`handle`" in text and "cannot be sent to the server" in text, text
    assert_runs_a_normal_job(gpt2, raw_gpt2, remote=mode)


@pytest.mark.parametrize("where", ["local", True], ids=["simulated", "server"])
def test_a_block_past_the_limit_fails_the_job_naming_line_and_limit(request, gpt2, raw_gpt2, where):
    """The limit per block: the simulation's from its policy, the server's from `--local-block-timeout`."""
    if where is True:
        request.getfixturevalue("on_limits_server")
        options = {"remote": True}
    else:
        options = {"backend": LocalSimulationBackend(gpt2, policy=Policy(local_block_seconds=BLOCK_LIMIT_S))}
    with pytest.raises(interlace.RemoteException) as info:
        with gpt2.trace(PROMPT, **options):
            hidden = gpt2.transformer.h[0].output
            with interlace.local():  # @slow-block
                time.sleep(BLOCK_LIMIT_S + 2)
                scaled = hidden * 2
            gpt2.transformer.h[0].output[:] = scaled
            logits = gpt2.lm_head.output.save()

    text = str(info.value)
    assert info.value.category == CATEGORY_TIMEOUT, (info.value.category, text)
    assert re.search(rf"\bline {line_of(__file__, '# @slow-block')}\b", text), text
    assert re.search(rf"\b{BLOCK_LIMIT_S}(\.0)? ?s(ec(ond)?s?)?\b", text), text  # the limit
    assert_runs_a_normal_job(gpt2, raw_gpt2, **options)


def test_a_job_whose_client_never_comes_fails_after_the_grace_period(on_limits_server, gpt2, raw_gpt2):
    """Submitted without waiting (`blocking=False`) and never followed: nobody runs the block,
    so after `--local-grace` the job fails as the client's absence, and the worker is free."""
    ran_here = []
    with gpt2.trace(PROMPT, remote=True, blocking=False) as tracer:
        hidden = gpt2.transformer.h[0].output
        with interlace.local():  # @unfollowed-block
            ran_here.append(hidden[0, 0, 0].item())
            scaled = hidden * 2
        gpt2.transformer.h[0].output[:] = scaled
        logits = gpt2.lm_head.output.save()

    status = wait_until_final(tracer.job)
    assert status["status"] == "ERROR", status
    assert status.get("error_category") == CATEGORY_CLIENT_GONE, status
    assert re.search(rf"\bline {line_of(__file__, '# @unfollowed-block')}\b", status["description"]), status
    if status.get("started") and status.get("finished"):
        assert status["finished"] - status["started"] >= GRACE_S * 0.9, status  # it waited out the grace
    assert ran_here == []
    assert_runs_a_normal_job(gpt2, raw_gpt2, remote=True)
