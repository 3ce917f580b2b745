"""Co-batching at the execution level (issue 19): `cobatch.run_batch` runs several users' jobs
in one forward, and each job ends exactly as it would alone.

Each job is built by the client's own encoder (the payload a server receives), decoded by
`prepare_payload` for a separately loaded served model, and run with its neighbours by
`run_batch`. The truth is independent: a transformers model loaded on its own, one forward
per job (batch of 1) under raw PyTorch hooks, each edit done in the hook
(`cobatch_helpers.RawTruth`). `outcome.rows` says whether a job shared a forward (the rows
of that forward) or ran alone (0).
"""

# The trace bodies bind the names they save, which run on the "server" side only (the
# encoder sends nothing back here): F841 would flag every one.
# ruff: noqa: F841

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import interlace
from cobatch_helpers import TOL, Encoder, RawTruth, ids_of, values_of  # tests/cobatch/cobatch_helpers.py
from interlace.backends.outbound import build_request, encode_request
from interlace.contract.policy import DEFAULT_POLICY, Policy
from interlace.contract.problems import RemoteValidationError
from interlace.execution import cobatch
from interlace.execution.cobatch import JobOutcome
from interlace.execution.errors import JobFailed
from interlace.execution.receive import prepare_payload
from interlace.execution.run import run_prepared

# Far above what a job on the tiny GPT-2 takes, even on a loaded machine; the timeout test
# sets its own.
POLICY = DEFAULT_POLICY.model_copy(update={"timeout_seconds": 120.0})


@pytest.fixture
def key(tiny_gpt2_path: Path) -> str:
    return str(tiny_gpt2_path)


@pytest.fixture
def enc(key: str) -> Encoder:
    return Encoder(key, POLICY)


def _batch(payloads: list[bytes], hosted: Any, key: str, policy: Policy = POLICY) -> list[JobOutcome]:
    prepared = [prepare_payload(p, policy, {key: hosted}) for p in payloads]
    return cobatch.run_batch(prepared, hosted, policy)


def _alone(payload: bytes, hosted: Any, key: str, policy: Policy = POLICY) -> JobOutcome:
    """The job run by itself, as a server without co-batching runs it."""
    outcome = JobOutcome()
    try:
        outcome.result = run_prepared(prepare_payload(payload, policy, {key: hosted}), hosted, policy,
                                      outcome.logs.append)
    except JobFailed as failed:
        outcome.failure = failed
    return outcome


def _close(got: Any, expected: Any) -> None:
    torch.testing.assert_close(got, expected, **TOL)


def _plus_five_at_last(h: torch.Tensor) -> torch.Tensor:
    h[:, -1] += 5
    return h


# -- reads, saves and edits ----------------------------------------------------------------------


