"""The local job history (`interlace.jobs`, `interlace jobs ...`): every `remote='local'` and
`remote=True` run is recorded, and can be listed, shown, rerun (in either mode), compared and
pruned.

Each test points the history at a temp dir of its own (`history` fixture). The truth for
values is a separately loaded transformers model under raw hooks (`raw_truth.RawLM`); for a
server run's timeline and sizes, the server's own status of the job.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch
from raw_truth import RawLM  # tests/raw_truth.py

import interlace
from interlace import cli
from interlace.backends import LocalSimulationBackend, history_store
from interlace.backends.history import JobHistoryError
from interlace.backends.history_store import history_path, record_run
from interlace.contract.http import JOB_EVENTS, KEY_HEADER, VERSION_HEADER, path

PROMPT = "The Eiffel Tower is in"
MLP = "transformer.h.1.mlp"


@pytest.fixture
def history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty history of this test's own, keeping results."""
    monkeypatch.setenv("INTERLACE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(interlace.CONFIG.APP, "HISTORY", True)
    monkeypatch.setattr(interlace.CONFIG.APP, "HISTORY_RESULTS", True)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """The tiny GPT-2 by path: the key the session's real server hosts it under."""
    return interlace.LanguageModel(str(tiny_gpt2_path))


@pytest.fixture(scope="module")
def raw_gpt2(tiny_gpt2_path: Path) -> RawLM:
    return RawLM(tiny_gpt2_path)


def run(model: interlace.LanguageModel, prompt: str, remote: bool | str) -> dict[str, torch.Tensor]:
    with model.trace(prompt, remote=remote):
        mlp = model.transformer.h[1].mlp.output.save()
        logits = model.lm_head.output.save()
    return {"mlp": mlp, "logits": logits}


def truth(raw: RawLM, prompt: str) -> dict[str, torch.Tensor]:
    logits, seen = raw.run(prompt, capture=(MLP,))
    return {"mlp": seen[MLP], "logits": logits}


def assert_values(values: dict, expected: dict) -> None:
    assert set(values) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(values[name], tensor, rtol=1e-5, atol=1e-5)


# -- recording ----------------------------------------------------------------------------------


def test_every_remote_mode_is_recorded_and_a_local_run_is_not(history, gpt2, use_server):
    run(gpt2, PROMPT, False)
    assert interlace.jobs.list() == []
    run(gpt2, PROMPT, "local")
    run(gpt2, PROMPT, True)
    server, local = interlace.jobs.list()  # newest first
    assert (local.mode, server.mode) == ("local", "server")
    assert local.status == server.status == "COMPLETED"
    assert local.model_key == server.model_key == str(gpt2.model_key)
    assert local.model_source == server.model_source == {"kind": "language_model", "path": gpt2.model_key,
                                                         "load_kwargs": {}}
    for record in (local, server):
        # The shipped body and where it is in this file.
        assert record.filename == __file__ and record.lineno == run.__code__.co_firstlineno + 1
        assert "model.transformer.h[1].mlp.output.save()" in record.source
        assert record.kind == "trace" and not record.dry_run and record.mocked == () and record.rerun_of is None
        assert record.error is None and record.error_category is None


def test_a_simulated_run_records_its_timeline_and_bytes(history, gpt2, raw_gpt2):
    backend = LocalSimulationBackend(gpt2)
    before = time.time()
    with gpt2.trace(PROMPT, backend=backend):
        logits = gpt2.lm_head.output.save()
    after = time.time()
    [record] = interlace.jobs.list()
    full = interlace.jobs.show(record.id)
    assert [s for s, _ in record.timeline] == ["RECEIVED", "RUNNING", "COMPLETED"]
    times = [t for _, t in record.timeline]
    assert before <= times[0] <= times[1] <= times[2] <= after
    # The payload is the request the backend sent; the result decodes to what the trace bound.
    assert full.payload == backend.get_last_payload() and record.payload_size == len(full.payload)
    assert record.result_size == len(full.result)
    torch.testing.assert_close(interlace.jobs.values(record.id)["logits"], logits)
    torch.testing.assert_close(logits, truth(raw_gpt2, PROMPT)["logits"], rtol=1e-5, atol=1e-5)


def test_a_server_run_records_the_servers_timeline_and_sizes(history, gpt2, use_server):
    run(gpt2, PROMPT, True)
    [record] = interlace.jobs.list()
    # The server's own account: the job's row and its recorded events.
    events = httpx.get(use_server.url + path(JOB_EVENTS, job_id=record.server_job_id),
                       headers={KEY_HEADER: use_server.key, VERSION_HEADER: interlace.__version__}).json()
    status = events["status"]
    assert record.host == use_server.url
    assert record.timeline == tuple((e["status"], e["time"]) for e in events["events"] if e["status"] != "LOG")
    assert [s for s, _ in record.timeline][-2:] == ["RUNNING", "COMPLETED"]
    assert record.timeline[0][1] == status["created"]
    assert (record.payload_size, record.result_size) == (status["payload_size"], status["result_size"])


def test_a_job_not_waited_for_is_recorded_when_sent_and_finished_when_its_result_comes(history, gpt2, raw_gpt2,
                                                                                        use_server):
    with gpt2.trace(PROMPT, remote=True, blocking=False) as tracer:
        logits = gpt2.lm_head.output.save()
    [sent] = interlace.jobs.list()
    assert sent.status in ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED") and sent.result_size is None
    assert sent.server_job_id == tracer.job.id
    values = tracer.job.result(timeout=60)
    [done] = interlace.jobs.list()
    assert done.id == sent.id and done.status == "COMPLETED" and done.timeline[-1][0] == "COMPLETED"
    assert done.result_size == len(interlace.jobs.show(done.id).result)
    torch.testing.assert_close(interlace.jobs.values(done.id)["logits"], values["logits"])
    torch.testing.assert_close(values["logits"], truth(raw_gpt2, PROMPT)["logits"], rtol=1e-5, atol=1e-5)


def test_results_are_kept_only_when_asked(history, gpt2, monkeypatch):
    monkeypatch.setattr(interlace.CONFIG.APP, "HISTORY_RESULTS", False)
    run(gpt2, PROMPT, "local")
    record = interlace.jobs.show(interlace.jobs.list()[0].id)
    assert record.result is None and record.result_size > 0 and record.payload is not None
    with pytest.raises(JobHistoryError, match="HISTORY_RESULTS = True"):
        interlace.jobs.values(record.id)


@pytest.mark.parametrize("remote", ["local", True], ids=["simulated", "server"])
def test_a_failing_job_records_its_error(history, gpt2, remote, request):
    if remote is True:
        request.getfixturevalue("use_server")
    with pytest.raises(IndexError) as raised:
        with gpt2.trace(PROMPT, remote=remote):
            gpt2.transformer.h[10].output.save()
    [record] = interlace.jobs.list()
    assert record.status == "ERROR" and record.timeline[-1][0] == "ERROR"
    assert record.error_category == "IndexError"
    assert "index 10 is out of range" in record.error and "index 10 is out of range" in str(raised.value)
    assert record.result_size is None


def test_the_off_switch_records_nothing(history, gpt2, use_server, monkeypatch):
    monkeypatch.setattr(interlace.CONFIG.APP, "HISTORY", False)
    values = run(gpt2, PROMPT, "local")
    run(gpt2, PROMPT, True)
    assert "logits" in values
    assert not history_path().exists()  # not even opened
    monkeypatch.setattr(interlace.CONFIG.APP, "HISTORY", True)
    assert interlace.jobs.list() == []


def test_a_history_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, gpt2, raw_gpt2):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    monkeypatch.setenv("INTERLACE_DATA_DIR", str(blocker))
    monkeypatch.setattr(history_store, "_warned", False)
    with pytest.warns(RuntimeWarning, match="could not record this run") as caught:
        first = run(gpt2, PROMPT, "local")
        second = run(gpt2, PROMPT, "local")
        history_store.store.flush()  # the rows are written (and fail) in the writer thread
    assert len([w for w in caught if "could not record" in str(w.message)]) == 1
    assert_values(first, truth(raw_gpt2, PROMPT))
    assert_values(second, truth(raw_gpt2, PROMPT))


