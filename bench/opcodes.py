"""How much Python a trace executes: a noise-free companion to the timing benchmarks.

Run by hand: ``.venv/bin/python bench/opcodes.py``.

On a shared machine the timings in ``overhead.py`` and ``generation.py`` move by 10-30 %
from run to run, more than the differences being tuned. This script counts, with an opcode
trace function, the bytecode instructions one call of each variant executes (deterministic)
and how many distinct instructions of Interlace's own code it touches. Interlace's code runs
with cold caches next to a forward, so its cost follows the distinct count closely (about
50 ns per distinct instruction on the tiny GPT-2 here); see "## opcodes" in RESULTS.md.

Variants match ``overhead.py`` (tiny GPT-2, ``interlace.NNsight``, 1 x 32 token ids) and
``generation.py`` (``LanguageModel``, 16 new tokens, logits saved each step).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

import interlace
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
    model = interlace.NNsight(module)
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    blocks = list(module.transformer.h)

    def plain() -> Any:
        return module(ids)

    def hooks_save_blocks() -> Any:
        saved: list[Any] = []
        handles = [b.register_forward_hook(lambda m, a, o: saved.append(o)) for b in blocks]
        module(ids)
        for h in handles:
            h.remove()
        return saved

    def interlace_pass() -> Any:
        with model.trace(ids):
            pass

    def interlace_one_statement() -> Any:
        with model.trace(ids):
            logits = model.lm_head.output.save()
        return logits

    def interlace_save_blocks() -> Any:
        with model.trace(ids):
            outs = interlace.save([b.output for b in model.transformer.h])
        return outs

    return {
        "plain forward": plain,
        "hooks: save blocks": hooks_save_blocks,
        "interlace: pass": interlace_pass,
        "interlace: one statement": interlace_one_statement,
        "interlace: save blocks": interlace_save_blocks,
    }


def _generation_variants(models_dir: Path, tokens: int = 16) -> dict[str, Callable[[], Any]]:
    model = interlace.LanguageModel(str(demo.build_tiny_gpt2(models_dir / "tiny-gpt2")), dispatch=True)
    module = model._module
    ids = torch.randint(1, module.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pad = model.tokenizer.pad_token_id

    def hf() -> Any:
        return module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=pad)

    def hf_signature_cached() -> Any:
        # generate() calls inspect.signature(model.forward) several times per call; Interlace's
        # root wrapper carries the signature, so this is the like-for-like baseline.
        inner = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return inner(*args, **kwargs)

        forward.__signature__ = inspect.signature(inner)  # type: ignore[attr-defined]
        module.__dict__["forward"] = forward
        try:
            return hf()
        finally:
            del module.__dict__["forward"]

    def traced() -> Any:
        with model.generate(ids, max_new_tokens=tokens, do_sample=False) as tracer:
            logits = list().save()
            for _ in tracer.iter[:]:
                logits.append(model.lm_head.output)
        return logits

    return {
        "hf generate (16 tokens)": hf,
        "hf generate, signature cached": hf_signature_cached,
        "interlace generate (16 tokens)": traced,
    }


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
    models_dir = Path(os.environ.get("INTERLACE_TEST_MODELS_DIR") or tempfile.mkdtemp(prefix="interlace-bench-"))
    with torch.no_grad():
        _report("tiny GPT-2, 1 x 32 token ids", _trace_variants(models_dir), "plain forward")
        _report("tiny GPT-2 generation", _generation_variants(models_dir), "hf generate (16 tokens)")


if __name__ == "__main__":
    main()