def test_reads_saves_and_edits_each_get_their_alone_values(client, hosted, raw: RawTruth, key, enc):
    model = client
    a, b, c, d, e, f = (ids_of(seed) for seed in range(6))
    with model.trace(a, backend=enc):  # reads of several modules' outputs and inputs
        h1 = model.transformer.h[1].output.save()
        in2 = model.transformer.h[2].input.save()
        mlp_in = model.transformer.h[3].mlp.input.save()
        ln = model.transformer.ln_f.output.save()
    with model.trace(b, backend=enc):  # an in-place edit
        model.transformer.h[0].output[:, -1] += 5
        h0 = model.transformer.h[0].output.save()
        logits = model.lm_head.output.save()
    with model.trace(c, backend=enc):  # assignment
        model.transformer.h[1].output = model.transformer.h[1].output * 2
        logits = model.lm_head.output.save()
    with model.trace(d, backend=enc):  # an `.input` edit
        model.transformer.h[2].input = model.transformer.h[2].input + 1
        out2 = model.transformer.h[2].output.save()
        last = model.lm_head.output[:, -1].save()
    with model.trace(e, backend=enc):  # saves of slices
        part = model.transformer.h[3].output[:, 2:5, :8].save()
        top = model.lm_head.output[0, -1].argmax(dim=-1).save()
    with model.trace(f, backend=enc):  # reads the module the job beside it edits
        h0 = model.transformer.h[0].output.save()
        logits = model.lm_head.output.save()
    outcomes = _batch(enc.payloads, hosted, key)
    assert [o.rows for o in outcomes] == [6] * 6  # one forward of all six

    truth = raw.run(a, outputs=("transformer.h.1", "transformer.ln_f"), inputs=("transformer.h.2", "transformer.h.3.mlp"))
    got = values_of(outcomes[0])
    _close(got["h1"], truth["out:transformer.h.1"])
    _close(got["in2"], truth["in:transformer.h.2"])
    _close(got["mlp_in"], truth["in:transformer.h.3.mlp"])
    _close(got["ln"], truth["out:transformer.ln_f"])

    truth = raw.run(b, outputs=("transformer.h.0",), edit_out={"transformer.h.0": _plus_five_at_last})
    got = values_of(outcomes[1])
    _close(got["h0"], truth["out:transformer.h.0"])
    _close(got["logits"], truth["logits"])

    truth = raw.run(c, edit_out={"transformer.h.1": lambda h: h * 2})
    _close(values_of(outcomes[2])["logits"], truth["logits"])

    truth = raw.run(d, outputs=("transformer.h.2",), edit_in={"transformer.h.2": lambda h: h + 1})
    got = values_of(outcomes[3])
    _close(got["out2"], truth["out:transformer.h.2"])
    _close(got["last"], truth["logits"][:, -1])

    truth = raw.run(e, outputs=("transformer.h.3",))
    got = values_of(outcomes[4])
    _close(got["part"], truth["out:transformer.h.3"][:, 2:5, :8])
    assert got["part"].shape == (1, 3, 8)
    assert int(got["top"]) == int(truth["logits"][0, -1].argmax())

    truth = raw.run(f, outputs=("transformer.h.0",))  # unedited: job b's edit is b's alone
    got = values_of(outcomes[5])
    _close(got["h0"], truth["out:transformer.h.0"])
    _close(got["logits"], truth["logits"])
    assert not torch.allclose(got["logits"], raw.run(f, edit_out={"transformer.h.0": _plus_five_at_last})["logits"])


def test_jobs_that_edit_the_same_module_each_keep_their_own_edit(client, hosted, raw, key, enc):
    model = client
    rows = [ids_of(seed) for seed in range(10, 13)]
    with model.trace(rows[0], backend=enc):
        model.transformer.h[1].output[:] = 0
        logits = model.lm_head.output.save()
    with model.trace(rows[1], backend=enc):
        model.transformer.h[1].output = model.transformer.h[1].output * -1
        logits = model.lm_head.output.save()
    with model.trace(rows[2], backend=enc):
        h = model.transformer.h[1].output.save()
        logits = model.lm_head.output.save()
    outcomes = _batch(enc.payloads, hosted, key)
    assert [o.rows for o in outcomes] == [3, 3, 3]
    _close(values_of(outcomes[0])["logits"], raw.run(rows[0], edit_out={"transformer.h.1": lambda h: h * 0})["logits"])
    _close(values_of(outcomes[1])["logits"], raw.run(rows[1], edit_out={"transformer.h.1": lambda h: -h})["logits"])
    truth = raw.run(rows[2], outputs=("transformer.h.1",))
    _close(values_of(outcomes[2])["h"], truth["out:transformer.h.1"])
    _close(values_of(outcomes[2])["logits"], truth["logits"])




# -- each job's failure, stop and printed lines are its own ----------------------------------------


