"""Co-batching (issue 19): many small traces on one hosted model, with and without sharing forwards.

    python bench/cobatch.py              # the issue's figure: GPT-2-small shape, 64 jobs, 8 clients
    python bench/cobatch.py --quick      # a small model, 16 jobs: checks the script (not the figure)
    python bench/cobatch.py --profile    # also: where a batch's time goes (cProfile, in-process)

The issue's setting: 64 concurrent small traces (8-token prompts, 8 clients) on a
GPT-2-small-shaped model (12 layers x 768, vocabulary 50257, random weights, the tiny demo
tokenizer; built offline once under the temp dir), against the same server with co-batching
off. Two `interlace serve` processes run side by side on loopback, both `--threads 1` (one
torch thread in the model's worker process), default process isolation; one co-batches, one
has `--no-cobatch`. Each round sends the same 64 payloads to each server in turn (the order
alternates between rounds): 8 client threads, each with its own API key, each submitting its
8 jobs without waiting, then waiting for their results. A job's body saves the last
position's logits.

Printed, per server (median over rounds):
- throughput: jobs / (last result - first submit), client side;
- latency per job, p50 and p99: the server's `finished - created` (receipt to result stored;
  the client's own round trip is printed beside it);
- a lone job's latency on each server (sequential jobs, nothing else queued);
- the batch sizes reached: each job's `batch_rows` from its status (null: it ran alone);
- the worker's busy time: the union of [started, finished] of the run's jobs;
and the ceiling: in this process, one torch thread, one plain batched forward of the 64
prompts against 64 single forwards of the same model (transformers, no Interlace).

Goal (issue 19): co-batching's throughput >= 5x the one-at-a-time server's and >= 80% of the
ceiling measured in the same run; p50 latency no worse than 2x a lone job's. Prints numbers
for bench/RESULTS.md; asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from interlace.backends.client import RemoteClient
from interlace.testing import ServerProcess

SERVER_ARGS = ["--threads", "1", "--requests-per-minute", "1000000", "--max-queued-per-key", "100000"]
MODES = ("cobatch", "solo")  # solo: `--no-cobatch`, the one-at-a-time server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def build_model(root: Path, quick: bool) -> Path:
    """GPT-2 small's shape with random weights (or a small one with --quick), saved once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from interlace.models.demo import build_tiny_gpt2

    name = "gpt2-2x256-random" if quick else "gpt2-small-random"
    path = root / name
    if (path / "model.safetensors").exists():
        return path
    tiny = build_tiny_gpt2(root / "tiny-gpt2")
    config = GPT2Config(n_layer=2, n_embd=256, n_head=4) if quick else GPT2Config()  # 12 x 768, vocab 50257
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    tmp = root / f".{name}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / file).write_bytes((tiny / file).read_bytes())
    tmp.rename(path)
    return path


def prompts(count: int, tokens: int, vocab: int) -> list[list[int]]:
    rng = random.Random(19)
    return [[rng.randrange(vocab) for _ in range(tokens)] for _ in range(count)]


def payloads(path: Path, inputs: list[list[int]]) -> list[bytes]:
    """The client's own encoding of each trace (what `remote=True` sends), made once."""
    import interlace
    from interlace.backends.outbound import encode_for_remote
    from interlace.contract.policy import DEFAULT_POLICY

    model = interlace.LanguageModel(str(path))  # the client's copy: no weights needed
    out: list[bytes] = []

    def capture(trace: Any) -> dict[str, Any]:
        out.append(encode_for_remote(trace, str(path), DEFAULT_POLICY, strict_remote=False)[0])
        return {}

    for ids in inputs:
        with model.trace(ids, backend=capture):
            last = model.lm_head.output[:, -1].save()  # noqa: F841
    return out


