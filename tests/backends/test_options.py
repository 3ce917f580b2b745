"""Trace options are split once (`remote/options.py`): client-side options stay with the
client and are refused, naming the modes that take them, where they do not apply; only the
model's own options travel, and the server answers a forbidden one with a 400, never a 500."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

import interlace
from interlace._version import __version__
from interlace.backends.pending import ResultNotReadyError
from interlace.contract.options import CLIENT_OPTIONS, TraceOptionError
from interlace.contract.policy import DEFAULT_POLICY
from interlace.backends.outbound import build_request
from interlace.contract.request import encode_request
from interlace.tracing.backend import CapturedTrace
from interlace.tracing.namespace import FrameNames
from interlace.execution.errors import BadRequest
from interlace.execution.errors import JobFailed
from interlace.execution.run import execute_request
from interlace.execution.receive import prepare_payload

A = "The Eiffel Tower is in the city of"
B = "Madison Square Garden is"


@pytest.fixture(scope="module")
def lm(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def raw_block_output(lm, prompt, layer):
    """Block `layer`'s output for `prompt` by a raw torch forward hook: the truth."""
    seen = {}
    handle = lm._module.transformer.h[layer].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    try:
        with torch.no_grad():
            lm._module(lm.tokenizer(prompt, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    return seen["h"]


# -- each option in each mode ----------------------------------------------------------------

VALUES = {"verbose": False, "strict_remote": False, "max_upload_mb": 10.0, "isolate": False, "blocking": True,
          "callback": None, "host": None, "api_key": None, "mocks": {"transformer.h.0.mlp": lambda hidden: hidden},
          "dry_run": True}


REFUSED = [(name, remote) for name, takes in sorted(CLIENT_OPTIONS.items())
           for remote in (False, "local", True) if remote not in takes]


@pytest.mark.parametrize("name, remote", REFUSED, ids=[f"{n}-{r}" for n, r in REFUSED])
def test_a_refused_option_names_the_modes_that_take_it(lm, name, remote):
    takes = CLIENT_OPTIONS[name]
    with pytest.raises(TraceOptionError) as info:
        lm.trace(A, remote=remote, **{name: VALUES[name]})
    message = str(info.value)
    assert f"`{name}=`" in message and f"not with remote={remote!r}" in message
    for mode in takes:
        assert f"remote={mode!r}" in message
    # The example it shows runs in a mode that takes the option (it once suggested
    # `remote='local'` for `blocking=`, which remote='local' refuses).
    example = re.search(r"`(model\.trace\(.*?\))`", message).group(1)
    shown = re.search(r"remote=('local'|True|False)", example).group(1)
    assert {"'local'": "local", "True": True, "False": False}[shown] in takes
    assert f"{name}=" in example


def test_refused_options_are_all_named_at_once(lm):
    with pytest.raises(TraceOptionError) as info:
        lm.trace(A, remote="local", blocking=False, callback="https://x")
    assert "`blocking=`" in str(info.value) and "`callback=`" in str(info.value)


def test_max_upload_mb_works_in_both_remote_modes_with_the_same_values(lm, mode):
    """Once: 'local' passed and the server failed with an internal TypeError."""
    truth = raw_block_output(lm, B, 2)
    if mode is False:
        with pytest.raises(TraceOptionError, match=r"`max_upload_mb=` applies only with remote='local' or remote=True"):
            lm.trace(B, remote=mode, max_upload_mb=5)
        return
    with lm.trace(B, remote=mode, max_upload_mb=5):
        h = lm.transformer.h[2].output.save()
    assert torch.allclose(h, truth, atol=1e-5)
    with pytest.warns(UserWarning, match=r"over max_upload_mb=1e-05 MB"):
        with lm.trace(B, remote=mode, max_upload_mb=0.00001):
            h = lm.transformer.h[2].output.save()
    assert torch.allclose(h, truth, atol=1e-5)


# -- the server side of the split ------------------------------------------------------------

def _forged_payload(lm, **kwargs):
    """A request carrying `kwargs` as model options, as a broken or hostile client might send."""
    with lm.trace(A, remote="local") as tracer:
        pass
    trace = CapturedTrace("trace", tracer.block, (A,), {}, FrameNames(__import__("sys")._getframe()), lm, tracer)
    built = build_request(trace, "m", DEFAULT_POLICY)
    built.request = built.request.model_copy(update={"kwargs": kwargs})
    return encode_request(built), built.request


@pytest.mark.parametrize("kwargs, words", [
    ({"max_upload_mb": 5}, "`max_upload_mb=` is a client option"),
    ({"blocking": False}, "`blocking=` is a client option"),
    ({"remote": True}, "`remote=` chooses where a trace runs"),
    ({"backend": 1}, "`backend=` chooses where a trace runs"),
    ({"__rows__": [[1, 2]]}, "reserved for Interlace"),
])
def test_prepare_refuses_forbidden_options_with_400(lm, kwargs, words):
    payload, _ = _forged_payload(lm, **kwargs)
    with pytest.raises(BadRequest) as info:
        prepare_payload(payload, DEFAULT_POLICY, {"m": lm})
    assert info.value.status == 400 and words in info.value.message


def test_the_client_refuses_reserved_names_up_front_with_the_servers_message(lm):
    payload, _ = _forged_payload(lm, __rows__=[[1]])
    with pytest.raises(BadRequest) as server:
        prepare_payload(payload, DEFAULT_POLICY, {"m": lm})
    for remote in ("local", True):
        with pytest.raises(TraceOptionError) as client:
            lm.trace(A, remote=remote, __rows__=[[1]])
        assert str(client.value) == server.value.message


def test_real_server_answers_a_forged_client_option_with_400(lm, use_server):
    payload, _ = _forged_payload(lm, max_upload_mb=5)
    response = httpx.post(
        use_server.url + "/v1/jobs", content=payload,
        headers={"X-Interlace-Key": use_server.key, "X-Interlace-Version": __version__,
                 "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert "`max_upload_mb=` is a client option" in response.text


def test_an_option_the_model_rejects_at_setup_is_the_users_error(lm):
    """Setting up the trace from the request's options is user territory: a TypeError there
    is reported at the user's `with` line, never as an internal server error."""
    _, request = _forged_payload(lm, max_upload_mb=5)  # past prepare (a runner calling directly)
    with pytest.raises(JobFailed) as info:
        execute_request(request, {}, lm, policy=DEFAULT_POLICY, log=lambda line: None)
    text = info.value.traceback_text
    assert "max_upload_mb" in text and "with lm.trace(A, remote=\"local\") as tracer:" in text
    assert info.value.category == "TraceOptionError"


def test_a_bad_model_keyword_is_reported_as_the_users_error_at_the_with_line(lm, mode):
    with pytest.raises(Exception) as info:
        with lm.generate(A, remote=mode, max_new_tokens=2, not_a_generate_option=3):
            out = lm.generator.output.save()
    text = str(info.value)
    assert "not_a_generate_option" in text
    assert "Internal server error" not in text and "server problem" not in text
    if mode is not False:
        assert getattr(info.value, "category", None) != "internal"
        assert "with lm.generate(A, remote=mode, max_new_tokens=2, not_a_generate_option=3):" in text


# -- blocking=False --------------------------------------------------------------------------

def test_non_blocking_names_say_how_to_get_their_values(lm, use_server):
    kept = "before"
    with lm.trace(A, remote=True, blocking=False) as tracer:
        h = lm.transformer.h[1].output.save()
        kept = lm.transformer.h[2].output  # not saved: the caller's value stays
        fresh = h.sum()  # assigned, not saved, new to the caller
    assert kept == "before"
    for value in (h, fresh):
        assert "not fetched yet" in repr(value)
        with pytest.raises(ResultNotReadyError, match=r"values = tracer\.job\.result\(\)"):
            value.shape
        with pytest.raises(ResultNotReadyError, match="blocking=False"):
            torch.allclose(value, torch.zeros(1))
        with pytest.raises(ResultNotReadyError):
            value + 1
        with pytest.raises(ResultNotReadyError):
            print(value)
    values = tracer.job.result(timeout=60)
    assert torch.allclose(values["h"], raw_block_output(lm, A, 1), atol=1e-5)
    assert set(values) == {"h"}


def test_non_blocking_without_a_tracer_name_points_at_attach(lm, use_server):
    with lm.trace(B, remote=True, blocking=False):
        h = lm.transformer.h[0].output.save()
    with pytest.raises(ResultNotReadyError, match=r"interlace\.attach\('[0-9a-f]+'\)\.result\(\)\[?") as info:
        h[0]
    job_id = re.search(r"attach\('([0-9a-f]+)'\)", str(info.value)).group(1)
    values = interlace.attach(job_id).result(timeout=60)
    assert torch.allclose(values["h"], raw_block_output(lm, B, 0), atol=1e-5)
