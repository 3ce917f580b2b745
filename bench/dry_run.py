"""How long `remote='local', dry_run=True` takes on a GPT-2-small-shaped model without weights.

Target (issue 17): a dry run of a GPT-2-small-shaped meta model in under 2 s. The model is
GPT-2 small's architecture built from its config alone (12 layers x 768, vocabulary 50257;
the tiny demo model's tokenizer), so nothing is ever loaded. Printed:

- building the model (`LanguageModel(path)`: config, meta module, tokenizer), once;
- the first dry run in the process (it pays for torch's fake-tensor machinery), and the median
  of the later ones, for a trace that saves one block's output and the logits;
- a dry `generate` of 3 tokens;
- for scale, a real `remote='local'` run of the tiny GPT-2 (4 x 128, weights loaded), and the
  ratio of the dry run's median to it (the fixed cost of the path against fake compute).

Run by hand: `.venv/bin/python bench/dry_run.py [--runs 20] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import interlace
from interlace.backends.dry_run import DryRunWarning
from interlace.models.demo import build_tiny_gpt2

PROMPT = "The Eiffel Tower is in the city of"


def small_dir(root: Path, tiny: Path) -> Path:
    from transformers import GPT2Config

    path = root / "gpt2-small-meta"
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, path / name)
    GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not weights: a dry run must never read this")
    return path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", DryRunWarning)
    root = Path(tempfile.gettempdir()) / "interlace-bench"
    tiny_path = build_tiny_gpt2(root / "tiny-gpt2")
    path = small_dir(root, tiny_path)

    start = time.perf_counter()
    small = interlace.LanguageModel(str(path))
    build = time.perf_counter() - start
    tiny = interlace.LanguageModel(str(tiny_path), dispatch=True)

    def dry() -> None:
        with small.trace(PROMPT, remote="local", dry_run=True):
            hidden = small.transformer.h[6].output.save()  # noqa: F841
            logits = small.lm_head.output.save()  # noqa: F841

    def dry_generate() -> None:
        with small.generate(PROMPT, max_new_tokens=3, remote="local", dry_run=True):
            tokens = small.generator.output.save()  # noqa: F841

    def real_tiny() -> None:
        with tiny.trace(PROMPT, remote="local"):
            hidden = tiny.transformer.h[2].output.save()  # noqa: F841
            logits = tiny.lm_head.output.save()  # noqa: F841

    first = timed(dry)
    real_tiny()  # warm
    dry_times, real_times = [], []
    for _ in range(args.runs):
        dry_times.append(timed(dry))
        real_times.append(timed(real_tiny))
    gen = statistics.median(timed(dry_generate) for _ in range(max(3, args.runs // 5)))
    assert not small.dispatched and all(p.is_meta for p in small._module.parameters())
    med, real = statistics.median(dry_times), statistics.median(real_times)
    print(f"build GPT-2-small-shaped meta model   {build:7.3f} s (once)")
    print(f"first dry run in the process          {first:7.3f} s (target < 2 s)")
    print(f"dry run, median of {args.runs:<3}               {med:7.3f} s (target < 2 s)")
    print(f"dry generate, 3 tokens, median        {gen:7.3f} s")
    print(f"real remote='local', tiny GPT-2       {real * 1e3:7.1f} ms")
    print(f"dry run (GPT-2 small) / real (tiny)   {med / real:7.1f} x")


if __name__ == "__main__":
    main()