def test_a_failing_job_fails_alone_and_its_neighbours_complete(client, hosted, raw, key, enc):
    """A body that raises, one that stops early, one that waits for a module that never runs
    (`attn_dropout` is not called by the eager attention): each ends as it does alone, with
    its own traceback line and category; the jobs beside them complete with their own values
    and printed lines."""
    model = client
    rows = [ids_of(seed) for seed in range(20, 25)]
    with model.trace(rows[0], backend=enc):
        h = model.transformer.h[0].output.save()
        missing = {}["no such key"]
    with model.trace(rows[1], backend=enc) as tracer:
        h = model.transformer.h[1].output.save()
        tracer.stop()
        after = model.transformer.h[2].output.save()
    with model.trace(rows[2], backend=enc):
        h = model.transformer.h[1].output.save()
        never = model.transformer.h[1].attn.attn_dropout.output.save()
    with model.trace(rows[3], backend=enc):
        print("job three here")
        print("its rows:", model.transformer.h[2].output.shape)
        norm = model.transformer.h[2].output.norm().save()
    with model.trace(rows[4], backend=enc):
        print("job four here")
        logits = model.lm_head.output.save()
    outcomes = _batch(enc.payloads, hosted, key)
    assert [o.rows for o in outcomes] == [5] * 5
    alone = [_alone(p, hosted, key) for p in enc.payloads]

    raised = outcomes[0].failure
    assert raised is not None and outcomes[0].result is None
    assert raised.category == "KeyError" and raised.traceback_text.endswith("KeyError: 'no such key'")
    assert 'missing = {}["no such key"]' in raised.traceback_text and __file__ in raised.traceback_text
    assert (raised.category, raised.traceback_text) == (alone[0].failure.category, alone[0].failure.traceback_text)

    stopped = values_of(outcomes[1])
    assert sorted(stopped) == ["h"]  # what it saved before `tracer.stop()`, nothing after
    _close(stopped["h"], raw.run(rows[1], outputs=("transformer.h.1",))["out:transformer.h.1"])

    never = outcomes[2].failure
    assert never is not None and never.category == "ModuleNotCalledError"
    assert "never = model.transformer.h[1].attn.attn_dropout.output.save()" in never.traceback_text
    assert (never.category, never.traceback_text) == (alone[2].failure.category, alone[2].failure.traceback_text)

    truth = raw.run(rows[3], outputs=("transformer.h.2",))
    _close(values_of(outcomes[3])["norm"], truth["out:transformer.h.2"].norm())
    _close(values_of(outcomes[4])["logits"], raw.run(rows[4])["logits"])
    # Each job's printed lines, and only its own: as alone.
    assert outcomes[3].logs == ["job three here", "its rows: torch.Size([1, 8, 128])"] == alone[3].logs
    assert outcomes[4].logs == ["job four here"] == alone[4].logs
    assert [o.logs for o in outcomes[:3]] == [[], [], []]


def test_a_job_over_its_time_limit_fails_alone_and_the_others_clocks_exclude_it(client, hosted, raw, key):
    """The spinner holds the shared forward at block 1 until its own limit: it fails with the
    timeout, as alone; its neighbours' clocks do not count its time, so the job that reads
    block 2 after it (and runs its own short loop, where the guard checks the clock) is not
    timed out, though the forward took longer than its limit."""
    limit = 2.0
    policy = DEFAULT_POLICY.model_copy(update={"timeout_seconds": limit})
    enc = Encoder(key, policy)
    model = client
    rows = [ids_of(seed) for seed in range(40, 43)]
    with model.trace(rows[0], backend=enc):
        h = model.transformer.h[0].output.save()
    with model.trace(rows[1], backend=enc):
        h = model.transformer.h[1].output.save()
        spun = 0
        for i in range(10**10):
            spun += i
    with model.trace(rows[2], backend=enc):
        x = 0
        for i in range(1000):
            x += i
        h = model.transformer.h[2].output.save()
        for i in range(1000):
            x += i
        logits = model.lm_head.output.save()
    outcomes = _batch(enc.payloads, hosted, key, policy)
    assert [o.rows for o in outcomes] == [3, 3, 3]
    spinner = outcomes[1].failure
    assert spinner is not None and spinner.category == "JobLimitExceeded"
    assert f"wall-time limit of {limit:g} s" in spinner.traceback_text and "for i in range(10**10):" in spinner.traceback_text
    _close(values_of(outcomes[0])["h"], raw.run(rows[0], outputs=("transformer.h.0",))["out:transformer.h.0"])
    truth = raw.run(rows[2], outputs=("transformer.h.2",))
    got = values_of(outcomes[2])
    _close(got["h"], truth["out:transformer.h.2"])
    _close(got["logits"], truth["logits"])


# -- what cannot share runs alone, and is still exact ---------------------------------------------


