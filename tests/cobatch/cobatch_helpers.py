"""Helpers for the co-batching acceptance tests: payloads the client builds, and the truth.

The truth is a transformers model loaded on its own (never wrapped by Interlace) run under
raw PyTorch hooks, one job at a time, each edit done in the hook: what a job gets alone.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import torch

from interlace.backends.outbound import encode_for_remote
from interlace.contract.policy import Policy
from interlace.contract.result import decode_result
from interlace.execution.cobatch import JobOutcome

__all__ = ["Encoder", "RawTruth", "TOL", "ids_of", "values_of"]

#: Values of a shared forward against a batch-of-1 forward of another model copy: equal up to
#: float rounding (a matmul over 4 rows may sum in another order than over 1).
TOL = {"rtol": 1e-5, "atol": 1e-5}

Hook = Callable[..., Any]


def ids_of(seed: int, n: int = 8) -> list[int]:
    """`n` token ids of the tiny models' vocabulary (512), different for each seed, so
    neighbours in a batch never hold the same values."""
    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(n)]


class Encoder:
    """A backend that only encodes: the client's own request encoder (what the HTTP client and
    the simulation send), without running the job here. `payloads` collects each trace's bytes."""

    def __init__(self, key: str, policy: Policy) -> None:
        self.key = key
        self.policy = policy
        self.payloads: list[bytes] = []

    def __call__(self, trace: Any) -> dict[str, Any]:
        payload, _ = encode_for_remote(trace, self.key, self.policy, strict_remote=False)
        self.payloads.append(payload)
        return {}

    @property
    def last(self) -> bytes:
        return self.payloads[-1]


def values_of(outcome: JobOutcome) -> dict[str, Any]:
    """The saved values of a job that completed (its failure text otherwise, as the error)."""
    assert outcome.failure is None, outcome.failure.traceback_text
    assert outcome.result is not None
    return decode_result(outcome.result)


class RawTruth:
    """The tiny model loaded by transformers alone; `run` does one job's forward under hooks."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path)).eval()

    @torch.no_grad()
    def run(self, ids: list[int] | list[list[int]], *, outputs: tuple[str, ...] = (), inputs: tuple[str, ...] = (),
            edit_out: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
            edit_in: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> dict[str, Any]:
        """Forward `ids` (one row, or equal-length rows) alone. `edit_in` / `edit_out` map a
        module name to a function of its first input / its output, whose result replaces it;
        `inputs` / `outputs` name the modules whose (edited) first input / output to keep.
        Returns {"logits", "cache", "in:<name>", "out:<name>"}."""
        rows = ids if ids and isinstance(ids[0], list) else [ids]
        seen: dict[str, Any] = {}
        handles = []
        for name in sorted(set(inputs) | set((edit_in or {}))):
            handles.append(self.model.get_submodule(name).register_forward_pre_hook(
                self._pre_hook(name, (edit_in or {}).get(name), seen), with_kwargs=True))
        for name in sorted(set(outputs) | set((edit_out or {}))):
            handles.append(self.model.get_submodule(name).register_forward_hook(
                self._hook(name, (edit_out or {}).get(name), seen)))
        try:
            out = self.model(input_ids=torch.tensor(rows, dtype=torch.long), use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        seen["logits"] = out.logits
        seen["cache"] = out.past_key_values
        return seen

    @staticmethod
    def _pre_hook(name: str, edit: Callable[[torch.Tensor], torch.Tensor] | None, seen: dict[str, Any]) -> Hook:
        def hook(module: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                first = args[0]
            else:
                key = next(iter(kwargs))
                first = kwargs[key]
            if edit is not None:
                first = edit(first.clone())
                if args:
                    args = (first, *args[1:])
                else:
                    kwargs = {**kwargs, key: first}
            seen[f"in:{name}"] = first.clone()
            return args, kwargs

        return hook

    @staticmethod
    def _hook(name: str, edit: Callable[[torch.Tensor], torch.Tensor] | None, seen: dict[str, Any]) -> Hook:
        def hook(module: Any, args: Any, out: Any) -> Any:
            if edit is not None:
                out = edit(out.clone())
            seen[f"out:{name}"] = out.clone()
            return out

        return hook