def plain_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def plain_forward_ms(model: Any, inputs: list[list[int]], reps: int = 3) -> float:
    """A plain batched forward of `inputs` (one torch thread), median ms."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = torch.tensor(inputs)
        times = []
        with torch.no_grad():
            for _ in range(reps):
                start = time.perf_counter()
                model(batch)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000
    finally:
        torch.set_num_threads(previous)


def ceiling(model: Any, inputs: list[list[int]], reps: int) -> tuple[float, float]:
    """Seconds of one batched forward of all `inputs` and of len(inputs) single forwards
    (medians over `reps`), one torch thread, transformers alone."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = torch.tensor(inputs)
        singles = [torch.tensor([ids]) for ids in inputs]
        batched, single = [], []
        with torch.no_grad():
            model(batch)  # warm up
            for ids in singles[:4]:
                model(ids)
            for _ in range(reps):
                start = time.perf_counter()
                model(batch)
                batched.append(time.perf_counter() - start)
                start = time.perf_counter()
                for ids in singles:
                    model(ids)
                single.append(time.perf_counter() - start)
        return statistics.median(batched), statistics.median(single)
    finally:
        torch.set_num_threads(previous)


def one_round(server: ServerProcess, keys: list[str], jobs: list[bytes], clients: int) -> dict[str, Any]:
    """All `jobs` at once from `clients` threads (job i from client i % clients)."""
    ends: dict[int, tuple[str, float, float]] = {}  # index -> (job id, submitted, result in)
    failures: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(clients)

    def client(c: int) -> None:
        mine = [i for i in range(len(jobs)) if i % clients == c]
        with RemoteClient(server.url, keys[c]) as remote:
            remote.info()  # connect before the clock starts
            go.wait()
            submitted = []
            for i in mine:
                submitted.append((i, time.perf_counter(), remote.submit(jobs[i])))
            for i, at, job in submitted:
                try:
                    job.wait(display=False, timeout=600)
                except Exception as exc:  # noqa: BLE001 - counted, not raised
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                with lock:
                    ends[i] = (job.id, at, time.perf_counter())

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = min(at for _, at, _ in ends.values())
    last = max(end for _, _, end in ends.values())
    statuses = []
    for c in range(clients):  # each job's status, asked by its owner's key
        with RemoteClient(server.url, keys[c]) as remote:
            statuses += [remote.job(ends[i][0]).status() for i in sorted(ends) if i % clients == c]
    spans = sorted((s["started"], s["finished"]) for s in statuses if s["started"] and s["finished"])
    busy, cursor = 0.0, None
    for start, end in spans:
        if cursor is None or start > cursor:
            busy += end - start
            cursor = end
        elif end > cursor:
            busy += end - cursor
            cursor = end
    # The worker's batches, from the jobs' own time stamps (server clock): a job of a batch
    # starts when its batch does. (rows or "alone", start after the first job was received,
    # duration, jobs); ms.
    origin = min(s["created"] for s in statuses)
    groups: list[list[dict[str, Any]]] = []
    for s in sorted((s for s in statuses if s["started"] and s["finished"]), key=lambda s: s["started"]):
        group = groups[-1] if groups else None
        # A batch's jobs are marked started one after the other, all before any finishes.
        if group and s.get("batch_rows") is not None and s.get("batch_rows") == group[0].get("batch_rows") \
                and s["started"] < min(j["finished"] for j in group):
            group.append(s)
        else:
            groups.append([s])
    timeline = [((g[0]["started"] - origin) * 1000, (max(j["finished"] for j in g) - g[0]["started"]) * 1000,
                 g[0].get("batch_rows") or "alone", len(g)) for g in groups]
    return {
        "timeline": timeline,
        "wall": last - first,
        "throughput": len(jobs) / (last - first),
        "server_ms": [(s["finished"] - s["created"]) * 1000 for s in statuses if s["finished"]],
        "client_ms": [(end - at) * 1000 for _, at, end in ends.values()],
        "rows": Counter(s.get("batch_rows") for s in statuses),
        "busy": busy,
        "failures": failures,
        "errors": [s["description"][:200] for s in statuses if s["status"] != "COMPLETED"],
    }


