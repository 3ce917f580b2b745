"""The scale-out soak (issue 20), run by hand: many small jobs over 2 API replicas on one
PostgreSQL and 2 worker replicas on one Ray cluster; nothing lost, nothing run twice.

    python bench/soak.py                   # 2,000 jobs from 32 clients (the issue's run)
    python bench/soak.py --jobs 200 --clients 8

What it starts, all on this machine: a PostgreSQL server (Debian's binaries, as the tests do:
tests/postgres.py), a Ray head (`ray start --head`, 2 CPUs), and two `interlace serve` processes
on the same `--store postgresql://...` and `--ray <head>` with `--replicas 2` (both API replicas
share the two named replica actors of the model). Each client has its own key and sends its
jobs alternately to the two API replicas, all without waiting, then waits for each result. A
job is a small trace on the tiny demo GPT-2 that saves the last position's logits; every
result is checked against a plain transformers forward of its prompt.

Then, from the database: jobs by status (lost = not COMPLETED), jobs that went RUNNING more than
once or whose `attempts` > 1 (run twice), and from the jobs' own timestamps the latency
(`finished - created`) p50 and p99. Asserts nothing; prints the figures for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from postgres import PostgresServer  # noqa: E402 - tests/postgres.py: the same server the tests start
from cobatch import payloads, percentile  # noqa: E402 - bench/cobatch.py: the client's encoding of each trace

from interlace.backends.client import RemoteClient  # noqa: E402
from interlace.contract.result import decode_result  # noqa: E402
from interlace.models.demo import build_tiny_gpt2  # noqa: E402
from interlace.server.auth import KeyStore  # noqa: E402
from interlace.server.db import open_database  # noqa: E402
from interlace.testing import ServerProcess, free_port  # noqa: E402

SERVER_ARGS = ["--threads", "1", "--requests-per-minute", "1000000", "--max-queued-per-key", "100000"]


def ray_head(cpus: int) -> tuple[str, Any]:
    """Start a Ray head with `cpus` CPUs; returns its address and a function that stops it.
    (The API replicas join it with the head's token, `~/.ray/auth_token`: RAY_AUTH_MODE=token.)"""
    os.environ["RAY_AUTH_MODE"] = "token"
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = free_port()
    subprocess.run([ray, "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=300)
    return f"127.0.0.1:{port}", lambda: subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2, help="worker replicas of the model (Ray actors)")
    parser.add_argument("--ray-cpus", type=int, default=2)
    args = parser.parse_args()
    bin_dir = PostgresServer.find()
    if bin_dir is None:
        print("no PostgreSQL binaries: install Debian's postgresql (bash scripts/setup.sh)")
        return 1
    root = Path(tempfile.mkdtemp(prefix="interlace-soak-"))
    path = build_tiny_gpt2(Path(tempfile.gettempdir()) / "interlace-bench" / "tiny-gpt2")
    rng = random.Random(20)
    inputs = [[rng.randrange(1, 500) for _ in range(8)] for _ in range(args.jobs)]
    jobs = payloads(path, inputs)
    pg = PostgresServer(bin_dir).start()
    stop_ray = None
    servers: list[ServerProcess] = []
    try:
        store = pg.create_database()
        address, stop_ray = ray_head(args.ray_cpus)
        for name in ("api-a", "api-b"):
            port = free_port()
            servers.append(ServerProcess(root / name, models=[str(path)], fake=False, port=port, args=[
                *SERVER_ARGS, "--store", store, "--advertise-url", f"http://127.0.0.1:{port}",
                "--ray", address, "--replicas", str(args.replicas)]))
        for server in servers:
            server.start(timeout=900)
        db = open_database(store, root)
        keys = [KeyStore(db).create(f"client-{c}")[0] for c in range(args.clients)]
        results: dict[int, tuple[str, Any]] = {}
        failures: list[str] = []
        lock = threading.Lock()
        go = threading.Barrier(args.clients)

        def client(c: int) -> None:
            mine = [i for i in range(len(jobs)) if i % args.clients == c]
            remotes = [RemoteClient(server.url, keys[c]) for server in servers]
            try:
                go.wait()
                submitted = [(i, remotes[n % 2].submit(jobs[i])) for n, i in enumerate(mine)]
                for i, job in submitted:
                    try:
                        data = job.wait(display=False, timeout=1800)
                        with lock:
                            results[i] = (job.id, data)
                    except Exception as exc:  # noqa: BLE001 - counted
                        with lock:
                            failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            finally:
                for remote in remotes:
                    remote.close()

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        rows = db.query("SELECT id, status, attempts, created, finished FROM jobs")
        running = {r["job_id"]: r["n"] for r in db.query(
            "SELECT job_id, COUNT(*) AS n FROM events WHERE status = 'RUNNING' GROUP BY job_id")}
        by_status: dict[str, int] = {}
        for r in rows:
            by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        twice = [r["id"] for r in rows if r["attempts"] > 1 or running.get(r["id"], 0) > 1]
        latency = [(r["finished"] - r["created"]) * 1000 for r in rows if r["finished"]]
        wrong = check_results(path, inputs, results)
        print(f"{args.jobs} jobs from {args.clients} clients over 2 API replicas, {args.replicas} worker replicas, "
              f"{os.cpu_count()} CPUs; wall {wall:.1f} s, {len(rows) / wall:.1f} jobs/s")
        print(f"jobs in the store: {len(rows)}; by status: {by_status}")
        print(f"lost (not COMPLETED or missing): {args.jobs - by_status.get('COMPLETED', 0)}; run twice: {len(twice)}; "
              f"results that differ from a plain forward: {wrong}; client failures: {len(failures)}")
        for text in failures[:5]:
            print(f"  failure: {text}")
        if latency:
            print(f"latency (finished - created): p50 {percentile(latency, 50):.0f} ms, p99 {percentile(latency, 99):.0f} ms,"
                  f" mean {statistics.mean(latency):.0f} ms")
        db.close()
    finally:
        for server in servers:
            server.stop()
        if stop_ray is not None:
            stop_ray()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def check_results(path: Path, inputs: list[list[int]], results: dict[int, tuple[str, Any]]) -> int:
    """How many results differ from a plain transformers forward of their prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    wrong = 0
    with torch.no_grad():
        for i, (_, data) in results.items():
            values = decode_result(data)
            truth = model(torch.tensor([inputs[i]])).logits[:, -1]
            if not torch.allclose(values["last"], truth, atol=1e-4, rtol=1e-4):
                wrong += 1
    return wrong


if __name__ == "__main__":
    sys.exit(main())