def test_threads_and_processes_record_side_by_side(history, gpt2, raw_gpt2):
    # A model runs one trace at a time: each thread traces its own copy.
    models = [interlace.LanguageModel(gpt2.model_key, dispatch=True) for _ in range(4)]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda m=m: results.append(run(m, PROMPT, "local"))) for m in models]
    code = ("from interlace.backends.history_store import record_run\n"
            "import time\n"
            "for i in range(25):\n"
            "    assert record_run(mode='local', model_key='k', payload=b'x' * i, timeline=[('RECEIVED', time.time())])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(results) == 4
    for values in results:
        assert_values(values, truth(raw_gpt2, PROMPT))
    records = interlace.jobs.list(limit=None)
    assert len(records) == 4 + 50
    assert [r.status for r in records if r.model_key == str(gpt2.model_key)] == ["COMPLETED"] * 4


# -- rerun --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "again"), [("local", "local"), (True, True), ("local", True), (True, "local")],
                         ids=["simulated", "server", "simulated-on-server", "server-simulated"])
def test_rerun_reproduces_the_recorded_result(history, gpt2, raw_gpt2, first, again, request):
    if True in (first, again):
        request.getfixturevalue("use_server")
    original = run(gpt2, PROMPT, first)
    [record] = interlace.jobs.list()
    values = interlace.jobs.rerun(record.id[:8], remote=again)  # a unique prefix is enough
    assert_values(values, original)
    assert_values(values, truth(raw_gpt2, PROMPT))
    rerun = interlace.jobs.list()[0]
    assert rerun.rerun_of == record.id and rerun.mode == ("server" if again is True else "local")
    assert rerun.status == "COMPLETED" and rerun.source == record.source


