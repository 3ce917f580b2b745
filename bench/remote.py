"""Remote round trip on loopback: latency of one job, and many concurrent clients.

    python bench/remote.py            # real runner, built-in demo model (tiny GPT-2)
    python bench/remote.py --fake     # test-only fake runner: the server and client alone

Starts `interlace serve` on 127.0.0.1 (random port, temporary data dir), then:
1. sequential: N jobs (default 200) from one client, each submit -> follow status over the
   WebSocket -> download the result; reports p50/p99/mean per job. The payload is a real
   trace of the demo model saving one tensor (captured once from `model.trace(remote=True)`),
   or a fake-runner payload with --fake.
2. concurrent: C clients (default 8) x M jobs (default 50) at once; reports failures and
   throughput.
With the real runner it also times the whole `with model.trace(..., remote=True)` block,
which adds client-side capture, validation and encoding and the result decode.
Prints numbers for notes (bench/RESULTS.md); asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from interlace.backends.client import RemoteClient
from interlace.testing import ServerProcess, fake_payload


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def real_payload(url: str, key: str) -> tuple[bytes, float]:
    """Capture the payload bytes of a real trace, and time whole remote traces."""
    import interlace
    from interlace.models.demo import DEMO_MODEL_KEY

    os.environ["INTERLACE_HOST"], os.environ["INTERLACE_API_KEY"] = url, key
    captured: dict[str, bytes] = {}
    original = RemoteClient.submit

    def spy(self: RemoteClient, payload: bytes, **kwargs):  # type: ignore[no-untyped-def]
        captured["payload"] = payload
        return original(self, payload, **kwargs)

    interlace.config.CONFIG.APP.REMOTE_LOGGING = False
    model = interlace.LanguageModel(DEMO_MODEL_KEY)
    RemoteClient.submit = spy  # type: ignore[method-assign]
    try:
        times = []
        for _ in range(21):
            start = time.perf_counter()
            with model.trace("The Eiffel Tower is in", remote=True):
                hidden = model.transformer.h[0].output[0].save()
            times.append(time.perf_counter() - start)
        assert hidden.ndim >= 2, hidden  # the saved tensor came back
    finally:
        RemoteClient.submit = original  # type: ignore[method-assign]
    return captured["payload"], statistics.median(times[1:])


def one_job(client: RemoteClient, payload: bytes) -> float:
    start = time.perf_counter()
    data = client.submit(payload).wait(display=False, timeout=60)
    elapsed = time.perf_counter() - start
    if not data:
        raise RuntimeError("empty result")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake", action="store_true", help="use the test-only fake runner")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="interlace-bench-") as tmp:
        server = ServerProcess(Path(tmp), fake=args.fake,  # (per-key limits off the bench's path)
                               args=["--requests-per-minute", "1000000", "--max-queued-per-key", "100000"]).start(timeout=120)
        try:
            key = server.create_key("bench")
            trace_p50 = None
            if args.fake:
                payload = fake_payload(echo=[1.0] * 16)
            else:
                payload, trace_p50 = real_payload(server.url, key)
            mode = "fake runner" if args.fake else "real runner, demo model, save one tensor"
            print(f"server {server.url} ({mode}); payload {len(payload)} bytes; {os.cpu_count()} CPUs")

            with RemoteClient(server.url, key) as client:
                for _ in range(10):  # warm up connections, caches, the model
                    one_job(client, payload)
                latencies = [one_job(client, payload) for _ in range(args.jobs)]
                # Attribution: time inside JobRunner.run, from the server's own timestamps.
                records = client.jobs(limit=args.jobs)
            ms = [x * 1000 for x in latencies]
            run_ms = [(r["finished"] - r["started"]) * 1000 for r in records if r["finished"] and r["started"]]
            print(f"sequential {args.jobs} jobs: p50 {percentile(ms, 50):.2f} ms, "
                  f"p99 {percentile(ms, 99):.2f} ms, mean {statistics.mean(ms):.2f} ms "
                  f"(of which JobRunner.run p50 {percentile(run_ms, 50):.2f} ms)")
            if trace_p50 is not None:
                print(f"whole `with model.trace(..., remote=True)` block: p50 {trace_p50 * 1000:.2f} ms")

            failures: list[BaseException] = []
            done = [0]
            lock = threading.Lock()

            def worker() -> None:
                with RemoteClient(server.url, key) as remote:
                    for _ in range(args.per_client):
                        try:
                            one_job(remote, payload)
                            with lock:
                                done[0] += 1
                        except BaseException as exc:  # counted, not raised
                            with lock:
                                failures.append(exc)

            threads = [threading.Thread(target=worker) for _ in range(args.clients)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            total = args.clients * args.per_client
            print(f"concurrent {args.clients} clients x {args.per_client} jobs: {done[0]}/{total} ok, "
                  f"{len(failures)} failed, {wall:.2f} s, {total / wall:.0f} jobs/s")
            for exc in failures[:3]:
                print(f"  failure: {type(exc).__name__}: {exc}")
            return 1 if failures else 0
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
