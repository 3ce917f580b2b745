"""Independent truths for the feature tests: plain PyTorch and Hugging Face on the raw module.

Nothing here goes through Interlace's tracing: values come from raw forward hooks on the
wrapped `torch.nn.Module`, `torch.autograd.grad`, and Hugging Face's own `generate`. The
feature tests compare what a trace returns (in every mode) with these.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

import interlace

# Two prompts of different lengths (12 and 14 tokens with the tiny GPT-2's tokenizer), so a
# batch of both is left-padded and swapped or misrouted rows show.
PROMPT_A = "The Eiffel Tower is in the city of"
PROMPT_B = "Madison Square Garden is located in"


def encode(model: interlace.LanguageModel, prompts: str | list[str]) -> dict[str, torch.Tensor]:
    """What a plain Hugging Face user passes for `prompts` (left-padded as LanguageModel pads)."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    return dict(model.tokenizer(texts, return_tensors="pt", padding=True))


def forward_inputs(model: interlace.LanguageModel, prompts: str | list[str]) -> dict[str, torch.Tensor]:
    """`encode` plus the position ids Hugging Face's `generate` computes for left padding
    (each row's real tokens count from 0), so a padded row equals that prompt alone."""
    enc = encode(model, prompts)
    enc["position_ids"] = (enc["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return enc


def raw_forward(model: interlace.LanguageModel, prompts: str | list[str],
                *pairs: tuple[torch.nn.Module, Callable[..., Any]]) -> torch.Tensor:
    """The plain module's logits for `prompts`, with raw forward hooks in place."""
    with hooks(*pairs):
        return model._module(**forward_inputs(model, prompts)).logits.detach()


def n_tokens(model: interlace.LanguageModel, prompt: str) -> int:
    return len(model.tokenizer(prompt)["input_ids"])


def steer(width: int, seed: int = 0) -> torch.Tensor:
    """A fixed random direction: an edit that differs per feature, unlike zeroing."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(width, generator=gen)


@contextmanager
def hooks(*pairs: tuple[torch.nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Raw PyTorch forward hooks for the duration of the block."""
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def on_call(k: int | None, edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """A forward hook that replaces the output by `edit(output)` on call number `k` only
    (every call when `k` is None); call 0 is the prompt's forward in generation."""
    calls = [0]

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        index = calls[0]
        calls[0] += 1
        if k is None or index == k:
            return edit(output)
        return None

    return hook


def hf_generate(model: interlace.LanguageModel, prompts: str | list[str], n: int,
                *edits: tuple[torch.nn.Module, Callable[..., Any]], **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hugging Face `generate` (greedy unless told) with raw hooks: the token ids and each
    step's last-position logits (before any logits processor, as `lm_head` gives them)."""
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", model.tokenizer.pad_token_id)
    with hooks(*edits), torch.no_grad():
        out = model._module.generate(**encode(model, prompts), max_new_tokens=n, output_logits=True,
                                     return_dict_in_generate=True, **kwargs)
    return out.sequences, list(out.logits)