def test_jobs_that_cannot_share_run_alone_and_are_exact(client, hosted, raw, key, enc):
    """`.skip` runs alone by the rule; a skip the rule cannot see (reached through `getattr`)
    and an edit of a value the batch shares (the position ids, one row for all) are found in
    the shared forward and re-run alone; a different token count gets its own forward; each
    ends exactly as alone, and the jobs that can share still do."""
    model = client
    rows = [ids_of(seed) for seed in range(50, 56)]
    short = ids_of(56, n=6)
    with model.trace(rows[0], backend=enc):
        model.transformer.h[1].skip(model.transformer.h[0].output)
        logits = model.lm_head.output.save()
    with model.trace(rows[1], backend=enc):
        getattr(model.transformer.h[2], "sk" + "ip")(model.transformer.h[1].output)
        logits = model.lm_head.output.save()
    with model.trace(rows[2], backend=enc):
        model.transformer.wpe.input[:] = 0
        logits = model.lm_head.output.save()
    with model.trace(short, backend=enc):
        logits = model.lm_head.output.save()
    with model.trace(rows[3], backend=enc):
        h = model.transformer.h[1].output.save()
    with model.trace(rows[4], backend=enc):
        model.transformer.h[1].output[:, 0] = 1
        logits = model.lm_head.output.save()
    with model.trace([rows[5], rows[0]], backend=enc):  # one job, two prompts: two rows
        h = model.transformer.h[3].output[:, -1].save()
        logits = model.lm_head.output.save()
    outcomes = _batch(enc.payloads, hosted, key)
    # The forward had six rows: the two jobs that left it (and re-ran alone) were in it.
    assert [o.rows for o in outcomes] == [0, 0, 0, 0, 6, 6, 6]

    h0 = raw.run(rows[0], outputs=("transformer.h.0",))["out:transformer.h.0"]
    _close(values_of(outcomes[0])["logits"], raw.run(rows[0], edit_out={"transformer.h.1": lambda h: h0})["logits"])
    h1 = raw.run(rows[1], outputs=("transformer.h.1",))["out:transformer.h.1"]
    _close(values_of(outcomes[1])["logits"], raw.run(rows[1], edit_out={"transformer.h.2": lambda h: h1})["logits"])
    _close(values_of(outcomes[2])["logits"], raw.run(rows[2], edit_in={"transformer.wpe": lambda p: p * 0})["logits"])
    _close(values_of(outcomes[3])["logits"], raw.run(short)["logits"])
    _close(values_of(outcomes[4])["h"], raw.run(rows[3], outputs=("transformer.h.1",))["out:transformer.h.1"])

    def first_position_one(h: torch.Tensor) -> torch.Tensor:
        h[:, 0] = 1
        return h

    _close(values_of(outcomes[5])["logits"], raw.run(rows[4], edit_out={"transformer.h.1": first_position_one})["logits"])
    truth = raw.run([rows[5], rows[0]], outputs=("transformer.h.3",))
    got = values_of(outcomes[6])
    assert got["h"].shape == (2, 128) and got["logits"].shape == (2, 8, 512)
    _close(got["h"], truth["out:transformer.h.3"][:, -1])
    _close(got["logits"], truth["logits"])


def test_equal_token_counts_share_and_others_get_their_own_forward(client, hosted, raw, key, enc):
    model = client
    inputs = [ids_of(60, n=6), ids_of(61), ids_of(62, n=6), ids_of(63), ids_of(64, n=5)]
    for ids in inputs:
        with model.trace(ids, backend=enc):
            logits = model.lm_head.output.save()
    outcomes = _batch(enc.payloads, hosted, key)
    assert [o.rows for o in outcomes] == [2, 2, 2, 2, 0]
    for ids, outcome in zip(inputs, outcomes):
        _close(values_of(outcome)["logits"], raw.run(ids)["logits"])



# -- isolation attacks ---------------------------------------------------------------------------

#: Attacks the client's validator refuses before anything is sent (the server's own check of
#: the payload, and the guard its body is compiled under, refuse the same names).
REFUSED = ("as_strided", "untyped_storage", "set_", "_base", "resize_")