def test_rerun_here_loads_the_model_from_its_recorded_path(history, gpt2, raw_gpt2, use_server):
    run(gpt2, PROMPT, True)
    [record] = interlace.jobs.list()
    other = interlace.jobs.rerun(record.id, remote="local", model=interlace.LanguageModel(gpt2.model_key))
    loaded = interlace.jobs.rerun(record.id, remote="local")  # no model=: loaded from record.model_source
    assert_values(other, truth(raw_gpt2, PROMPT))
    assert_values(loaded, truth(raw_gpt2, PROMPT))


def test_a_mocked_run_is_never_rerun_on_a_server(history, gpt2, raw_gpt2):
    run(gpt2, PROMPT, "local")
    real = interlace.jobs.show(interlace.jobs.list()[0].id)
    mocked = record_run(mode="local", model_key=real.model_key, payload=real.payload, model_source=real.model_source,
                        source=(real.source, real.filename, real.lineno),
                        timeline=[("RECEIVED", time.time()), ("COMPLETED", time.time())], mocked=["transformer.h.1.mlp"])
    assert interlace.jobs.show(mocked).mocked == ("transformer.h.1.mlp",)
    with pytest.raises(JobHistoryError, match=r"mocked modules \(transformer\.h\.1\.mlp\).*never sent to a server"):
        interlace.jobs.rerun(mocked, remote=True)
    assert [r.rerun_of for r in interlace.jobs.list()] == [None, None]  # nothing ran
    # Here, the replay runs the real modules (the mocks were never in the request bytes).
    assert_values(interlace.jobs.rerun(mocked, remote="local"), truth(raw_gpt2, PROMPT))
    assert interlace.jobs.list()[0].mocked == ()


def test_ids_unknown_and_ambiguous(history):
    for _ in range(20):  # 20 ids of 32 hex digits: two share a first digit
        record_run(mode="local", model_key="k", payload=b"", timeline=[("RECEIVED", time.time())])
    with pytest.raises(JobHistoryError, match="No recorded job has an id starting with 'zz'"):
        interlace.jobs.show("zz")
    firsts = [r.id[0] for r in interlace.jobs.list(limit=None)]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(JobHistoryError, match="More than one recorded job"):
        interlace.jobs.show(shared)


