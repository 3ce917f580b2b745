"""What layer 4 of the sandbox (model integrity) costs per job, on a GPT-2-small-shaped model.

    python bench/integrity.py [--jobs 200]

Builds GPT-2 small's shapes (`GPT2Config()`, random weights) on the CPU, then times
`ModelGuard.begin()` + `verify_and_restore()` for a job that changed nothing (the common case:
the whole check runs, nothing is put back). The server runs it after every job, so it is part
of every round trip. Prints the median and p99 per job; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    from interlace.execution.integrity import ModelGuard

    module = GPT2LMHeadModel(GPT2Config()).eval()
    guard = ModelGuard(module, pristine=False, follow_caller=False)
    guard.verify_and_restore(guard.begin())  # warm up
    times = []
    for _ in range(args.jobs):
        start = time.perf_counter()
        guard.verify_and_restore(guard.begin())
        times.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(times)
    print(f"integrity check per job, GPT-2 small shapes on CPU ({args.jobs} jobs): "
          f"median {statistics.median(times):.3f} ms, p99 {ordered[int(0.99 * (len(ordered) - 1))]:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