def _attacks(model: interlace.LanguageModel, enc: Encoder, ids: list[int]) -> list[str]:
    """Encode each attack whose body the client lets through; returns their names in order."""
    names = []
    with model.trace(ids, backend=enc):  # a row beyond its own, by index
        x = model.transformer.h[0].output[1].save()
    names.append("index 1")
    with model.trace(ids, backend=enc):
        x = model.transformer.h[0].output[-2].save()
    names.append("index -2")
    with model.trace(ids, backend=enc):  # a flat view over as many elements as the batch has
        x = model.transformer.h[0].output.view(-1)[: 3 * 8 * 128].save()
    names.append("flat view")
    with model.trace(ids, backend=enc):  # where its rows lie in memory, and how many there are
        h = model.transformer.h[0].output
        x = interlace.save([h.storage_offset(), h.shape[0], h.numel(), model.lm_head.output.shape[0]])
    names.append("layout")
    with model.trace(ids, backend=enc):  # the forbidden names, reached through getattr
        h = model.transformer.h[0].output
        x = getattr(h, "as_" + "strided")((3 * 8 * 128,), (1,)).save()
    names.append("getattr as_strided")
    with model.trace(ids, backend=enc):
        h = model.transformer.h[0].output
        x = interlace.save(getattr(h, "untyped_" + "storage")().nbytes())
    names.append("getattr storage")
    with model.trace(ids, backend=enc):  # the model output's KV cache
        x = model.output.save()
    names.append("kv cache")
    with model.trace(ids, backend=enc):  # writes over more rows than its own
        h = model.transformer.h[0].output
        h.expand(3, 8, 128).fill_(1)
        x = h.view(-1)[: 3 * 8 * 128].save()
    names.append("expanded write")
    with model.trace(ids, backend=enc):  # replaces its rows by a batch of three
        model.transformer.h[0].output = model.transformer.h[0].output.expand(3, 8, 128) * 0
        x = model.transformer.h[1].output.save()
    names.append("three rows for one")
    with model.trace(ids, backend=enc):  # the shared weights
        model.transformer.wte.weight[:] = 0
        x = model.lm_head.output.save()
    names.append("weights")
    return names


def test_the_client_refuses_attacks_on_memory_before_sending(client, key, enc):
    model = client
    ids = ids_of(70)
    for attack in REFUSED:
        with pytest.raises(RemoteValidationError, match=f"`.{attack}` is not allowed in remote code"):
            if attack == "as_strided":
                with model.trace(ids, backend=enc):
                    x = model.transformer.h[0].output.as_strided((3 * 8 * 128,), (1,)).save()
            elif attack == "untyped_storage":
                with model.trace(ids, backend=enc):
                    x = interlace.save(model.transformer.h[0].output.untyped_storage().nbytes())
            elif attack == "set_":
                with model.trace(ids, backend=enc):
                    h = model.transformer.h[0].output
                    x = torch.empty(0).set_(h).save()
            elif attack == "_base":
                with model.trace(ids, backend=enc):
                    x = model.transformer.h[0].output[0]._base.save()
            else:
                with model.trace(ids, backend=enc):
                    model.transformer.h[0].output.resize_(3, 8, 128)
    assert enc.payloads == []


