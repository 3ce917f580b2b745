"""The sandbox's layer 3: jobs run in confined worker processes, replaced when they die.

Two kinds of test:

- the process confinement on its own: `WorkerProcess` starts `worker_probe.py` (beside this
  file) exactly as it starts the real worker (bubblewrap, clean environment, socketpair, the
  same `confine()`), but the probe runs each job's bytes as plain Python, as if layers 1 and 2
  were both bypassed; every attempt must still fail;
- a real `interlace serve` with the tiny GPT-2 (`fake=False`): results identical to the
  thread runner, a worker killed or crashed mid-job fails that job with the reason and the
  next job runs on a fresh worker.

The durability point (kill -9 of the whole server under 8 clients) is in `test_durability.py`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

import interlace
from interlace.contract.policy import DEFAULT_POLICY
from interlace.execution.confine import available_layers
from interlace.execution.errors import JobFailed
from interlace.execution.process import WorkerDied, WorkerProcess, WorkerSpec, WorkerSupervisor
from interlace.testing import ServerProcess

PROMPT = "The Eiffel Tower is in the city of"
LAYERS = available_layers()
needs_sandbox = pytest.mark.skipif(not all(LAYERS.values()), reason=f"layer 3 incomplete on this host: {LAYERS}")


# -- the confinement on its own ----------------------------------------------------------------


def _probe(policy=DEFAULT_POLICY, **spec) -> WorkerProcess:
    assert (Path(__file__).parent / "worker_probe.py").is_file()
    return WorkerProcess(WorkerSpec("probe", {}, entry="worker_probe", **spec), policy).start(120)


def _run(worker: WorkerProcess, code: str):
    body, _ = worker.run(code.encode(), lambda line: None)
    return json.loads(body)


@pytest.fixture(scope="module")
def probe():
    worker = _probe()
    yield worker
    worker.close()


@needs_sandbox
def test_all_layers_active_here(probe):
    assert probe.layers == {"process": True, "namespaces": True, "seccomp": True, "rlimits": True}


@needs_sandbox
def test_no_server_secret_in_the_environment(monkeypatch):
    monkeypatch.setenv("INTERLACE_TEST_SERVER_SECRET", "canary-8d1f")
    monkeypatch.setenv("HF_TOKEN", "hf_canary")
    worker = _probe()
    try:
        env = _run(worker, "import os\nresult = dict(os.environ)")
        assert "canary-8d1f" not in json.dumps(env) and "hf_canary" not in json.dumps(env)
        assert env["HF_HUB_OFFLINE"] == "1"
        # Nor through /proc: the server is not in the worker's PID namespace.
        seen = _run(worker, f"import os\nresult = [os.path.exists('/proc/{os.getpid()}/environ'), "
                            "sorted(p for p in os.listdir('/proc') if p.isdigit())]")
        assert seen[0] is False and len(seen[1]) <= 3
    finally:
        worker.close()


def test_unwritten_memory_never_shows_an_earlier_jobs_values(probe):
    # Without the worker's MALLOC_PERTURB_, about 85% of these values come back: a tensor made
    # without writing it (the legacy constructor, `resize_`, `new_empty`) holds what the
    # previous job freed, another user's activations.
    _run(probe, "import torch\nkept = [torch.full((1000,), 12345.0) for _ in range(100)]\ndel kept\nresult = 1")
    code = ("import torch\n"
            "made = [torch.Tensor(1000) for _ in range(50)] + [torch.zeros(1).resize_(1000) for _ in range(50)]\n"
            "result = sum(int((t == 12345).sum()) for t in made)")
    assert _run(probe, code) == 0


@needs_sandbox
def test_no_network(probe):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "    result = 'connected'\nexcept OSError as e:\n    result = type(e).__name__\n")
        assert _run(probe, code) in ("PermissionError", "ConnectionRefusedError", "OSError")
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()


@needs_sandbox
def test_no_new_process_or_program(probe):
    code = """
import os, subprocess
out = {}
for name, call in [("fork", os.fork), ("subprocess", lambda: subprocess.run(["/bin/true"])),
                   ("exec", lambda: os.execv("/bin/true", ["true"])), ("system", lambda: os.system("true"))]:
    try:
        value = call()
        out[name] = "ran" if name != "system" or value == 0 else "refused"
        if name == "fork" and value == 0:
            os._exit(0)
    except OSError as e:
        out[name] = "refused"