# -- diff, prune ----------------------------------------------------------------------------------


def test_diff_names_the_differing_input_and_values(history, gpt2, raw_gpt2):
    other = "The Colosseum is in"
    assert raw_gpt2.n_tokens(other) == raw_gpt2.n_tokens(PROMPT)  # same shapes: values compare
    run(gpt2, PROMPT, "local")
    run(gpt2, other, "local")
    second, first = interlace.jobs.list()
    found = interlace.jobs.diff(first.id, second.id)
    assert found.inputs == {"args[0]": f'"{PROMPT}" -> "{other}"'}
    assert found.source == "" and found.status is None
    a, b = truth(raw_gpt2, PROMPT), truth(raw_gpt2, other)
    for name in ("mlp", "logits"):
        expected = (a[name].double() - b[name].double()).abs().max().item()
        reported = float(found.values[name].removeprefix("max abs difference "))
        assert reported == pytest.approx(expected, rel=1e-4)
    assert not interlace.jobs.diff(first.id, first.id)


def test_prune_removes_what_it_says_and_keeps_the_rest(history):
    day = 86400.0
    now = time.time()
    ages = {"old": 40 * day, "month": 29 * day, "week": 7 * day, "new": 0.0}
    ids = {name: record_run(mode="local", model_key=name, payload=b"p", timeline=[("RECEIVED", now - age)])
           for name, age in ages.items()}
    with pytest.raises(ValueError, match="needs `older_than=` or `keep=`"):
        interlace.jobs.prune()
    assert interlace.jobs.prune(older_than=timedelta(days=30)) == [ids["old"]]
    assert {r.id for r in interlace.jobs.list()} == {ids["month"], ids["week"], ids["new"]}
    # Older than a day, but never the two newest: only "month" goes.
    assert interlace.jobs.prune(older_than=1, keep=2) == [ids["month"]]
    assert interlace.jobs.prune(keep=1) == [ids["week"]]
    assert [r.id for r in interlace.jobs.list()] == [ids["new"]]


# -- the command line -----------------------------------------------------------------------------


def test_the_cli_prints_what_the_api_returns(history, gpt2, capsys):
    run(gpt2, PROMPT, "local")
    run(gpt2, "The Colosseum is in", "local")
    records = interlace.jobs.list()
    assert cli.main(["jobs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [r.id[:12] for r in records]

    assert cli.main(["jobs", "show", records[0].id[:6]]) == 0
    shown = capsys.readouterr().out
    assert f"id:        {records[0].id}" in shown and "status:    COMPLETED" in shown
    assert f"payload {records[0].payload_size} bytes, result {records[0].result_size} bytes" in shown
    assert "model.transformer.h[1].mlp.output.save()" in shown

    assert cli.main(["jobs", "diff", records[1].id, records[0].id]) == 0
    assert capsys.readouterr().out.strip() == str(interlace.jobs.diff(records[1].id, records[0].id))

    assert cli.main(["jobs", "rerun", records[0].id, "--remote", "local"]) == 0
    printed = capsys.readouterr().out
    recorded = interlace.jobs.values(records[0].id)
    for name, value in recorded.items():
        assert f"  {name}: tensor {tuple(value.shape)} float32, mean {value.double().mean().item():.6g}" in printed

    assert cli.main(["jobs", "show", "zz"]) == 1
    assert "No recorded job has an id starting with 'zz'" in capsys.readouterr().err

    everything = [r.id for r in interlace.jobs.list(limit=None)]
    assert cli.main(["jobs", "prune", "--keep", "1"]) == 0
    pruned = capsys.readouterr().out
    assert "Removed 2 records" in pruned and all(i in pruned for i in everything[1:])
    assert [r.id for r in interlace.jobs.list()] == everything[:1]


def test_the_whole_suite_records_into_a_temp_dir(tmp_path_factory):
    # tests/conftest.py points the history away from the user's real one for every test.
    assert history_path().is_relative_to(tmp_path_factory.getbasetemp())
    assert interlace.jobs.path == str(history_path())