def test_isolation_attacks_see_only_the_jobs_own_rows(client, hosted, raw: RawTruth, key, enc):
    """Each attack runs between two neighbours. It either fails (as it does alone) or sees
    only its own row: the value it would see alone; the neighbours get their own values."""
    model = client
    ids, before, after = ids_of(70), ids_of(71), ids_of(72)
    names = _attacks(model, enc, ids)
    attacks = list(enc.payloads)
    with model.trace(before, backend=enc):
        h0 = model.transformer.h[0].output.save()
        logits = model.lm_head.output.save()
    with model.trace(after, backend=enc):
        h1 = model.transformer.h[1].output.save()
        logits = model.lm_head.output.save()
    neighbour_before, neighbour_after = enc.payloads[-2:]
    own = raw.run(ids, outputs=("transformer.h.0", "transformer.h.1"))
    truth_before = raw.run(before, outputs=("transformer.h.0",))
    truth_after = raw.run(after, outputs=("transformer.h.1",))
    seen: dict[str, str] = {}
    for name, attack in zip(names, attacks):
        outcomes = _batch([neighbour_before, attack, neighbour_after], hosted, key)
        _close(values_of(outcomes[0])["h0"], truth_before["out:transformer.h.0"])
        _close(values_of(outcomes[0])["logits"], truth_before["logits"])
        _close(values_of(outcomes[2])["h1"], truth_after["out:transformer.h.1"])
        _close(values_of(outcomes[2])["logits"], truth_after["logits"])
        outcome, alone = outcomes[1], _alone(attack, hosted, key)
        if outcome.failure is not None:
            assert alone.failure is not None, (name, outcome.failure.traceback_text)
            assert outcome.failure.category == alone.failure.category, name
            seen[name] = outcome.failure.category
            continue
        x = values_of(outcome)["x"]
        if name == "flat view":  # the view ends at its own row
            _close(x, own["out:transformer.h.0"].reshape(-1))
        elif name == "layout":
            assert x == [0, 1, 8 * 128, 1]
        elif name == "kv cache":
            _close(x["logits"], own["logits"])
            layers = x["cache"].layers
            assert len(layers) == 4
            for layer, expected in zip(layers, own["cache"].layers):
                assert layer.keys.shape == layer.values.shape == (1, 4, 8, 32)
                _close(layer.keys, expected.keys)
                _close(layer.values, expected.values)
        elif name == "expanded write":
            _close(x, torch.ones(8 * 128))
        elif name == "three rows for one":
            _close(x, values_of(alone)["x"])
            assert x.shape[0] == 3
        else:
            pytest.fail(f"the attack {name!r} completed: {x!r}")
        seen[name] = "own rows only"
    # Which way each went (a test that passes by every attack failing would say so here).
    assert seen == {
        "index 1": "IndexError", "index -2": "IndexError", "flat view": "own rows only", "layout": "own rows only",
        "getattr as_strided": "forbidden-attribute", "getattr storage": "forbidden-attribute",
        "kv cache": "own rows only", "expanded write": "own rows only", "three rows for one": "own rows only",
        "weights": "model-modified",
    }



def test_a_body_the_server_cannot_compile_fails_alone(client, hosted, raw, key, enc):
    """A payload the checks let through but whose body does not compile on the server (a
    hand-made request: `yield` at block level; the client refuses to send it) ends that job
    alone, as `run_batch` promises for any job's failure; its neighbours complete. (A raise
    out of `run_batch` ends every job of the batch: the thread runner's server then fails
    them all as internal errors.)"""
    model = client
    built: list[Any] = []
    with model.trace(ids_of(80), backend=lambda trace: built.append(build_request(trace, key, POLICY)) or {}):
        h = model.transformer.h[0].output.save()
    (forged,) = built
    block = forged.request.block
    forged.request = forged.request.model_copy(update={"block": block.model_copy(update={
        "source": block.source + "    x = yield 1\n"})})
    bad = encode_request(forged)
    prepare_payload(bad, POLICY, {key: hosted})  # (accepted: the failure comes at run time)
    with model.trace(ids_of(81), backend=enc):
        h = model.transformer.h[0].output.save()
    with model.trace(ids_of(82), backend=enc):
        logits = model.lm_head.output.save()
    outcomes = _batch([enc.payloads[0], bad, enc.payloads[1]], hosted, key)
    assert outcomes[1].failure is not None and outcomes[1].result is None
    assert "yield" in outcomes[1].failure.traceback_text
    # The user's error, in the user's file name (not an internal error of the server), as alone:
    assert outcomes[1].failure.category == "invalid-request"
    assert __file__ in outcomes[1].failure.traceback_text and "interlace-remote" not in outcomes[1].failure.traceback_text
    with pytest.raises(JobFailed) as alone:
        run_prepared(prepare_payload(bad, POLICY, {key: hosted}), hosted, POLICY, lambda line: None)
    assert alone.value.category == "invalid-request" and alone.value.traceback_text == outcomes[1].failure.traceback_text
    _close(values_of(outcomes[0])["h"], raw.run(ids_of(81), outputs=("transformer.h.0",))["out:transformer.h.0"])
    _close(values_of(outcomes[2])["logits"], raw.run(ids_of(82))["logits"])
