"""What tracing costs on top of plain Hugging Face generation, on CPU.

Run by hand: ``.venv/bin/python bench/generation.py [--runs 60] [--tokens 16] [--clock cpu] [--append]``.

Model: the tiny GPT-2 (4 layers x 128, ``demo.build_tiny_gpt2``) as an
``interlace.LanguageModel``, fed a token-id tensor (1 x 16, no tokenizer in the timed part),
greedy, ``max_new_tokens=16``, one thread.

Variants (each one call, timed with ``perf_counter``, or this thread's CPU time with
``--clock cpu``, steadier on a shared machine; all compute runs on this thread):
- ``hf generate``: ``module.generate(input_ids=..., attention_mask=..., max_new_tokens=16)``.
- ``hf generate + hook``: the same with a raw forward hook on ``lm_head`` keeping each step's
  logits (what a script without Interlace does).
- ``hf generate, signature cached``: plain generate with the model's ``forward`` replaced by
  a pass-through function carrying its ``__signature__``. ``generate`` calls
  ``inspect.signature(model.forward)`` several times per call (about 3 % of this small
  model's generation); Interlace's root wrapper carries the signature, so traced generation
  skips that work. This variant is the like-for-like baseline for what tracing costs.
- ``interlace generate``: ``with model.generate(ids, max_new_tokens=16) as tracer:`` with a
  loop ``for step in tracer.iter[:]: logits.append(model.lm_head.output)``.
- ``interlace generate, wrap all``: the same with every module wrapped for the run (what all
  runs did before call-order tables; now only a model's first run, or shared modules).

Variants run round-robin (one call of each, repeated) so machine noise hits all alike; the
table shows medians and the ratio to plain ``hf generate``. Target: within 1.03x.
``--append`` adds the table as a new pass at the top of ``bench/JOURNAL.md`` (the current figure in
``bench/RESULTS.md`` is updated by hand from it).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import interlace
from interlace.models import demo

__all__ = ["main", "report"]


def _variants(model: interlace.LanguageModel, ids: torch.Tensor, tokens: int) -> dict[str, Callable[[], Any]]:
    module = model._module
    mask = torch.ones_like(ids)
    pad = model.tokenizer.pad_token_id
    lm_head = module.lm_head

    def hf() -> Any:
        return module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=pad)

    def hf_signature_cached() -> Any:
        inner = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return inner(*args, **kwargs)

        forward.__signature__ = inspect.signature(inner)  # type: ignore[attr-defined]
        module.__dict__["forward"] = forward
        try:
            return hf()
        finally:
            del module.__dict__["forward"]

    def hf_hook() -> Any:
        saved: list[Any] = []
        handle = lm_head.register_forward_hook(lambda m, a, o: saved.append(o))
        try:
            out = hf()
        finally:
            handle.remove()
        return out, saved

    def traced() -> Any:
        with model.generate(ids, max_new_tokens=tokens, do_sample=False) as tracer:
            logits = list().save()
            for step in tracer.iter[:]:
                logits.append(model.lm_head.output)
            out = model.generator.output.save()
        assert len(logits) == tokens, len(logits)
        return out, logits

    def traced_wrap_all() -> Any:
        model.__dict__["_no_lazy"] = True  # every module wrapped, as before call-order tables
        try:
            return traced()
        finally:
            del model.__dict__["_no_lazy"]

    return {
        "hf generate": hf,
        "hf generate + hook": hf_hook,
        "hf generate, signature cached": hf_signature_cached,
        "interlace generate": traced,
        "interlace generate, wrap all": traced_wrap_all,
    }


def measure(runs: int, tokens: int, warmup: int = 5, clock: Any = time.perf_counter) -> tuple[dict[str, float], dict[str, float]]:
    """Medians per variant, and the median of per-round ratios interlace / hf (less sensitive
    to slow drifts in machine load than the ratio of medians)."""
    models_dir = os.environ.get("INTERLACE_TEST_MODELS_DIR") or Path(tempfile.gettempdir()) / "interlace-bench"
    path = demo.build_tiny_gpt2(Path(models_dir) / "tiny-gpt2")
    model = interlace.LanguageModel(str(path), dispatch=True)
    torch.manual_seed(0)
    ids = torch.randint(1, model._module.config.vocab_size, (1, 16))
    variants = _variants(model, ids, tokens)
    reference = variants["hf generate"]()
    got, _ = variants["interlace generate"]()
    assert torch.equal(got, reference), "traced generation must produce the same tokens"
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + runs):
        for name, fn in variants.items():
            start = clock()
            fn()
            elapsed = clock() - start
            if i >= warmup:
                times[name].append(elapsed)
    paired = {
        base: statistics.median(t / h for t, h in zip(times["interlace generate"], times[base]))
        for base in ("hf generate", "hf generate, signature cached")
    }
    return {name: statistics.median(values) for name, values in times.items()}, paired


def table(medians: dict[str, float], runs: int, tokens: int) -> str:
    base = medians["hf generate"]
    lines = [
        f"tiny GPT-2, 1 x 16 prompt ids, {tokens} new tokens (greedy), 1 thread, median of {runs} "
        f"round-robin runs; torch {torch.__version__}, Python {platform.python_version()}",
        "",
        "| variant | median ms | ms / token | vs hf generate | vs signature cached |",
        "|---|---:|---:|---:|---:|",
    ]
    cached = medians["hf generate, signature cached"]
    for name, value in medians.items():
        lines.append(
            f"| {name} | {value * 1e3:.2f} | {value * 1e3 / tokens:.3f} | {value / base:.3f}x | {value / cached:.3f}x |"
        )
    return "\n".join(lines)


def report(runs: int, tokens: int, clock: Any = time.perf_counter) -> tuple[str, str]:
    """The table and a one-line summary of the ratios (also printed by `overhead.py`)."""
    with torch.no_grad():
        medians, paired = measure(runs, tokens, clock=clock)
    ratio = medians["interlace generate"] / medians["hf generate"]
    like = medians["interlace generate"] / medians["hf generate, signature cached"]
    summary = (
        f"interlace generate / hf generate: {ratio:.3f}x (ratio of medians), "
        f"{paired['hf generate']:.3f}x (median of per-round ratios); like for like (vs signature "
        f"cached): {like:.3f}x and {paired['hf generate, signature cached']:.3f}x; target <= 1.03x"
    )
    return table(medians, runs, tokens), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall: perf_counter; cpu: this thread's CPU time")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--append", action="store_true", help="add the table as a new pass at the top of bench/JOURNAL.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text, summary = report(args.runs, args.tokens, time.thread_time if args.clock == "cpu" else time.perf_counter)
    print(text)
    print("\n" + summary)
    if args.append:
        journal = Path(__file__).with_name("JOURNAL.md")
        old = journal.read_text()
        cut = old.index("\n## ")  # newest first: the new pass goes above the first one
        entry = (f"\n## generation, {time.strftime('%Y-%m-%d')}\n\n`bench/generation.py --runs {args.runs} "
                 f"--tokens {args.tokens}`\n\n{text}\n\n{summary}.\n")
        journal.write_text(old[:cut] + entry + old[cut:])


if __name__ == "__main__":
    main()
