"""Two versions of Interlace side by side: one benchmark script, run alternately on each.

Run by hand, with the other version checked out beside this one (for example the commit
before a refactor)::

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/versions.py --before /tmp/before --rounds 4 -- bench/overhead.py --threads 1 --only tiny
    PYTHONPATH=/tmp/nnsight_pkg .venv/bin/python bench/versions.py --before /tmp/before -- bench/peer.py --runs 300

Each round runs the script once with the "before" tree's `src/` first on `PYTHONPATH` and
once with this tree's, in alternating order, so slow and fast phases of a shared machine hit
both alike. The script is the *same* file for both (this tree's), so only the library
differs. The figures each run prints that match `--figure` (a regular expression with one
group, the number; repeatable) are collected, and the table gives their medians and the
after / before ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent.parent

#: Default figures: the lines `bench/overhead.py` and `bench/peer.py` end their tables with.
DEFAULT_FIGURES = [
    # bench/overhead.py: fixed costs, and save blocks over raw hooks (per model and shape)
    r"fixed cost \(one statement - plain\): median (-?[0-9.]+) ms",
    r"`pass` body - plain: median (-?[0-9.]+) ms",
    r"\| interlace: save blocks \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+) \|",
    # bench/peer.py (median table first): Interlace's ms over its baseline, Interlace / nnsight
    r"\| one statement \(vs plain\) \| \+?(-?[0-9.]+) \|",
    r"\| one statement \(vs plain\) \| [-+0-9.]+ \| [-+0-9.]+ \| ([0-9.]+) \|",
    r"\| save blocks \(vs hooks: save blocks\) \| [-+0-9.]+ \| [-+0-9.]+ \| [-0-9.]+ \| ([0-9.]+) \|",
]


def _run(tree: Path, command: list[str]) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, *command], cwd=HERE, env=env, capture_output=True, text=True, check=True)
    return out.stdout


def _figures(text: str, patterns: list[str]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for pattern in patterns:
        for match in re.finditer(pattern, text):
            found.setdefault(pattern, []).append(float(match.group(1)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (its src/ is used)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--figure", action="append", help="regex with one group: a number to compare")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    patterns = args.figure or DEFAULT_FIGURES
    runs: dict[str, list[dict[str, list[float]]]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        order = [("before", args.before), ("after", HERE)]
        if round_ % 2:
            order.reverse()
        for name, tree in order:
            runs[name].append(_figures(_run(tree, command), patterns))
            print(f"round {round_ + 1}: {name} done", file=sys.stderr, flush=True)
    print(f"`{' '.join(command)}`, {args.rounds} rounds each, alternating\n")
    print("| figure (occurrence) | before (median) | after (median) | after / before |")
    print("|---|---:|---:|---:|")
    for pattern in patterns:
        counts = {len(r.get(pattern, [])) for rs in runs.values() for r in rs}
        for i in range(min(counts) if counts else 0):
            before = statistics.median(r[pattern][i] for r in runs["before"])
            after = statistics.median(r[pattern][i] for r in runs["after"])
            ratio = f"{after / before:.3f}" if before else "n/a"
            print(f"| `{pattern}` ({i + 1}) | {before:.4f} | {after:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
