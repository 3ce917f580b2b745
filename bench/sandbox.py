"""What the sandbox's worker process costs: one small trace's round trip, thread vs process.

    python bench/sandbox.py [--jobs 200] [--rounds 4]

Starts two `interlace serve` processes on loopback side by side, both hosting the built-in
demo model (tiny GPT-2) with the same policy and runtime guards: one with `--isolation
thread` (jobs in a thread of the API process, what the server did before the sandbox) and
one with `--isolation process` (the default: jobs in a confined worker process). It sends
the same real payload (a trace saving one tensor) to both, alternating rounds of sequential
jobs so that machine noise falls on both alike, and reports the p50 round trip of each and
the difference. The issue's target: the worker process adds at most 10% or 1 ms (whichever
is larger) to the p50. Prints numbers for bench/RESULTS.md; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from remote import one_job, percentile, real_payload  # noqa: E402

from interlace.backends.client import RemoteClient  # noqa: E402
from interlace.testing import ServerProcess  # noqa: E402

MODES = ("thread", "process")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per mode per round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="interlace-bench-") as tmp:
        # (Per-key limits off the path: the bench sends far more than a user's minute.)
        args_for = {mode: ["--isolation", mode, "--requests-per-minute", "1000000", "--max-queued-per-key", "100000"]
                    for mode in MODES}
        servers = {mode: ServerProcess(Path(tmp) / mode, fake=False, args=args_for[mode]) for mode in MODES}
        try:
            for server in servers.values():
                server.start(timeout=180)
            keys = {mode: server.create_key("bench") for mode, server in servers.items()}
            # One payload for both: captured from a real remote trace against the thread server.
            payload, _ = real_payload(servers["thread"].url, keys["thread"])
            print(f"payload {len(payload)} bytes; {os.cpu_count()} CPUs; {args.rounds} rounds x "
                  f"{args.jobs} jobs per mode, alternating")
            clients = {mode: RemoteClient(server.url, keys[mode]) for mode, server in servers.items()}
            latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
            try:
                for client in clients.values():
                    for _ in range(10):  # warm up: connections, the model, the worker
                        one_job(client, payload)
                for round_index in range(args.rounds):
                    order = MODES if round_index % 2 == 0 else MODES[::-1]
                    for mode in order:
                        latencies[mode] += [one_job(clients[mode], payload) * 1000 for _ in range(args.jobs)]
            finally:
                for client in clients.values():
                    client.close()
            p50 = {mode: percentile(latencies[mode], 50) for mode in MODES}
            for mode in MODES:
                ms = latencies[mode]
                print(f"{mode:8s} p50 {p50[mode]:.2f} ms  p99 {percentile(ms, 99):.2f} ms  "
                      f"mean {statistics.mean(ms):.2f} ms  ({len(ms)} jobs)")
            added = p50["process"] - p50["thread"]
            allowed = max(0.10 * p50["thread"], 1.0)
            print(f"worker process adds {added:+.2f} ms to the p50 ({p50['process'] / p50['thread']:.3f}x); "
                  f"allowed {allowed:.2f} ms -> {'met' if added <= allowed else 'NOT met'}")
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