def lone(server: ServerProcess, key: str, payload: bytes, runs: int) -> tuple[float, float]:
    """A lone job's latency (p50 of `runs` sequential jobs): the server's and the client's, ms."""
    server_ms, client_ms = [], []
    with RemoteClient(server.url, key) as remote:
        for _ in range(runs):
            start = time.perf_counter()
            job = remote.submit(payload)
            job.wait(display=False, timeout=600)
            client_ms.append((time.perf_counter() - start) * 1000)
            status = job.status()
            server_ms.append((status["finished"] - status["created"]) * 1000)
    return statistics.median(server_ms), statistics.median(client_ms)


def profile_batch(path: Path, jobs: list[bytes], limits_rows: int) -> str:
    """`cobatch.run_batch` of all `jobs` in this process (as the thread runner runs it), under
    cProfile: the functions that take a batch's time."""
    import interlace
    from interlace.contract.policy import DEFAULT_POLICY
    from interlace.execution import cobatch
    from interlace.execution.integrity import guard_for
    from interlace.execution.receive import prepare_payload

    torch.set_num_threads(1)
    model = interlace.LanguageModel(str(path), dispatch=True)
    guard_for(model, server=True)
    prepared = [prepare_payload(p, DEFAULT_POLICY, {str(path): model}) for p in jobs]
    limits = cobatch.BatchLimits(max_rows=limits_rows)
    cobatch.run_batch(prepared, model, DEFAULT_POLICY, limits)  # warm up
    start = time.perf_counter()
    outcomes = cobatch.run_batch(prepared, model, DEFAULT_POLICY, limits)
    plain = time.perf_counter() - start
    profiler = cProfile.Profile()
    profiler.enable()
    cobatch.run_batch(prepared, model, DEFAULT_POLICY, limits)
    profiler.disable()
    text = io.StringIO()
    # (Cumulative times of the greenlet-switching engine frames are not meaningful under
    # cProfile; the functions' own times are.)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    rows = Counter(o.rows for o in outcomes)
    return f"run_batch of {len(jobs)} jobs in-process: {plain * 1000:.1f} ms, rows {dict(rows)}\n" + text.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2 x 256 model, 16 jobs, 4 clients, 1 round")
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lone-runs", type=int, default=10)
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="the co-batching server's (default: serve's)")
    parser.add_argument("--profile", action="store_true", help="also profile one in-process run_batch of the jobs")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.clients, args.rounds, args.lone_runs = 16, 4, 1, 3

    root = Path(tempfile.gettempdir()) / "interlace-bench"
    path = build_model(root, args.quick)
    inputs = prompts(args.jobs, args.tokens, 50257)
    jobs = payloads(path, inputs)
    plain = plain_model(path)
    batched_s, singles_s = ceiling(plain, inputs, reps=1 if args.quick else 3)
    print(f"model {path.name}; {args.jobs} jobs of {args.tokens} tokens from {args.clients} clients; "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"ceiling (in-process, 1 thread): {args.jobs} single forwards {singles_s * 1000:.1f} ms, one batched "
          f"forward {batched_s * 1000:.1f} ms -> {singles_s / batched_s:.2f}x")

    cobatch_args = [*SERVER_ARGS] + ([] if args.batch_wait_ms is None else ["--batch-wait-ms", str(args.batch_wait_ms)])
    args_for = {"cobatch": cobatch_args, "solo": [*SERVER_ARGS, "--no-cobatch"]}
    with tempfile.TemporaryDirectory(prefix="interlace-bench-") as tmp:
        servers = {mode: ServerProcess(Path(tmp) / mode, models=[str(path)], fake=False, args=args_for[mode])
                   for mode in MODES}
        try:
            for server in servers.values():
                server.start(timeout=600)
            keys = {mode: [server.create_key(f"client-{c}") for c in range(args.clients)]
                    for mode, server in servers.items()}
            for mode in MODES:  # warm up: the worker, the model, the connections
                lone(servers[mode], keys[mode][0], jobs[0], 3)
                one_round(servers[mode], keys[mode], jobs, args.clients)
            alone = {mode: lone(servers[mode], keys[mode][0], jobs[0], args.lone_runs) for mode in MODES}
            results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for round_index in range(args.rounds):
                for mode in (MODES if round_index % 2 == 0 else MODES[::-1]):
                    results[mode].append(one_round(servers[mode], keys[mode], jobs, args.clients))
        finally:
            for server in servers.values():
                server.stop()

    summary = {}
    for mode in MODES:
        runs = results[mode]
        summary[mode] = {
            "throughput": statistics.median(r["throughput"] for r in runs),
            "p50": statistics.median(percentile(r["server_ms"], 50) for r in runs),
            "p99": statistics.median(percentile(r["server_ms"], 99) for r in runs),
            "client_p50": statistics.median(percentile(r["client_ms"], 50) for r in runs),
            "busy": statistics.median(r["busy"] / r["wall"] for r in runs),
            "wall": statistics.median(r["wall"] for r in runs),
        }
        rows: Counter = Counter()
        for r in runs:
            rows.update(r["rows"])
        s = summary[mode]
        print(f"\n{mode:8s} throughput {s['throughput']:7.1f} jobs/s (wall {s['wall'] * 1000:.0f} ms); latency p50 "
              f"{s['p50']:.1f} ms, p99 {s['p99']:.1f} ms (client p50 {s['client_p50']:.1f} ms); lone job "
              f"{alone[mode][0]:.1f} ms (client {alone[mode][1]:.1f} ms); worker busy {s['busy'] * 100:.0f}% of the wall")
        shown = ", ".join(f"{'alone' if k is None else k}: {v}" for k, v in sorted(rows.items(), key=lambda kv: kv[0] or 0))
        print(f"         jobs by batch_rows over {len(runs)} rounds: {shown}")
        print("         per round: " + "; ".join(f"{r['throughput']:.1f} jobs/s" for r in runs))
        if mode == "cobatch":
            # Where the median round's time went: each batch's time on the worker against a
            # plain forward of as many rows (measured now, in this process).
            middle = sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2]
            print("         batches of the median round (server clock; a plain forward of as many rows):")
            for at, took, rows, n in middle["timeline"]:
                width = 1 if rows == "alone" else int(rows)
                forward = plain_forward_ms(plain, inputs[:width], reps=1 if args.quick else 3)
                what = "alone" if rows == "alone" else f"in {rows} rows"
                print(f"           {n:3d} job{'s' if n > 1 else ' '} {what:12s} at +{at:5.0f} ms for {took:6.0f} ms "
                      f"(plain forward {forward:6.0f} ms)")
        for r in runs:
            for text in (r["failures"] + r["errors"])[:3]:
                print(f"         failure: {text}")

    on, off = summary["cobatch"], summary["solo"]
    gain = on["throughput"] / off["throughput"]
    ceiling_x = singles_s / batched_s
    p50_x = on["p50"] / alone["cobatch"][0]
    print(f"\nthroughput, co-batching / one at a time: {gain:.2f}x (goal >= 5x: {'met' if gain >= 5 else 'NOT met'})")
    print(f"  of the ceiling {ceiling_x:.2f}x: {gain / ceiling_x * 100:.0f}% (goal >= 80%: "
          f"{'met' if gain >= 0.8 * ceiling_x else 'NOT met'})")
    print(f"p50 latency / a lone job's (co-batching server): {p50_x:.2f}x (goal <= 2x: {'met' if p50_x <= 2 else 'NOT met'});"
          f" against the one-at-a-time server's p50 under the same load: {on['p50'] / off['p50']:.2f}x")
    # What co-batching costs a job that finds no company: at most the wait (the lone job on the
    # co-batching server against the same job on the one-at-a-time server).
    lone_x = alone["cobatch"][0] / alone["solo"][0]
    print(f"a lone job, co-batching on / off: {alone['cobatch'][0]:.1f} / {alone['solo'][0]:.1f} ms = {lone_x:.2f}x "
          f"(<= 2x: {'met' if lone_x <= 2 else 'NOT met'})")
    if args.profile:
        print("\n" + profile_batch(path, jobs, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
