"""What tracing costs on top of a plain forward, on CPU.

Run by hand: ``.venv/bin/python bench/overhead.py [--threads 1] [--runs 200] [--big-runs 7]
[--gen-runs 60] [--clock wall|cpu] [--only tiny|small|structure|generation]``.

Models: the tiny GPT-2 (4 layers x 128, ``demo.build_tiny_gpt2``) and a GPT-2-small-shaped
model (12 x 768, random weights, ``demo.build_gpt2_small_shape``), each wrapped with
``interlace.NNsight`` and fed token-id tensors (no tokenizer), under ``torch.no_grad()``.
Shapes: batch 1 x 32 tokens and batch 8 x 128 tokens.

Variants (each one call, timed with ``perf_counter``):
- ``plain``: ``module(ids)``.
- ``hooks: save blocks``: raw ``register_forward_hook`` on every block appending its output
  to a list; hooks registered before and removed after each run (what a script does).
- ``interlace: save blocks``: ``interlace.save([b.output for b in model.transformer.h])``.
- ``interlace: pass``: a body of only ``pass`` (the engine still runs: capture, wrappers,
  one greenlet).
- ``interlace: one statement``: ``logits = model.lm_head.output.save()``. The fixed cost is
  its median minus the plain forward's median.
- ``wrap all: ...``: the same bodies on a second ``NNsight`` of the module that wraps every
  module in every run (``_no_lazy``), as all runs did before call-order tables.
- ``hooks: zero + logits`` / ``interlace: zero + logits``: zero block 1's output in place and
  keep the logits.

Last, generation (``bench/generation.py``'s comparison, printed here too): the tiny GPT-2
generating 16 new tokens with a body that saves the logits of each step, against plain
Hugging Face ``generate`` (target: within 1.03x).

All variants of one model and shape run round-robin (one call of each, repeated), so machine
noise hits all of them alike; the table shows medians and ratios to the plain forward and to
the matching raw-hook variant. Acceptance numbers are taken with ``--threads 1``.
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

__all__ = ["main"]


def _variants(module: Any, ids: torch.Tensor, package: Any = interlace) -> dict[str, Callable[[], Any]]:
    """The timed variants; `package` is the Interlace to trace with (`compare.py` passes two
    copies of it, `opcodes.py` counts a subset)."""
    model = package.NNsight(module)
    # The same model traced the way every run worked before call-order tables: every module
    # wrapped for each run (what a model with a shared module, or using `.source`, still does).
    full = package.NNsight(module)
    full.__dict__["_no_lazy"] = True
    blocks = list(module.transformer.h)
    layer = blocks[1]

    def plain() -> Any:
        return module(ids)

    def hooks_save_blocks() -> Any:
        saved: list[Any] = []
        handles = [b.register_forward_hook(lambda m, a, o: saved.append(o)) for b in blocks]
        try:
            module(ids)
        finally:
            for h in handles:
                h.remove()
        return saved

    def interlace_save_blocks() -> Any:
        with model.trace(ids):
            outs = package.save([b.output for b in model.transformer.h])
        return outs

    def full_save_blocks() -> Any:
        with full.trace(ids):
            outs = package.save([b.output for b in full.transformer.h])
        return outs

    def full_one_statement() -> Any:
        with full.trace(ids):
            logits = full.lm_head.output.save()
        return logits

    def interlace_pass() -> Any:
        with model.trace(ids):
            pass

    def interlace_one_statement() -> Any:
        with model.trace(ids):
            logits = model.lm_head.output.save()
        return logits

    def hooks_zero_logits() -> Any:
        saved: list[Any] = []

        def zero(m: Any, a: Any, o: Any) -> None:
            o[:] = 0

        h1 = layer.register_forward_hook(zero)
        h2 = module.lm_head.register_forward_hook(lambda m, a, o: saved.append(o))
        try:
            module(ids)
        finally:
            h1.remove()
            h2.remove()
        return saved[0]

    def interlace_zero_logits() -> Any:
        with model.trace(ids):
            model.transformer.h[1].output[:] = 0
            logits = model.lm_head.output.save()
        return logits

    return {
        "plain": plain,
        "hooks: save blocks": hooks_save_blocks,
        "interlace: save blocks": interlace_save_blocks,
        "interlace: pass": interlace_pass,
        "interlace: one statement": interlace_one_statement,
        "wrap all: save blocks": full_save_blocks,
        "wrap all: one statement": full_one_statement,
        "hooks: zero + logits": hooks_zero_logits,
        "interlace: zero + logits": interlace_zero_logits,
    }


#: Which raw-hook variant each Interlace variant is compared with.
_HOOK_PEER = {
    "interlace: save blocks": "hooks: save blocks",
    "interlace: pass": "plain",
    "interlace: one statement": "plain",
    "wrap all: save blocks": "hooks: save blocks",
    "wrap all: one statement": "plain",
    "interlace: zero + logits": "hooks: zero + logits",
}


def _check(variants: dict[str, Callable[[], Any]]) -> None:
    """The Interlace variants compute the same values as their raw-hook peers."""
    a, b = variants["hooks: save blocks"](), variants["interlace: save blocks"]()
    assert len(a) == len(b) and all(torch.equal(x if torch.is_tensor(x) else x[0], y if torch.is_tensor(y) else y[0]) for x, y in zip(a, b))
    assert torch.equal(variants["hooks: zero + logits"](), variants["interlace: zero + logits"]())


def measure(
    module: Any,
    batch: int,
    tokens: int,
    runs: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
    block: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each variant (one list per variant), run round-robin: `block`
    calls of one variant in a row, then the next variant's (1: strictly one call each).

    With cold caches after every forward, a call's cost depends on what ran before it:
    round-robin one call at a time puts each trace after a different kind of trace, while a
    user's loop repeats one kind. Blocks of a few calls measure that (and still spread the
    machine's drift over all variants)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, module.config.vocab_size, (batch, tokens), generator=gen)
    variants = _variants(module, ids)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        _check(variants)
        done = 0
        while done < warmup + runs:
            n = min(block, warmup + runs - done)
            for name, fn in variants.items():
                for i in range(done, done + n):
                    start = clock()
                    fn()
                    elapsed = clock() - start
                    if i >= warmup:
                        times[name].append(elapsed)
            done += n
    return times


def _table(title: str, times: dict[str, list[float]]) -> str:
    """Medians (the acceptance numbers) and minimums (the least noisy estimate of each
    variant's own cost on a shared machine)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    lines = [
        f"### {title}",
        "",
        "| variant | median ms | / plain | / raw hooks | min ms | min / plain | min / raw hooks |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in times:
        peer = _HOOK_PEER.get(name)
        lines.append(
            f"| {name} | {med[name] * 1e3:.3f} | {med[name] / med['plain']:.3f} | "
            + (f"{med[name] / med[peer]:.3f}" if peer else "")
            + f" | {low[name] * 1e3:.3f} | {low[name] / low['plain']:.3f} | "
            + (f"{low[name] / low[peer]:.3f}" if peer else "")
            + " |"
        )

    def fixed(stats: dict[str, float], variant: str) -> float:
        return (stats[variant] - stats["plain"]) * 1e3

    lines += [
        "",
        f"fixed cost (one statement - plain): median {fixed(med, 'interlace: one statement'):.3f} ms, "
        f"min {fixed(low, 'interlace: one statement'):.3f} ms; `pass` body - plain: median "
        f"{fixed(med, 'interlace: pass'):.3f} ms, min {fixed(low, 'interlace: pass'):.3f} ms; "
        f"wrap all, one statement - plain: median {fixed(med, 'wrap all: one statement'):.3f} ms, "
        f"min {fixed(low, 'wrap all: one statement'):.3f} ms",
        "",
    ]
    return "\n".join(lines)


def _structure_model() -> Any:
    """GPT-2-small's module tree (12 blocks, the same modules) at width 64: the forward is
    cheap, so the per-trace cost, which depends on the number of module calls and not on
    their size, can be measured precisely."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=12, n_head=4, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--runs", type=int, default=300, help="rounds for the tiny model at 1 x 32 (a third at 8 x 128)")
    parser.add_argument("--small-runs", type=int, default=30, help="rounds for GPT-2-small at 1 x 32")
    parser.add_argument("--big-runs", type=int, default=5, help="rounds for GPT-2-small at 8 x 128")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--block", type=int, default=1,
        help="calls of one variant in a row before the next variant's (1: strict round-robin; "
        "a few, like a user's loop, where each trace follows one of its own kind)",
    )
    parser.add_argument("--gen-runs", type=int, default=60, help="rounds of the generation comparison (`generation.py`)")
    parser.add_argument("--only", choices=["tiny", "small", "structure", "generation"], default=None)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: this thread's CPU time (steadier on a shared machine; "
        "only meaningful with --threads 1, where all compute runs on this thread)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu needs --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    # (name, model factory, [(batch, tokens, rounds)])
    plan: list[tuple[str, Callable[[], Any], list[tuple[int, int, int]]]] = []
    if args.only in (None, "tiny"):

        def tiny() -> Any:
            from transformers import AutoModelForCausalLM

            path = demo.build_tiny_gpt2(Path(tempfile.gettempdir()) / "interlace-bench" / "tiny-gpt2")
            return AutoModelForCausalLM.from_pretrained(str(path)).eval()

        plan.append(("tiny GPT-2 (4 x 128)", tiny, [(1, 32, args.runs), (8, 128, max(1, args.runs // 3))]))
    if args.only in (None, "structure"):
        plan.append(("GPT-2-small structure at width 64 (12 x 64)", _structure_model, [(1, 32, args.runs)]))
    if args.only in (None, "small"):
        plan.append(("GPT-2-small shape (12 x 768)", demo.build_gpt2_small_shape, [(1, 32, args.small_runs), (8, 128, args.big_runs)]))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, block {args.block}, python {sys.version.split()[0]}\n")
    for name, factory, shapes in plan:
        module = factory()
        for batch, tokens, runs in shapes:
            warmup = 1 if runs < 10 else args.warmup
            times = measure(module, batch, tokens, runs, warmup, clock, args.block)
            print(_table(f"{name}, batch {batch} x {tokens} tokens, {runs} rounds", times), flush=True)
    if args.only in (None, "generation"):
        import generation  # the sibling benchmark (bench/ is on sys.path when run as a script)

        text, summary = generation.report(args.gen_runs, 16, clock)
        print(f"### generation: 16 new tokens saving logits each step, against plain Hugging Face generate\n\n{text}\n\n{summary}\n")


if __name__ == "__main__":
    main()
