"""`LanguageModel`: Hugging Face causal LMs with tokenization, batching and generation."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import TracingError
from ..execution.integrity import BUILD_LOCK
from ..tracing.interleaver import Interleaver
from ..tracing.with_detection import enters_with
from .generation import GenerateTracer, Generator, run_generate
from ..tracing.envoy import Envoy
from .nnsight import CALLS_WITHOUT_INTERLEAVER, CLASS_DEFAULT, NNsight, apply_without_weights

__all__ = ["LanguageModel"]

#: Keyword arguments meant for the tokenizer. Those that can mean nothing else
#: (`ROUTED_TOKENIZER_OPTIONS`) go to the tokenizer with a text input, as in nnsight; the rest
#: are an error unless given in `tokenizer_kwargs={...}`: nnsight routes `max_length` to the
#: tokenizer silently, so `generate(max_length=6)` never caps generation there.
TOKENIZER_OPTIONS = frozenset(
    {
        "add_special_tokens", "padding", "truncation", "max_length", "stride", "is_split_into_words",
        "pad_to_multiple_of", "padding_side", "return_tensors", "return_token_type_ids",
        "return_attention_mask", "return_overflowing_tokens", "return_special_tokens_mask",
        "return_offsets_mapping", "return_length", "text_pair", "text_target",
    }
)


ROUTED_TOKENIZER_OPTIONS = frozenset(
    {
        "add_special_tokens", "padding", "truncation", "stride", "is_split_into_words",
        "pad_to_multiple_of", "padding_side", "text_pair", "text_target",
    }
)


class LanguageModel(NNsight):
    """A Hugging Face causal language model, by hub id, local path or loaded module.

    The architecture is built on the meta device (no weights, no memory) until the first local
    run, or at once with `dispatch=True`. `load_kwargs` go to `from_pretrained`
    (`torch_dtype=`, `device_map=`, `revision=`, ...). Options for the tokenizer go in
    `tokenizer_kwargs={...}` on `trace`/`generate`.

    `LanguageModel(model_key="org/name")` builds a model hosted on the server (CONFIG.API.HOST,
    or `host=`) from its config and tokenizer, without weights: it traces with `remote=True`
    only (see `hosted.py`). Given with a model, `model_key=` names the server's copy of it.
    """

    def __init__(
        self,
        model: str | torch.nn.Module | None = None,
        *,
        tokenizer: Any = None,
        dispatch: bool = False,
        rename: dict[str, str | list[str]] | None = None,
        model_key: str | None = None,
        host: str | None = None,
        api_key: str | None = None,
        envoys: Any = CLASS_DEFAULT,
        **load_kwargs: Any,
    ) -> None:
        with BUILD_LOCK:  # transformers' first (lazy) import fails in a thread racing another
            from transformers import AutoConfig, AutoModelForCausalLM

        from .demo import DEMO_MODEL_KEY, build_demo_model

        if model is None:
            if model_key is None:
                raise TypeError(
                    "LanguageModel needs a hub id, a local path or a torch.nn.Module, or the key of a "
                    "model hosted on a server: `LanguageModel(\"org/name\")` or "
                    "`LanguageModel(model_key=\"org/name\")`."
                )
            self._init_hosted(model_key, tokenizer, dispatch, rename, host, api_key, load_kwargs, envoys)
            return
        key = model_key or (model if isinstance(model, str) else None)
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if model == DEMO_MODEL_KEY:
            # The built-in demo model: built offline and cached, so the same key works here
            # and on an `interlace serve` that hosts it by default.
            model = str(build_demo_model(_cache_dir()))
        if isinstance(model, torch.nn.Module):
            module = model
            repo_id = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
            dispatched = True
        elif isinstance(model, str):
            repo_id = model
            if dispatch:
                module = self._load(repo_id, load_kwargs)
                dispatched = True
            else:
                config_kwargs = {k: v for k, v in load_kwargs.items() if k in ("revision", "trust_remote_code", "cache_dir", "token")}
                config = AutoConfig.from_pretrained(repo_id, **config_kwargs)
                with BUILD_LOCK, torch.device("meta"):  # (see `_load`)
                    module = AutoModelForCausalLM.from_config(config, trust_remote_code=load_kwargs.get("trust_remote_code", False))
                dispatched = False
        else:
            raise TypeError(
                f"LanguageModel takes a hub id, a local path or a torch.nn.Module, got {type(model).__name__}."
            )
        super().__init__(module, rename=rename, model_key=key or repo_id, host=host, api_key=api_key, envoys=envoys)
        self._init_fields(repo_id, load_kwargs, dispatched,
                          tokenizer if tokenizer is not None else self._load_tokenizer(repo_id, load_kwargs, module))

    def _init_hosted(self, model_key: str, tokenizer: Any, dispatch: bool, rename: Any,
                     host: str | None, api_key: str | None, load_kwargs: dict[str, Any],
                     envoys: Any = CLASS_DEFAULT) -> None:
        """`LanguageModel(model_key=...)`: module tree, config and tokenizer from the server."""
        from .hosted import load_hosted, no_local_weights_error

        if dispatch:
            raise no_local_weights_error(model_key, False)
        if load_kwargs:
            raise TypeError(
                f"{', '.join(sorted(load_kwargs))}: loading options do not apply to a model known only "
                f"by its server key (the server loaded it). Use `LanguageModel(model_key={model_key!r})`."
            )
        hosted = load_hosted(model_key, host=host, api_key=api_key)
        NNsight.__init__(self, hosted.module, rename=rename, model_key=model_key, host=hosted.host, api_key=api_key,
                         envoys=envoys)
        self.__dict__["_hosted"] = hosted
        self._init_fields(model_key, {}, False, tokenizer if tokenizer is not None else hosted.tokenizer)

    def _init_fields(self, repo_id: str, load_kwargs: dict[str, Any], dispatched: bool, tokenizer: Any) -> None:
        d = self.__dict__
        d["repo_id"] = repo_id
        d["_load_kwargs"] = dict(load_kwargs)
        d["_dispatched"] = dispatched
        # Module methods called before the weights are loaded, replayed on them (`dispatch`).
        d["_pending_module_calls"] = []
        d["tokenizer"] = tokenizer
        if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        d["_position_ids_ok"] = None
        self._attach_generator()

    # -- loading ------------------------------------------------------------------------------

    @staticmethod
    def _load(repo_id: str, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        # One build at a time in this process: transformers patches classes and process state
        # while it builds, and two builds in threads (several models traced from threads, or
        # hosted by one server process) leave `tie_weights` a no-op for good (`BUILD_LOCK`).
        with BUILD_LOCK:
            module = AutoModelForCausalLM.from_pretrained(repo_id, **load_kwargs)
        module.eval()
        return module

    @staticmethod
    def _load_tokenizer(repo_id: str, load_kwargs: dict[str, Any], module: torch.nn.Module) -> Any:
        from transformers import AutoTokenizer

        try:
            kwargs = {k: v for k, v in load_kwargs.items() if k in ("revision", "trust_remote_code", "cache_dir", "token")}
            return AutoTokenizer.from_pretrained(repo_id, padding_side="left", **kwargs)
        except (OSError, ValueError, TypeError):
            if isinstance(module, torch.nn.Module) and not isinstance(repo_id, str):
                return None
            return None

    @property
    def dispatched(self) -> bool:
        return self.__dict__["_dispatched"]

    def dispatch(self) -> "LanguageModel":
        """Load the real weights now (done automatically before the first local run)."""
        d = self.__dict__
        if not d["_dispatched"]:
            if d["_hosted"] is not None:
                from .hosted import no_local_weights_error

                raise no_local_weights_error(d["_hosted"].key, False)
            module = self._load(d["repo_id"], d["_load_kwargs"])
            # `model.to(...)`, `.train()`, ... called before the weights existed, in order.
            for name, args, kwargs in d["_pending_module_calls"]:
                result = getattr(module, name)(*args, **kwargs)
                if isinstance(result, torch.nn.Module):
                    module = result
            d["_pending_module_calls"] = []
            self._replace_module(module)
            d["_dispatched"] = True
            d["_position_ids_ok"] = None
            self._attach_generator()
        return self

    def _apply_module_method(self, name: str, args: tuple, kwargs: dict[str, Any]) -> "LanguageModel":
        d = self.__dict__
        if d["_dispatched"]:
            return super()._apply_module_method(name, args, kwargs)  # type: ignore[return-value]
        # No weights yet (or none here at all): the meta module takes what it can now (dtype,
        # mode), and loaded weights get the whole call, so `LanguageModel(id).to("cuda")` stays lazy.
        apply_without_weights(d["_module"], name, args, kwargs)
        if d["_hosted"] is None:
            d["_pending_module_calls"].append((name, args, kwargs))
        return self

    def _before_run(self) -> None:
        self.dispatch()

    # -- inputs -------------------------------------------------------------------------------

    def _tokenizer(self) -> Any:
        tok = self.__dict__["tokenizer"]
        if tok is None:
            raise TracingError(
                "This LanguageModel has no tokenizer, so text inputs cannot be used. Pass one: "
                "`LanguageModel(module, tokenizer=AutoTokenizer.from_pretrained(path))`, or pass "
                "token ids (`model.trace(torch.tensor([[1, 2, 3]]))`)."
            )
        return tok

    def _prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        """Tokenize one invoke's input. Returns ((), model kwargs with `rows`, batch size).

        Rows are kept unpadded (lists of ids) so several invokes can be padded together.
        """
        tokenizer_kwargs = dict(kwargs.pop("tokenizer_kwargs", None) or {})
        tokenizer_kwargs.update(_routed_tokenizer_options(kwargs))
        _reject_tokenizer_options(kwargs)
        if not inputs and "input_ids" in kwargs:
            inputs = (kwargs.pop("input_ids"),)
        if len(inputs) != 1:
            raise TracingError(
                f"Expected one input (text, a list of texts, token ids or a tokenizer output), got {len(inputs)}. "
                "For several inputs use invokes: `with tracer.invoke(text):`."
            )
        value = inputs[0]
        mask = kwargs.pop("attention_mask", None)
        labels = kwargs.get("labels")
        if isinstance(labels, str) or (isinstance(labels, list) and labels and all(isinstance(v, str) for v in labels)):
            # Text labels are tokenized like the input (as in nnsight); -100 pads, as HF ignores it.
            label_rows, _ = self._rows(labels, None, tokenizer_kwargs)
            width = max(len(r) for r in label_rows)
            kwargs["labels"] = torch.tensor([[-100] * (width - len(r)) + r for r in label_rows], dtype=torch.long)
        if isinstance(value, torch.Tensor) and mask is None and 0 < value.dim() <= 2 and not value.is_floating_point():
            # Token ids without a mask: nothing to strip. Keep the tensor; rows (lists of ids,
            # for padding several invokes together) are only made if `_batch` needs them.
            ids = value if value.dim() == 2 else value.reshape(1, -1)
            if ids.shape[0] == 0 or ids.shape[1] == 0:
                raise TracingError("The input produced zero tokens. Pass a non-empty prompt or non-empty `input_ids`.")
            kwargs["__rows__"] = ids
            return (), kwargs, ids.shape[0]
        rows, masks = self._rows(value, mask, tokenizer_kwargs)
        if not rows or any(len(r) == 0 for r in rows):
            raise TracingError("The input produced zero tokens. Pass a non-empty prompt or non-empty `input_ids`.")
        kwargs["__rows__"] = (rows, masks)
        return (), kwargs, len(rows)

    def _has_input(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        return bool(args) or "input_ids" in kwargs

    def _trace_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        _reject_tokenizer_options(kwargs)
        if "tokenizer_kwargs" in kwargs:
            raise TracingError(
                "tokenizer_kwargs apply to one input; with invokes pass them to each invoke: "
                "`with tracer.invoke(text, tokenizer_kwargs={...}):`."
            )
        return dict(kwargs)

    def _rows(self, value: Any, mask: Any, tokenizer_kwargs: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            encoded = self._tokenizer()(value if isinstance(value, list) else [value], **tokenizer_kwargs)
            ids = [list(r) for r in encoded["input_ids"]]
            masks = [list(r) for r in encoded["attention_mask"]] if "attention_mask" in encoded else [[1] * len(r) for r in ids]
            return _strip_padding(ids, masks)
        if isinstance(value, Mapping):
            if "input_ids" not in value:
                raise TracingError("A dict input must hold `input_ids` (and optionally `attention_mask`).")
            return self._rows(value["input_ids"], value.get("attention_mask", mask), tokenizer_kwargs)
        if isinstance(value, torch.Tensor):
            ids_t = value if value.dim() == 2 else value.reshape(1, -1)
            ids = ids_t.tolist()
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            ids = [list(value)]
        elif isinstance(value, list) and value and all(isinstance(v, (list, tuple)) for v in value):
            ids = [list(v) for v in value]
        else:
            raise TracingError(
                f"Unsupported input of type {type(value).__name__}. Pass a string, a list of strings, "
                "token ids (list[int], list[list[int]] or a tensor) or a dict with `input_ids`."
            )
        if mask is None:
            masks = [[1] * len(r) for r in ids]
        else:
            mask_t = mask if isinstance(mask, torch.Tensor) else torch.tensor(mask)
            masks = mask_t.reshape(len(ids), -1).tolist()
        return _strip_padding(ids, masks)

    def _batch(self, prepared: list[tuple[tuple, dict, int]]) -> tuple[tuple, dict, int]:
        if len(prepared) == 1:
            _, kwargs, size = prepared[0]
            ids = kwargs["__rows__"]
            if isinstance(ids, torch.Tensor):  # one unpadded id tensor: the model gets a copy of it
                input_ids = ids.to(device=self._device(), dtype=torch.long, copy=True)
                extra = {k: v for k, v in kwargs.items() if k != "__rows__"}
                return (), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}, size
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        extra = {}
        for _, kwargs, _ in prepared:
            held = kwargs["__rows__"]
            r, m = _ones_mask(held.tolist()) if isinstance(held, torch.Tensor) else held
            rows += r
            masks += m
            for key, value in kwargs.items():
                if key != "__rows__":
                    if key in extra and not _same(extra[key], value):
                        raise TracingError(
                            f"Invokes pass different values for `{key}`; model options apply to the "
                            "whole batch, so pass them to `model.trace(...)` instead."
                        )
                    extra[key] = value
        tok = self.__dict__["tokenizer"]
        pad_id = getattr(tok, "pad_token_id", None) if tok is not None else None
        pad_id = 0 if pad_id is None else pad_id
        width = max(len(r) for r in rows)
        left = getattr(tok, "padding_side", "left") != "right"
        ids_out, mask_out = [], []
        for r, m in zip(rows, masks):
            pad = width - len(r)
            ids_out.append(([pad_id] * pad + r) if left else (r + [pad_id] * pad))
            mask_out.append(([0] * pad + m) if left else (m + [0] * pad))
        input_ids = torch.tensor(ids_out, dtype=torch.long)
        attention_mask = torch.tensor(mask_out, dtype=torch.long)
        device = self._device()
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), **extra}
        padded = any(len(r) != width for r in rows)
        if padded and "position_ids" not in kwargs and self._accepts_position_ids():
            # Left padding must not shift positions, or a padded row would differ from the same
            # prompt run alone.
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0).to(device)
        return (), kwargs, len(rows)

    def _accepts_position_ids(self) -> bool:
        d = self.__dict__
        if d["_position_ids_ok"] is None:
            try:
                d["_position_ids_ok"] = "position_ids" in inspect.signature(self._module.forward).parameters
            except (TypeError, ValueError):
                d["_position_ids_ok"] = False
        return d["_position_ids_ok"]

    def _device(self) -> torch.device:
        """Where the inputs go: the device of the model's first parameter.

        The parameter is remembered with its owner, as `parameters()` walks every module
        (hundreds of bytecode instructions per trace); `.to()` moves it in place, and a
        parameter replaced since is noticed by the identity check.
        """
        module = self._module
        held = self.__dict__.get("_first_param")
        if held is not None and held[0] is module and held[1]._parameters.get(held[2]) is held[3]:
            return held[3].device
        for name, p in module.named_parameters():
            owner_name, _, attr = name.rpartition(".")
            self.__dict__["_first_param"] = (module, module.get_submodule(owner_name), attr, p)
            return p.device
        return torch.device("cpu")

    def _call_model(self, kind: str, args: tuple, kwargs: dict, interleaver: Interleaver | None) -> Any:
        if kind == "generate":
            return self._generate(kwargs, interleaver)
        kwargs = {k: v for k, v in kwargs.items() if k != "generation_kwargs"}
        return self._module(*args, **kwargs)

    # -- generation ---------------------------------------------------------------------------

    def _attach_generator(self) -> None:
        d = self.__dict__
        if "_generator" not in d:
            d["_generator"] = Generator()
        self._add_extra_module("generator", d["_generator"])

    def _result_envoy(self, kind: str) -> "Envoy":
        return self._child("generator") if kind == "generate" else self

    def generate(self, *inputs: Any, remote: bool | str = False, backend: Any = None, **kwargs: Any) -> GenerateTracer:
        """Generate with the `with` body beside every step (`tracer.iter[...]`, `tracer.all()`).

        Used without a `with` block (`out = model.generate(x, max_new_tokens=2)`) it generates
        directly and returns Hugging Face's output, as in nnsight (the rule that tells is in
        `tracing/with_detection.py`; `tracer = model.generate(x)` entered later by `with
        tracer:` in the same function still traces).
        """
        if not _entered_by_with(self, sys._getframe(1)):
            return self._direct_call("generate", inputs, remote, backend, kwargs)
        backend = self._backend_for(remote, backend, kwargs)
        return GenerateTracer(self, *inputs, backend=backend, **kwargs)

    def _call_directly(self, kind: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if kind != "generate":
            return super()._call_directly(kind, args, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}  # as run_generate
        if "pad_token_id" not in kwargs:
            tok = self.__dict__["tokenizer"]
            pad = getattr(tok, "pad_token_id", None) if tok is not None else None
            if pad is not None:
                kwargs["pad_token_id"] = pad
        return self._module.generate(*args, **kwargs)

    def _generate(self, kwargs: dict[str, Any], interleaver: Interleaver) -> Any:
        return run_generate(self, kwargs, interleaver)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entered_by_with(model: LanguageModel, frame: Any) -> bool:
    """Whether the `generate` call made from `frame` is a tracer for a `with` (else it runs
    directly). Interlace's own callers (the server's executor) always get the tracer, and a
    subclass's `generate` that calls this one is looked through to its own caller."""
    while frame is not None and frame.f_code.co_name == "generate" and frame.f_locals.get("self") is model:
        frame = frame.f_back
    if frame is None or frame.f_code.co_filename.startswith(_PACKAGE_DIR + os.sep):
        return True
    return enters_with(frame)