result = out
"""
    assert _run(probe, code) == {"fork": "refused", "subprocess": "refused", "exec": "refused", "system": "refused"}


@needs_sandbox
def test_data_dir_and_files_out_of_reach(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "interlace.db").write_text("canary-db")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    # The model directory is readable; the data directory beside it (and one inside a bound
    # directory) is not; nothing can be written anywhere.
    nested = model_dir / "data"
    nested.mkdir()
    (nested / "secret").write_text("canary-nested")
    worker = _probe(read_paths=(str(model_dir),), hidden_paths=(str(data), str(nested)))
    try:
        code = f"""
import os
out = {{}}
for name, path in [("db", {str(data / 'interlace.db')!r}), ("nested", {str(nested / 'secret')!r}),
                   ("model", {str(model_dir / 'config.json')!r})]:
    try:
        out[name] = open(path).read()
    except OSError as e:
        out[name] = type(e).__name__
for name, path in [("write_model", {str(model_dir / 'x')!r}), ("write_tmp", "/tmp/x")]:
    try:
        open(path, "w").write("x")
        out[name] = "written"
    except OSError as e:
        out[name] = type(e).__name__
result = out
"""
        out = _run(worker, code)
        assert out["model"] == "{}"
        assert out["db"] == "FileNotFoundError" and out["nested"] == "FileNotFoundError"
        assert out["write_model"] != "written" and out["write_tmp"] != "written"
        assert not (model_dir / "x").exists()
    finally:
        worker.close()


def test_wall_clock_limit_kills():
    policy = DEFAULT_POLICY.model_copy(update={"timeout_seconds": 1.0})
    supervisor = WorkerSupervisor(WorkerSpec("probe", {}, entry="worker_probe"), policy)
    started = time.monotonic()
    with pytest.raises(JobFailed) as info:
        supervisor.run(b"import time\ntime.sleep(60)", lambda line: None)
    assert time.monotonic() - started < 15
    assert info.value.category == "timeout" and "wall-clock limit of 1 s" in info.value.traceback_text
    assert json.loads(supervisor.run(b"result = 2", lambda line: None)) == 2  # a fresh worker
    supervisor.close()


def test_cpu_limit_kills():
    policy = DEFAULT_POLICY.model_copy(update={"cpu_seconds": 1.0})
    worker = _probe(policy)
    try:
        with pytest.raises(WorkerDied) as info:
            worker.run(b"while True:\n    pass", lambda line: None)
        assert info.value.category == "cpu-limit" and "CPU-time limit of 1 s" in info.value.reason
    finally:
        worker.close()


def test_memory_limit():
    policy = DEFAULT_POLICY.model_copy(update={"max_memory_bytes": 256 * 2**20})
    worker = _probe(policy)
    try:
        with pytest.raises((JobFailed, WorkerDied)) as info:
            worker.run(b"x = bytearray(2 * 2**30)\nx[::4096] = b'1' * len(x[::4096])", lambda line: None)
        text = str(info.value)
        assert "MemoryError" in (getattr(info.value, "category", "") + text) or "memory limit" in text
    finally:
        worker.close()


def test_segfault_is_contained_and_the_worker_replaced():
    supervisor = WorkerSupervisor(WorkerSpec("probe", {}, entry="worker_probe"), DEFAULT_POLICY)
    with pytest.raises(JobFailed) as info:
        supervisor.run(b"import ctypes\nctypes.string_at(0)", lambda line: None)
    assert info.value.category == "crash" and "SIGSEGV" in info.value.traceback_text
    assert json.loads(supervisor.run(b"result = 'next'", lambda line: None)) == "next"
    assert supervisor.restarts == 1
    supervisor.close()


def test_a_worker_that_garbles_its_channel_is_stopped():
    supervisor = WorkerSupervisor(WorkerSpec("probe", {}, entry="worker_probe"), DEFAULT_POLICY)
    code = b"import os, sys, time\nos.write(int(sys.argv[sys.argv.index('--fd') + 1]), b'\\xff' * 12)\ntime.sleep(60)"
    started = time.monotonic()
    with pytest.raises(JobFailed) as info:
        supervisor.run(code, lambda line: None)
    assert time.monotonic() - started < 20
    assert info.value.category == "internal" and "broke its channel" in info.value.traceback_text
    assert json.loads(supervisor.run(b"result = 1", lambda line: None)) == 1
    supervisor.close()


def test_a_job_whose_worker_was_already_gone_runs_on_a_fresh_one():
    supervisor = WorkerSupervisor(WorkerSpec("probe", {}, entry="worker_probe"), DEFAULT_POLICY).start()
    worker = supervisor.worker
    assert worker is not None
    os.kill(worker.host_pid, signal.SIGKILL)
    worker.proc.wait(10)
    assert json.loads(supervisor.run(b"result = 'ran'", lambda line: None)) == "ran"
    assert supervisor.restarts == 1
    supervisor.close()


# -- a real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_gpt2_path):
    """The same model served twice: by worker processes (the default) and by a thread."""
    process = ServerProcess(tmp_path_factory.mktemp("process"), models=[str(tiny_gpt2_path)], fake=False)
    thread = ServerProcess(tmp_path_factory.mktemp("thread"), models=[str(tiny_gpt2_path)], fake=False,
                           args=["--isolation", "thread"])
    with process, thread:
        process.key = process.create_key("alice")
        thread.key = thread.create_key("alice")
        yield process, thread


def _use(monkeypatch, server):
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", server.url)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", server.key)
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)


def _worker_pids(server: ServerProcess) -> list[int]:
    """The Python worker processes under a server (not their bubblewrap parents)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rfind(b")") + 2:].split()[1]), []).append(int(name))
    found, stack = [], [server.proc.pid]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            stack.append(child)
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"interlace.models.worker" in argv and b"bwrap" not in Path(argv[0].decode()).name.encode():
                found.append(child)
    return found


