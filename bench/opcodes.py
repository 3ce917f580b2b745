"""How much Python a trace executes: a noise-free companion to the timing benchmarks.

Run by hand: ``.venv/bin/python bench/opcodes.py``.

On a shared machine the timings in ``overhead.py`` and ``generation.py`` move by 10-30 %
from run to run, more than the differences being tuned. This script counts, with an opcode
trace function, the bytecode instructions one call of each variant executes (deterministic)
and how many distinct instructions of Interlace's own code it touches. Interlace's code runs
with cold caches next to a forward, so its cost follows the distinct count closely (about
50 ns per distinct instruction on the tiny GPT-2 here); see "## opcodes" in RESULTS.md.

The variants are those of ``overhead.py`` (tiny GPT-2, ``interlace.NNsight``, 1 x 32 token ids)
and ``generation.py`` (``LanguageModel``, 16 new tokens, logits saved each step).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

import generation  # the sibling benchmarks (bench/ is on sys.path when run as a script)
import interlace
import overhead
from interlace.models import demo

__all__ = ["count", "main"]

_PACKAGE = os.path.dirname(os.path.abspath(interlace.__file__)) + os.sep


def count(fn: Callable[[], Any]) -> tuple[int, int]:
    """(bytecode instructions executed by `fn()`, distinct instructions of Interlace's code)."""
    executed = 0
    ours: set[tuple[Any, int]] = set()

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal executed
        frame.f_trace_opcodes = True
        if event == "opcode":
            executed += 1
            if frame.f_code.co_filename.startswith(_PACKAGE):
                ours.add((frame.f_code, frame.f_lasti))
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return executed, len(ours)


def _trace_variants(models_dir: Path) -> dict[str, Callable[[], Any]]:
    from transformers import AutoModelForCausalLM

    module = AutoModelForCausalLM.from_pretrained(str(demo.build_tiny_gpt2(models_dir / "tiny-gpt2"))).eval()
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    timed = overhead._variants(module, ids)
    return {name: timed[name] for name in _TRACE_VARIANTS}


def _generation_variants(models_dir: Path, tokens: int = 16) -> dict[str, Callable[[], Any]]:
    model = interlace.LanguageModel(str(demo.build_tiny_gpt2(models_dir / "tiny-gpt2")), dispatch=True)
    ids = torch.randint(1, model._module.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    timed = generation._variants(model, ids, tokens)
    return {name: timed[name] for name in _GENERATION_VARIANTS}


# The variants of overhead.py and generation.py counted here (the first row is the baseline).
_TRACE_VARIANTS = ("plain", "hooks: save blocks", "interlace: pass", "interlace: one statement", "interlace: save blocks")
_GENERATION_VARIANTS = ("hf generate", "hf generate, signature cached", "interlace generate")


def _report(title: str, variants: dict[str, Callable[[], Any]], base: str) -> None:
    for fn in variants.values():  # warm: first runs record call-order tables and caches
        for _ in range(3):
            fn()
    counts = {name: count(fn) for name, fn in variants.items()}
    ref = counts[base][0]
    print(f"\n### {title}\n")
    print("| variant | instructions executed | over the first row | distinct Interlace instructions |")
    print("|---|---:|---:|---:|")
    for name, (executed, ours) in counts.items():
        print(f"| {name} | {executed} | {executed - ref:+d} ({executed / ref - 1:+.1%}) | {ours} |")


def main() -> None:
    torch.set_num_threads(1)
    models_dir = Path(os.environ.get("INTERLACE_TEST_MODELS_DIR") or Path(tempfile.gettempdir()) / "interlace-bench")
    with torch.no_grad():
        _report("tiny GPT-2, 1 x 32 token ids", _trace_variants(models_dir), "plain")
        _report("tiny GPT-2 generation, 16 new tokens", _generation_variants(models_dir), "hf generate")


if __name__ == "__main__":
    main()
