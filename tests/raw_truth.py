"""The independent truth for the seeds' and workflows' tests: a transformers model loaded on
its own (never wrapped by Interlace), run under raw PyTorch forward hooks."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["RawLM"]

Hook = Callable[[torch.nn.Module, Any, Any], Any]


class RawLM:
    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(prompt, return_tensors="pt"))

    def n_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    @contextmanager
    def hooks(self, hooks: dict[str, Hook]) -> Iterator[None]:
        """Forward hooks by module name (a hook's non-None return replaces the output)."""
        handles = [self.model.get_submodule(name).register_forward_hook(fn) for name, fn in hooks.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(self, prompt: str, capture: tuple[str, ...] = (), edits: dict[str, Hook] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits of `prompt` and the outputs of the `capture` modules (after `edits`)."""
        seen: dict[str, Any] = {}
        hooks = dict(edits or {})
        for name in capture:
            edit = hooks.get(name)

            def record(module: Any, args: Any, out: Any, name: str = name, edit: Any = edit) -> Any:
                if edit is not None:
                    replaced = edit(module, args, out)
                    out = out if replaced is None else replaced
                seen[name] = out.clone() if isinstance(out, torch.Tensor) else out
                return out

            hooks[name] = record
        with self.hooks(hooks):
            logits = self.model(**self.encode(prompt)).logits
        return logits, seen
