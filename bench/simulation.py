"""Overhead of remote='local' over a plain local trace (tiny GPT-2, small body), and what
recording each run in the local job history adds (`CONFIG.APP.HISTORY` on vs off; the history
goes to a temp dir here, not the user's).

Run by hand: `.venv/bin/python bench/simulation.py [--runs 300] [--threads 1]`.
Variants run round-robin in one process so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import interlace
from interlace.models.demo import build_tiny_gpt2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["INTERLACE_DATA_DIR"] = tempfile.mkdtemp(prefix="interlace-bench-history-")
    path = build_tiny_gpt2(Path(tempfile.gettempdir()) / "interlace-bench" / "tiny-gpt2")
    model = interlace.LanguageModel(str(path), dispatch=True)
    ids = torch.randint(0, 512, (1, 32))
    scale = 2.0

    def local() -> None:
        with torch.no_grad(), model.trace(ids):
            h = (model.transformer.h[1].output * scale).save()

    def simulated() -> None:
        with torch.no_grad(), model.trace(ids, remote="local"):
            h = (model.transformer.h[1].output * scale).save()

    def unrecorded() -> None:
        interlace.CONFIG.APP.HISTORY = False
        try:
            simulated()
        finally:
            interlace.CONFIG.APP.HISTORY = True

    variants = {"local trace": local, "remote='local'": simulated, "no history": unrecorded}
    for fn in variants.values():
        for _ in range(20):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.runs):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, ms in med.items():
        print(f"{name:16} median {ms:8.3f} ms")
    simulated_ms = med["remote='local'"]
    print(f"simulation overhead: {simulated_ms - med['local trace']:.3f} ms (target < 3 ms)")
    print(f"job history: {simulated_ms - med['no history']:.3f} ms per run "
          f"({simulated_ms / med['no history']:.3f}x the unrecorded simulation)")


if __name__ == "__main__":
    main()