def test_server_reports_its_layers(servers):
    process, thread = servers
    deadline = time.monotonic() + 20  # printed just after the server starts answering
    while "--isolation thread): PARTIAL" not in thread.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "--isolation thread): PARTIAL" in thread.log()
    assert "Sandbox layer 3 (the process, --isolation process)" in process.log()


def test_results_identical_to_the_thread_runner(servers, model, monkeypatch):
    outputs = []
    for server in servers:
        _use(monkeypatch, server)
        with model.trace(PROMPT, remote=True):
            hidden = model.transformer.h[1].output.save()
            logits = model.lm_head.output.save()
        with model.generate(PROMPT, max_new_tokens=5, do_sample=False, remote=True):
            tokens = model.generator.output.save()
        outputs.append((hidden, logits, tokens))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


LONG_BODY_ITERATIONS = 200_000_000


def _long_job(model):
    with model.trace(PROMPT, remote=True, blocking=False) as tracer:
        total = 0
        for i in range(LONG_BODY_ITERATIONS):
            total += i
        out = model.lm_head.output.save()
    return tracer.job


def _wait_running(job, timeout=60):
    deadline = time.monotonic() + timeout
    while job.status()["status"] != "RUNNING":
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.05)


def _wait_done(job, timeout=60):
    deadline = time.monotonic() + timeout
    while (status := job.status())["status"] not in ("COMPLETED", "ERROR"):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


@needs_sandbox
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["kill-9", "segfault"])
def test_worker_killed_mid_job(servers, model, monkeypatch, sig):
    server = servers[0]
    _use(monkeypatch, server)
    job = _long_job(model)
    _wait_running(job)
    time.sleep(0.3)  # in the body, not in the hand-over
    pids = _worker_pids(server)
    assert len(pids) == 1, pids
    os.kill(pids[0], sig)
    status = _wait_done(job)
    assert status["status"] == "ERROR"
    assert signal.Signals(sig).name in status["description"]
    assert "replaced" in status["description"]
    # The next job runs, on a fresh worker, with the right values.
    with model.trace(PROMPT, remote=True):
        logits = model.lm_head.output.save()
    with model.trace(PROMPT):
        expected = model.lm_head.output.save()
    assert torch.equal(logits, expected)
    assert _worker_pids(server) != pids
