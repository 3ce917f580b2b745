"""Interlace and nnsight side by side, in one process, round-robin: #2's targets as ratios.

Run by hand, with nnsight importable (it is not a dependency of Interlace; install it into a
separate directory and put that on ``PYTHONPATH``)::

    pip install --target /tmp/nnsight_pkg --no-deps nnsight==0.8.1
    PYTHONPATH=/tmp/nnsight_pkg .venv/bin/python bench/peer.py --runs 500

#2 states its targets in milliseconds measured once on this machine (nnsight 0.8.1: 0.27 ms
fixed cost per trace, 1.15x raw hooks saving all blocks; Interlace: under 0.1 ms and within
1.05x). This shared machine's speed moves by ±30 % over an hour, so an absolute number taken
at another time says little. Timing both libraries in the same rounds turns the fixed-cost
target into a ratio that the load cancels out of: Interlace's fixed cost over nnsight's, to
be under 0.1 / 0.27 = 0.37.

Model: the tiny GPT-2 (4 x 128) at 1 x 32 token ids, one torch thread, thread CPU time,
``torch.no_grad()``. Both libraries wrap the same Hugging Face module; each call of a
variant is one ``with model.trace(ids):`` block. Both libraries give values a ``.save()``
method (Interlace on tensors, nnsight on every object); the one in place on ``torch.Tensor``
is set to the traced library's before each call.
"""

from __future__ import annotations

import argparse
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
    theirs = _nnsight_variants(nnsight, module, ids)
    # (callable, the `Tensor.save` to mount before calling it, or None to leave it)
    variants: dict[str, tuple[Callable[[], Any], Any]] = {
        "plain": (ours["plain"], None),
        "hooks: save blocks": (ours["hooks: save blocks"], None),
    }
    for body in _BODIES:
        variants[f"interlace: {body}"] = (ours[f"interlace: {body}"], saving._tensor_save)
        variants[f"nnsight: {body}"] = (theirs[body], nnsight.save)

    with torch.no_grad():
        torch.Tensor.save = saving._tensor_save  # type: ignore[attr-defined]
        # Both libraries trace correctly here before either is timed.
        blocks, logits = ours["hooks: save blocks"](), ours["plain"]().logits
        for library, variant in (("interlace", ours), ("nnsight", theirs)):
            torch.Tensor.save = variants[f"{library}: pass"][1]  # type: ignore[attr-defined]
            saved = variant["save blocks" if library == "nnsight" else "interlace: save blocks"]()
            assert len(saved) == len(blocks) and all(map(torch.equal, saved, blocks)), f"{library} must save what raw hooks see"
            got = variant["one statement" if library == "nnsight" else "interlace: one statement"]()
            assert torch.equal(got, logits), f"{library} must save the logits"
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.warmup + args.runs):
            for name, (fn, tensor_save) in variants.items():
                if tensor_save is not None:
                    torch.Tensor.save = tensor_save  # type: ignore[attr-defined]
                start = time.thread_time()
                fn()
                elapsed = time.thread_time() - start
                if i >= args.warmup:
                    times[name].append(elapsed)
    torch.Tensor.save = saving._tensor_save  # type: ignore[attr-defined]

    print(
        f"tiny GPT-2 (4 x 128), 1 x 32 ids, one thread, thread CPU time, {args.runs} round-robin rounds; "
        f"interlace {interlace.__version__}, nnsight {nnsight.__version__}, torch {torch.__version__}\n"
    )
    for stat_name, stat in (("median", statistics.median), ("min", min)):
        value = {name: stat(t) * 1e3 for name, t in times.items()}
        print(f"#### {stat_name}\n")
        print("| body | Interlace ms over its baseline | nnsight ms over its baseline | Interlace / nnsight (over baseline) | Interlace / baseline | nnsight / baseline |")
        print("|---|---:|---:|---:|---:|---:|")
        for body, base in _BODIES.items():
            ours_over = value[f"interlace: {body}"] - value[base]
            theirs_over = value[f"nnsight: {body}"] - value[base]
            print(
                f"| {body} (vs {base}) | {ours_over:+.3f} | {theirs_over:+.3f} | "
                f"{ours_over / theirs_over:.2f} | {value[f'interlace: {body}'] / value[base]:.3f} | "
                f"{value[f'nnsight: {body}'] / value[base]:.3f} |"
            )
        print(f"\nplain forward {value['plain']:.3f} ms; raw hooks saving all blocks {value['hooks: save blocks']:.3f} ms\n")
    print("#2's targets as ratios: one statement's fixed cost under 0.37 of nnsight's (0.1 / 0.27 ms); save blocks within 1.05x of raw hooks.")


if __name__ == "__main__":
    main()
