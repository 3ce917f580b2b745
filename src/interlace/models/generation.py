"""Generation with interventions: per-step access, the generator and its streamer.

Step k of a module is its k-th call during `generate` (one forward per new token), so
`tracer.iter[1:3]` addresses the forwards that produce tokens 1 and 2. `model.generator`
is a pass-through module called once with the final ids; `model.generator.streamer` is
called once per new token (the prompt is not streamed), so inside `iter[k]` its output is
the token chosen at step k.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..errors import TracingError
from ..tracing.interleaver import Interleaver
from ..tracing.tracer import InterleavingTracer

__all__ = ["GenerationHost", "Generator", "Streamer", "GenerateTracer", "run_generate", "generation_steps"]


class GenerationHost(Protocol):
    """What generation needs of the model it runs on; `LanguageModel` is the one there is.

    Named here so that this module depends only on the shape, not on `language_model.py`,
    which imports this one. Beside these, `run_generate` reads two entries of the model's
    `__dict__` (as the engine does, past `Envoy.__getattr__`): `"_generator"` (the
    `Generator` the model mounted) and `"tokenizer"` (may be None).
    """

    _module: torch.nn.Module

    def _module_index(self, module: torch.nn.Module) -> int: ...


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


def run_generate(model: GenerationHost, kwargs: dict[str, Any], interleaver: Interleaver) -> Any:
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


def generation_steps(model: GenerationHost, kwargs: dict[str, Any], prompt_length: int | None) -> int:
    """How many forwards `generate` makes at most, decided as Hugging Face decides it.

    `max_new_tokens` (the call's, else the generation config's) wins; else the config's
    `max_length` counts the prompt too; else transformers' default of 20 new tokens, capped
    at the model's `max_position_embeddings`. `prompt_length` (the batched prompt's width)
    is needed only in the last two cases. Generation may still end sooner, at EOS.
    """
    from transformers import GenerationConfig

    config = kwargs.get("generation_config") or getattr(model._module, "generation_config", None) or GenerationConfig()
    value = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if value is not None:
        return int(value)
    if prompt_length is None:
        raise TracingError("internal: the prompt length is needed to count generation steps")
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    default_length = (defaults().get("max_length") if defaults else None) or 20
    max_length = kwargs.get("max_length", getattr(config, "max_length", None))
    # transformers 5 leaves `max_length` unset by default; 4.x sets it to 20 and treats that
    # value as "unset" too. Either way "unset" means 20 *new* tokens.
    unset = max_length is None or (GenerationConfig().max_length is not None and max_length == GenerationConfig().max_length)
    if not unset:
        return max(int(max_length) - prompt_length, 0)
    total = default_length + prompt_length
    positions = getattr(model._module.config, "max_position_embeddings", None)
    if positions is not None:
        total = min(total, int(positions))
    return max(total - prompt_length, 0)


class GenerateTracer(InterleavingTracer):
    """`with model.generate(prompt, max_new_tokens=N) as tracer:` (N defaults as in Hugging Face)."""

    kind = "generate"
    _limit: int | None = None

    def _describe(self) -> str:
        return "model.generate(...)"

    def _run(self, mediators: list, args: tuple, kwargs: dict, batch_size: int) -> None:
        # The batched prompt (padded to the longest invoke) is what `max_length` counts.
        self._limit = generation_steps(self.model, {**self.kwargs, **kwargs}, _prompt_length(kwargs))  # type: ignore[arg-type]
        super()._run(mediators, args, kwargs, batch_size)

    def _steps(self) -> int | None:
        if self._limit is None:
            # Asked before the run (planning a body that has the trace's own input): that input
            # alone is the batch.
            length = None
            model = self.model
            if model._has_input(self.args, self.kwargs):  # type: ignore[union-attr]
                _, kwargs, _ = model._batch([model._prepare_input(*self.args, **self.kwargs)])  # type: ignore[union-attr]
                length = _prompt_length(kwargs)
            self._limit = generation_steps(model, self.kwargs, length)  # type: ignore[arg-type]
        return self._limit


def _prompt_length(kwargs: dict[str, Any]) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    return None
