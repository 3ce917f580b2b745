"""Durability with worker processes: kill -9 of the whole server under 8 concurrent clients,
each waiting on real jobs (tiny GPT-2, `--isolation process`), loses no job, and leaves no
worker behind. (A worker killed mid-job is in `test_worker_process.py`.)"""

from __future__ import annotations

import os
import threading
import time

import torch

import interlace
from interlace.backends.client import RemoteClient
from interlace.contract.result import decode_result
from interlace.testing import ServerProcess

from test_worker_process import _worker_pids, needs_sandbox

PROMPT = "The Eiffel Tower is in the city of"
CLIENTS = 8
JOBS_PER_CLIENT = 2


def _payload(model, layer: int) -> bytes:
    backend = interlace.backends.LocalSimulationBackend(model)
    with model.trace(PROMPT, backend=backend):
        total = 0
        for i in range(2_000_000):  # long enough that jobs queue up behind each other
            total += i
        out = model.transformer.h[layer].output.save()
    return backend.get_last_payload()


@needs_sandbox
def test_kill_9_of_the_server_under_8_clients_loses_no_job(tmp_path, tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    payloads, expected = {}, {}
    for layer in range(4):
        payloads[layer] = _payload(model, layer)
        with model.trace(PROMPT):
            expected[layer] = model.transformer.h[layer].output.save()
    server = ServerProcess(tmp_path / "data", models=[str(tiny_gpt2_path)], fake=False).start()
    try:
        keys = [server.create_key(f"user{i}") for i in range(CLIENTS)]
        submitted = threading.Barrier(CLIENTS + 1)
        outcomes: dict[str, tuple[int, object]] = {}
        lock = threading.Lock()

        def client(index: int) -> None:
            http = RemoteClient(server.url, keys[index], reconnect_timeout=120)
            jobs = []
            for n in range(JOBS_PER_CLIENT):
                layer = (index + n) % 4
                jobs.append((layer, http.submit(payloads[layer]).id))
            submitted.wait(60)
            for layer, job_id in jobs:  # waiting across the crash: the client re-attaches
                try:
                    value = decode_result(http.job(job_id).wait(display=False, timeout=240))
                except Exception as exc:  # noqa: BLE001 - a job that ended failed is checked below
                    value = exc
                with lock:
                    outcomes[job_id] = (layer, value)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        submitted.wait(60)
        time.sleep(0.5)  # some jobs done, one running, the rest queued
        workers = _worker_pids(server)
        assert workers
        server.kill()
        # The workers die with the server (bubblewrap --die-with-parent, PR_SET_PDEATHSIG).
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "a worker outlived its server"
        server.start()
        for t in threads:
            t.join(300)
        assert len(outcomes) == CLIENTS * JOBS_PER_CLIENT
        for job_id, (layer, value) in outcomes.items():
            if isinstance(value, Exception):  # allowed only as a job that ended with a reason
                assert "interrupted" in str(value) or "stopped" in str(value), value
            else:
                assert torch.equal(value["out"], expected[layer]), job_id
        completed = sum(not isinstance(v, Exception) for _, v in outcomes.values())
        assert completed >= CLIENTS * JOBS_PER_CLIENT - 1
    finally:
        server.stop()
