"""Helpers shared by the engine tests: raw PyTorch hooks to compare against, and layer access."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

import interlace


@contextmanager
def hooks(*pairs: tuple[torch.nn.Module, Callable[..., Any]], pre: bool = False, with_kwargs: bool = False) -> Iterator[None]:
    """Register raw PyTorch forward (or pre-forward) hooks for the duration of the block."""
    handles = []
    for module, fn in pairs:
        if pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        else:
            handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def line_of(path: str, marker: str) -> int:
    """Line number in the file `path` of the line containing `marker` (a test's own source;
    lines that call this, and so name the marker too, are skipped)."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if marker in line and "line_of(" not in line:
                return i
    raise AssertionError(f"{marker!r} is not in {path}")


class Twice(torch.nn.Module):
    """One module called twice in a forward (a shared module: it needs full wrapping)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


class CallCounter:
    """A raw forward hook that counts calls (to see which modules ran)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, out: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        self.handle.remove()


def hidden(value: Any) -> torch.Tensor:
    """A decoder layer's hidden states whether the layer returns a tensor or a tuple."""
    return value[0] if isinstance(value, tuple) else value


def layers(model: interlace.LanguageModel) -> Any:
    """The decoder layer list envoy of a GPT-2 or Llama LanguageModel."""
    inner = model._module
    return model.transformer.h if hasattr(inner, "transformer") else model.model.layers


def raw_layers(model: interlace.LanguageModel) -> torch.nn.ModuleList:
    inner = model._module
    return inner.transformer.h if hasattr(inner, "transformer") else inner.model.layers


def encode(model: interlace.LanguageModel, text: str | list[str]) -> dict[str, torch.Tensor]:
    """What a plain Hugging Face user would pass for `text` (no padding for one prompt)."""
    tok = model.tokenizer
    return dict(tok(text, return_tensors="pt"))
