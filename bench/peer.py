"""Interlace and nnsight side by side, in one process: #2's targets as ratios.

Run by hand, with nnsight importable (it is not a dependency of Interlace; install it into a
separate directory and put that on ``PYTHONPATH``)::

    pip install --target /tmp/nnsight_pkg --no-deps nnsight==0.8.1
    PYTHONPATH=/tmp/nnsight_pkg .venv/bin/python bench/peer.py --runs 500

#2 states its targets in milliseconds measured once on this machine (nnsight 0.8.1: 0.27 ms
fixed cost per trace, 1.15x raw hooks saving all blocks; Interlace: under 0.1 ms and within
1.05x). This shared machine's speed moves by ±30 % over an hour, so an absolute number taken
at another time says little. Timing both libraries in the same session turns the fixed-cost
target into a ratio that the load cancels out of: Interlace's fixed cost over nnsight's, to
be under 0.1 / 0.27 = 0.37.

Model: the tiny GPT-2 (4 x 128) at 1 x 32 token ids, one torch thread, thread CPU time,
``torch.no_grad()``. Each library has its own copy of the Hugging Face module, with its own
plain-forward and raw-hook baselines on that copy: nnsight leaves wrappers on the modules
it traced, which would slow everything else run on them. Each library runs in blocks of
rounds of its own variants (plain, raw hooks, the three bodies, round-robin), and the
libraries' blocks alternate. Variants of the two libraries interleaved call by call
distort each other: each one's code evicts the other's from the caches. Both libraries give
values a ``.save()`` method (Interlace on tensors, nnsight on every object); the one on
``torch.Tensor`` is set to the running library's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import interlace
from interlace.models import demo
from interlace.tracing import saving

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402  (the plain and raw-hook variants, and Interlace's own)

__all__ = ["main"]

#: (the same body in each library, its raw baseline)
_BODIES = {
    "one statement": "plain",
    "pass": "plain",
    "save blocks": "hooks: save blocks",
}


def _nnsight_variants(nnsight: Any, module: Any, ids: torch.Tensor) -> dict[str, Callable[[], Any]]:
    model = nnsight.NNsight(module)

    def one_statement() -> Any:
        with model.trace(ids):
            logits = model.lm_head.output.save()
        return logits

    def pass_body() -> Any:
        with model.trace(ids):
            pass

    def save_blocks() -> Any:
        with model.trace(ids):
            outs = nnsight.save([b.output for b in model.transformer.h])
        return outs

    return {"one statement": one_statement, "pass": pass_body, "save blocks": save_blocks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--block", type=int, default=50, help="rounds of one library before the other's")
    args = parser.parse_args(argv)
    try:
        import nnsight
    except ImportError:
        parser.error("nnsight is not importable; see this script's docstring for how to install it beside Interlace")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    path = demo.build_tiny_gpt2(Path(tempfile.gettempdir()) / "interlace-bench" / "tiny-gpt2")
    module = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.randint(0, module.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    ours = overhead._variants(module, ids)
    # nnsight leaves its own `forward` on the modules it has traced; on a shared module that
    # would slow the plain forward, the raw hooks and Interlace too (and send Interlace down
    # its path for modules with an instance `forward`). So it gets its own copy, and the
    # baselines are measured on each copy.
    their_module = copy.deepcopy(module)
    their_bases = overhead._variants(their_module, ids)
    theirs = _nnsight_variants(nnsight, their_module, ids)
    # library -> (the `Tensor.save` to mount while it runs, variant -> callable)
    libraries: dict[str, tuple[Any, dict[str, Callable[[], Any]]]] = {
        "interlace": (
            saving._tensor_save,
            {"plain": ours["plain"], "hooks: save blocks": ours["hooks: save blocks"],
             **{body: ours[f"interlace: {body}"] for body in _BODIES}},
        ),
        "nnsight": (
            nnsight.save,
            {"plain": their_bases["plain"], "hooks: save blocks": their_bases["hooks: save blocks"], **theirs},
        ),
    }

    with torch.no_grad():
        # Both libraries trace correctly here before either is timed.
        for library, (tensor_save, variants) in libraries.items():
            torch.Tensor.save = tensor_save  # type: ignore[attr-defined]
            blocks, logits = variants["hooks: save blocks"](), variants["plain"]().logits
            saved = variants["save blocks"]()
            assert len(saved) == len(blocks) and all(map(torch.equal, saved, blocks)), f"{library} must save what raw hooks see"
            assert torch.equal(variants["one statement"](), logits), f"{library} must save the logits"
        # Each library runs in blocks of rounds of its own variants (round-robin within the
        # block), the libraries' blocks alternating: machine drift reaches both, but neither
        # library's code evicts the other's from the caches between two of its own calls.
        times = {lib: {name: [] for name in variants} for lib, (_, variants) in libraries.items()}
        rounds = 0
        while rounds < args.warmup + args.runs:
            block = min(args.block, args.warmup + args.runs - rounds)
            for library, (tensor_save, variants) in libraries.items():
                torch.Tensor.save = tensor_save  # type: ignore[attr-defined]
                for i in range(rounds, rounds + block):
                    for name, fn in variants.items():
                        start = time.thread_time()
                        fn()
                        elapsed = time.thread_time() - start
                        if i >= args.warmup:
                            times[library][name].append(elapsed)
            rounds += block
    torch.Tensor.save = saving._tensor_save  # type: ignore[attr-defined]

    print(
        f"tiny GPT-2 (4 x 128), 1 x 32 ids, one thread, thread CPU time, {args.runs} rounds in blocks of "
        f"{args.block}; interlace {interlace.__version__}, nnsight {nnsight.__version__}, torch {torch.__version__}\n"
    )
    for stat_name, stat in (("median", statistics.median), ("min", min)):
        value = {lib: {name: stat(t) * 1e3 for name, t in by_name.items()} for lib, by_name in times.items()}
        ours_v, theirs_v = value["interlace"], value["nnsight"]
        print(f"#### {stat_name}\n")
        print("| body | Interlace ms over its baseline | nnsight ms over its baseline | Interlace / nnsight (over baseline) | Interlace / baseline | nnsight / baseline |")
        print("|---|---:|---:|---:|---:|---:|")
        for body, base in _BODIES.items():
            ours_over = ours_v[body] - ours_v[base]
            theirs_over = theirs_v[body] - theirs_v[base]
            print(
                f"| {body} (vs {base}) | {ours_over:+.3f} | {theirs_over:+.3f} | "
                f"{ours_over / theirs_over:.2f} | {ours_v[body] / ours_v[base]:.3f} | {theirs_v[body] / theirs_v[base]:.3f} |"
            )
        print(
            f"\nplain forward {ours_v['plain']:.3f} / {theirs_v['plain']:.3f} ms (Interlace's copy / nnsight's); "
            f"raw hooks saving all blocks {ours_v['hooks: save blocks']:.3f} / {theirs_v['hooks: save blocks']:.3f} ms\n"
        )
    print("#2's targets as ratios: one statement's fixed cost under 0.37 of nnsight's (0.1 / 0.27 ms); save blocks within 1.05x of raw hooks.")


if __name__ == "__main__":
    main()
