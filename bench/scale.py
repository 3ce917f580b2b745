"""Scale-out on Ray (issue 20): small-trace throughput with 1 and 2 replicas, and what Ray adds
to a round trip.

    python bench/scale.py             # GPT-2-small shape, 32 jobs from 8 clients, 2 rounds
    python bench/scale.py --quick     # the tiny demo GPT-2, 16 jobs: checks the script

Three `interlace serve` processes side by side on loopback, each `--threads 1 --no-cobatch`
(co-batching is measured by bench/cobatch.py; here one job is one forward, so replicas are
what scales): the embedded server (one worker process per model), `--ray auto --replicas 1`
and `--ray auto --replicas 2` (each its own local Ray instance with the machine's CPUs).

Printed (medians over rounds):
- throughput: all jobs at once from the clients (bench/cobatch.py's round), jobs/s, for each
  server; the 2-replica / 1-replica ratio is the replica scaling on this machine;
- a lone job's latency (sequential jobs, nothing else queued) on the embedded server and on
  Ray with one replica: the difference is what Ray's routing adds to a round trip.
Asserts nothing; the figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

# bench/cobatch.py's round, lone-job timing, model and payload builders (one home for them).
from cobatch import SERVER_ARGS, build_model, lone, one_round, payloads, prompts
from interlace.testing import ServerProcess

SERVERS = {
    "embedded": [],
    "ray-1": ["--ray", "auto", "--replicas", "1"],
    "ray-2": ["--ray", "auto", "--replicas", "2"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny GPT-2 and 16 jobs (checks the script)")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lone-runs", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.clients, args.rounds, args.lone_runs = 16, 4, 1, 3
    torch.set_num_threads(1)
    root = Path(tempfile.gettempdir()) / "interlace-bench"
    path = build_model(root, args.quick)
    jobs = payloads(path, prompts(args.jobs, 8, 50000))  # (both shapes have GPT-2's vocabulary)
    print(f"model {path.name}; {args.jobs} jobs of 8 tokens from {args.clients} clients; {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}")
    results: dict[str, list[float]] = {name: [] for name in SERVERS}
    alone: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="interlace-bench-scale-") as tmp:
        for name, extra in SERVERS.items():
            # One server at a time: two local Ray instances or two models' replicas would
            # share the 2 CPUs with the one being measured.
            server = ServerProcess(Path(tmp) / name, models=[str(path)], fake=False,
                                   args=[*SERVER_ARGS, "--no-cobatch", *extra])
            try:
                server.start(timeout=900)
                keys = [server.create_key(f"client-{c}") for c in range(args.clients)]
                lone(server, keys[0], jobs[0], 2)  # warm up: the replicas, the model, the connections
                one_round(server, keys, jobs, args.clients)
                alone[name] = lone(server, keys[0], jobs[0], args.lone_runs)
                for _ in range(args.rounds):
                    run = one_round(server, keys, jobs, args.clients)
                    results[name].append(run["throughput"])
                    for text in (run["failures"] + run["errors"])[:3]:
                        print(f"  {name}: failure: {text}")
            finally:
                server.stop()
            print(f"{name:9s} throughput {statistics.median(results[name]):6.1f} jobs/s "
                  f"(rounds: {', '.join(f'{t:.1f}' for t in results[name])}); lone job {alone[name][0]:.1f} ms "
                  f"(client {alone[name][1]:.1f} ms)")
    one, two = statistics.median(results["ray-1"]), statistics.median(results["ray-2"])
    print(f"\nreplicas: 2 / 1 = {two / one:.2f}x throughput ({two:.1f} / {one:.1f} jobs/s)")
    added = alone["ray-1"][1] - alone["embedded"][1]
    print(f"Ray's routing, a lone job's round trip: {alone['ray-1'][1]:.1f} ms against {alone['embedded'][1]:.1f} ms "
          f"embedded: {added:+.1f} ms (server side {alone['ray-1'][0] - alone['embedded'][0]:+.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
