"""What a local block adds to a remote trace: the round trip to the client and back, per block.

    python bench/local_block.py [--runs 50] [--only server|local]

Starts `interlace serve` on loopback with the tiny GPT-2 (real runner, worker process) and
times three traces of the same model, round-robin so that machine noise falls on all alike:

- `none`: reads a block's output and saves a value computed from it;
- `one`:  the same, with the value computed in one `with interlace.local():` block (one scalar
  tensor down, one up: the smallest real exchange);
- `ten`:  ten such blocks in a row.

The cost of a block is p50(`one`) - p50(`none`), and (p50(`ten`) - p50(`none`)) / 10 (the
per-block cost without the first one's share of any fixed cost). The issue's target: under
5 ms p50 per block on loopback. The same three traces under `remote='local'` (the in-process
exchange: same codec, no HTTP) are reported beside them. Wall clock (`perf_counter`): the
server is another process. Prints numbers for bench/RESULTS.md; asserts only that the traces
computed the right value.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import interlace
from interlace.models.demo import build_tiny_gpt2
from interlace.testing import ServerProcess

PROMPT = "The Eiffel Tower is in the city of"
TARGET_MS = 5.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def trace_none(model: Any, remote: Any) -> Any:
    with model.trace(PROMPT, remote=remote):
        hidden = model.transformer.h[0].output
        value = hidden[0, 0, 0] + 1
        out = value.save()
    return out


def trace_one(model: Any, remote: Any) -> Any:
    with model.trace(PROMPT, remote=remote):
        hidden = model.transformer.h[0].output
        value = hidden[0, 0, 0]
        with interlace.local():
            value = value + 1
        out = value.save()
    return out


def trace_ten(model: Any, remote: Any) -> Any:
    with model.trace(PROMPT, remote=remote):
        hidden = model.transformer.h[0].output
        value = hidden[0, 0, 0]
        for _ in range(10):
            with interlace.local():
                value = value + 1
        out = value.save()
    return out


VARIANTS: dict[str, tuple[Callable[[Any, Any], Any], int]] = {
    "none": (trace_none, 1),  # (trace, what it adds to hidden[0, 0, 0])
    "one": (trace_one, 1),
    "ten": (trace_ten, 10),
}


def measure(model: Any, remote: Any, runs: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per trace of each variant, interleaved (the order rotates every round)."""
    base = float(trace_none(model, False).detach()) - 1
    for name, (trace, added) in VARIANTS.items():
        for _ in range(max(1, warmup)):
            got = float(trace(model, remote).detach())
        if abs(got - (base + added)) > 1e-4:
            raise AssertionError(f"{name} under remote={remote!r} computed {got}, expected {base + added}")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            trace = VARIANTS[name][0]
            start = time.perf_counter()
            trace(model, remote)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def report(label: str, times: dict[str, list[float]]) -> None:
    p50 = {name: percentile(ms, 50) for name, ms in times.items()}
    print(f"\n{label} ({len(times['none'])} runs each, interleaved)")
    for name, ms in times.items():
        print(f"  {name:5s} p50 {p50[name]:8.2f} ms  p90 {percentile(ms, 90):8.2f} ms  "
              f"mean {statistics.mean(ms):8.2f} ms  ({p50[name] / p50['none']:.3f}x none)")
    one = p50["one"] - p50["none"]
    per = (p50["ten"] - p50["none"]) / 10
    print(f"  added per block: one block {one:.2f} ms, ten blocks {per:.2f} ms each "
          f"(target < {TARGET_MS:.0f} ms p50: {'met' if max(one, per) < TARGET_MS else 'NOT met'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed traces per variant and mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", choices=("server", "local"), help="time one mode only")
    parser.add_argument("--threads", type=int, default=1, help="this process's torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    interlace.CONFIG.APP.REMOTE_LOGGING = False

    with tempfile.TemporaryDirectory(prefix="interlace-bench-") as tmp:
        path = build_tiny_gpt2(Path(tmp) / "tiny-gpt2")
        model = interlace.LanguageModel(str(path))
        print(f"tiny GPT-2 ({path.name}), prompt of {len(model.tokenizer(PROMPT)['input_ids'])} tokens; "
              f"{os.cpu_count()} CPUs; torch {torch.__version__}")
        if args.only != "server":
            report("remote='local' (in-process exchange)", measure(model, "local", args.runs, args.warmup))
        if args.only == "local":
            return 0
        # (Per-key limits off the bench's path: it sends far more than a user's minute.)
        server = ServerProcess(Path(tmp) / "server", models=[str(path)], fake=False,
                               args=["--requests-per-minute", "1000000", "--max-queued-per-key", "100000"])
        server.start(timeout=180)
        try:
            interlace.CONFIG.API.HOST, interlace.CONFIG.API.APIKEY = server.url, server.create_key("bench")
            report(f"remote=True, `interlace serve` on loopback ({server.url})",
                   measure(model, True, args.runs, args.warmup))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