def _cache_dir() -> Path:
    return Path(os.environ.get("INTERLACE_CACHE_DIR") or Path.home() / ".cache" / "interlace")


def _routed_tokenizer_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the options that can only be the tokenizer's (`max_length` too when `truncation`
    is given: then it is the tokenizer's length, not generation's)."""
    routed = {name: kwargs.pop(name) for name in list(kwargs) if name in ROUTED_TOKENIZER_OPTIONS}
    if "truncation" in routed and "max_length" in kwargs:
        routed["max_length"] = kwargs.pop("max_length")
    return routed


def _reject_tokenizer_options(kwargs: dict[str, Any]) -> None:
    bad = sorted(set(kwargs) & TOKENIZER_OPTIONS)
    if bad:
        raise TracingError(
            f"{', '.join(bad)} {'is a tokenizer option' if len(bad) == 1 else 'are tokenizer options'}; "
            "pass tokenizer options explicitly so they cannot be mistaken for model or "
            f"generation options: `model.trace(text, tokenizer_kwargs={{{bad[0]!r}: ...}})`"
            + (" (to cap generation use `max_new_tokens=`)" if "max_length" in bad else "")
        )


def _ones_mask(ids: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    return ids, [[1] * len(r) for r in ids]


def _strip_padding(ids: list[list[int]], masks: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Drop padded positions so rows can be re-padded together with other invokes."""
    out_ids, out_masks = [], []
    for r, m in zip(ids, masks):
        if len(m) != len(r):
            raise TracingError(f"attention_mask has {len(m)} positions but input_ids has {len(r)}.")
        if 0 in m and all(x in (0, 1) for x in m):
            kept = [(t, x) for t, x in zip(r, m) if x]
            out_ids.append([t for t, _ in kept])
            out_masks.append([1] * len(kept))
        else:
            out_ids.append(list(r))
            out_masks.append(list(m))
    return out_ids, out_masks


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:
        return a is b


# Its traces call the module as `NNsight` does; only generation uses the interleaver.
CALLS_WITHOUT_INTERLEAVER.add(LanguageModel._call_model)
