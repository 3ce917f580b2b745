"""Two versions of Interlace side by side in one process: what a change did to trace overhead.

Run by hand from a checkout: ``.venv/bin/python bench/compare.py OLD_REV [NEW_REV] [--runs 500]``.
``NEW_REV`` defaults to the working tree.

On a shared machine timings drift by 10-30 % between runs, more than most changes being
measured, so comparing two separate runs of ``overhead.py`` says little. Here each version
is copied from git into a temporary directory under its own package name (``interlace_old``,
``interlace_new``; absolute self-imports are rewritten, everything else is relative), both
trace the same tiny GPT-2 module, and every variant of both runs round-robin with a plain
forward and raw hooks, so machine noise hits all of them alike. Times are this thread's CPU
time (one torch thread); the table shows medians and minimums.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import overhead  # the sibling benchmark (bench/ is on sys.path when run as a script)

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent
_SELF_IMPORT = re.compile(r"\b(from|import) interlace([. ])")


def _copy_version(rev: str | None, name: str, into: Path) -> None:
    """`src/interlace` at `rev` (None: the working tree) as package `name` under `into`."""
    target = into / name
    if rev is None:
        shutil.copytree(_ROOT / "src" / "interlace", target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(_ROOT), "archive", rev, "src/interlace"], check=True, capture_output=True).stdout
        unpacked = into / f"{name}-src"
        unpacked.mkdir()
        subprocess.run(["tar", "-x", "-C", str(unpacked)], input=archive, check=True)
        shutil.move(str(unpacked / "src" / "interlace"), str(target))
    for path in target.rglob("*.py"):
        path.write_text(_SELF_IMPORT.sub(rf"\1 {name}\2", path.read_text()))


# The variants of overhead.py timed here, for each version (plain and hooks once).
_COMPARED = ("interlace: pass", "interlace: one statement", "interlace: save blocks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="git revision of the baseline")
    parser.add_argument("new", nargs="?", default=None, help="git revision to compare (default: working tree)")
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="interlace-compare-"))
    try:
        _copy_version(args.old, "interlace_old", work)
        _copy_version(args.new, "interlace_new", work)
        sys.path.insert(0, str(work))
        from transformers import AutoModelForCausalLM

        old = importlib.import_module("interlace_old")
        new = importlib.import_module("interlace_new")
        demo = importlib.import_module("interlace_new.models.demo")
        path = demo.build_tiny_gpt2(Path(tempfile.gettempdir()) / "interlace-bench" / "tiny-gpt2")
        module = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))

        # Each version mounts its own `Tensor.save`; the one in place decides which registry
        # a `.save()` reaches, so it is set before every call of that version's variants.
        baseline = overhead._variants(module, ids)
        variants: dict[str, tuple[Callable[[], Any], Any]] = {
            name: (baseline[name], None) for name in ("plain", "hooks: save blocks")
        }
        for label, package in (("old", old), ("new", new)):
            saving = importlib.import_module(f"{package.__name__}.tracing.saving")
            timed = overhead._variants(module, ids, package)
            for name in _COMPARED:
                variants[f"{label}: {name.removeprefix('interlace: ')}"] = (timed[name], saving._tensor_save)
        times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.no_grad():
            for i in range(20 + args.runs):
                for name, (fn, tensor_save) in variants.items():
                    if tensor_save is not None:
                        torch.Tensor.save = tensor_save  # type: ignore[attr-defined]
                    start = time.thread_time_ns()
                    fn()
                    elapsed = (time.thread_time_ns() - start) / 1e6
                    if i >= 20:
                        times[name].append(elapsed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    low = {name: min(v) for name, v in times.items()}
    print(f"tiny GPT-2, 1 x 32 ids, one thread, {args.runs} round-robin rounds; old = {args.old}, new = {args.new or 'working tree'}\n")
    print("| variant | median ms | - plain ms | / hooks | min ms | - plain ms | / hooks |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in times:
        print(
            f"| {name} | {med[name]:.3f} | {med[name] - med['plain']:+.3f} | {med[name] / med['hooks: save blocks']:.3f} "
            f"| {low[name]:.3f} | {low[name] - low['plain']:+.3f} | {low[name] / low['hooks: save blocks']:.3f} |"
        )


if __name__ == "__main__":
    main()
