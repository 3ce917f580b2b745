"""Generation with interventions: per-step access, the generator and its streamer.

Step k of a module is its k-th call during `generate` (one forward per new token), so
`tracer.iter[1:3]` addresses the forwards that produce tokens 1 and 2. `model.generator`
is a pass-through module called once with the final ids; `model.generator.streamer` is
called once per new token (the prompt is not streamed), so inside `iter[k]` its output is
the token chosen at step k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import TracingError
from ..tracing.interleaver import Interleaver
from ..tracing.tracer import InterleavingTracer

if TYPE_CHECKING:
    from .language_model import LanguageModel

__all__ = ["Generator", "Streamer", "GenerateTracer", "run_generate"]


class Streamer(torch.nn.Module):
    """Called with each new token (ids of shape [batch, 1]); returns it unchanged."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class Generator(torch.nn.Module):
    """Called with the generated ids once generation ends; returns them unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.streamer = Streamer()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


class _StreamerAdapter:
    """What Hugging Face's `generate(streamer=...)` calls; forwards tokens to the Streamer module.

    While no body waits on the streamer module (or watches it, or has a torch hook on it), a
    token only advances the module's call counters, as its wrapper would: calling it through
    `nn.Module.__call__` for every token would cost a few percent of a small model's
    generation.
    """

    def __init__(self, module: Streamer, user_streamer: Any, interleaver: Interleaver, idx: int) -> None:
        self.module = module
        self.user_streamer = user_streamer
        self.prompt_seen = False
        self.interleaver = interleaver
        self.idx = idx

    def put(self, value: torch.Tensor) -> None:
        if self.user_streamer is not None:
            self.user_streamer.put(value)
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        il, idx, module = self.interleaver, self.idx, self.module
        if (
            idx in il.input_waiters
            or idx in il.output_waiters
            or idx in il.observers
            or il.recording
            or module._forward_hooks
            or module._forward_pre_hooks
        ):
            module(value.reshape(-1, 1) if value.dim() == 1 else value)
        else:
            il.started[idx] += 1
            il.finished[idx] += 1

    def end(self) -> None:
        if self.user_streamer is not None:
            self.user_streamer.end()


def run_generate(model: "LanguageModel", kwargs: dict[str, Any], interleaver: Interleaver) -> Any:
    kwargs = dict(kwargs)
    kwargs.pop("position_ids", None)  # generate derives positions from the attention mask
    generator: Generator = model.__dict__["_generator"]
    streamer = generator.streamer
    idx = model._module_index(streamer)
    needed = interleaver.needed  # an inline body: every module it can read, known already
    if needed is None or idx in needed or streamer._forward_hooks or streamer._forward_pre_hooks:
        kwargs["streamer"] = _StreamerAdapter(streamer, kwargs.get("streamer"), interleaver, idx)
    # (else nothing can see the streamer module: `generate` gets the user's streamer, if any)
    if "pad_token_id" not in kwargs:
        tok = model.__dict__["tokenizer"]
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is not None:
            kwargs["pad_token_id"] = pad
    output = model._module.generate(**kwargs)
    sequences = output.sequences if hasattr(output, "sequences") else output
    generator(sequences)
    return output


def max_new_tokens(model: "LanguageModel", kwargs: dict[str, Any]) -> int:
    if "max_new_tokens" in kwargs:
        return int(kwargs["max_new_tokens"])
    config = getattr(model._module, "generation_config", None)
    value = getattr(config, "max_new_tokens", None)
    if value is None:
        raise TracingError(
            "Pass `max_new_tokens=` to model.generate(...): Interlace needs to know how many steps "
            "`tracer.iter[:]` and `tracer.all()` cover. (`max_length` counts the prompt too and "
            "is not accepted.)"
        )
    return int(value)


class GenerateTracer(InterleavingTracer):
    """`with model.generate(prompt, max_new_tokens=N) as tracer:`."""

    kind = "generate"

    def _describe(self) -> str:
        return "model.generate(...)"

    def _steps(self) -> int | None:
        return max_new_tokens(self.model, self.kwargs)  # type: ignore[arg-type]

