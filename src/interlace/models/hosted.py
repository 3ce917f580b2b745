"""Models known only by their server key: `NNsight(model_key=...)`, `LanguageModel(model_key=...)`.

A user without the weights (or hub access) asks the server it targets for the model's config
and tokenizer files (`GET /v1/models/{key}/meta`, authenticated; see `contract/model_meta.py`), loads
them with the usual `from_pretrained` calls from a temporary directory, and builds the module
tree on the meta device. That is all a remote trace needs on this side: the module tree to
name what the body reads, and the tokenizer for users' own decoding. Weights are never
downloaded, so such a model runs only with `remote=True` (`no_local_weights_error`).
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TracingError
from ..execution.fake import fake_run_active
from ..execution.integrity import BUILD_LOCK
from ..contract.model_meta import FILE_NAME, META_FORMAT, REFUSED_SUFFIXES

__all__ = ["HostedModel", "HostedModelError", "load_hosted", "build_hosted", "no_local_weights_error", "refuse_local_run"]


class HostedModelError(TracingError):
    """A model known only by its server key cannot be built, or cannot run here."""


@dataclass
class HostedModel:
    key: str
    host: str  # the server that described it; remote traces of the model go there
    api_key: str | None
    module: torch.nn.Module  # on the meta device
    tokenizer: Any  # None when the server's model has none
    wrapper: str  # the server-side wrapper class ("LanguageModel")


def load_hosted(model_key: str, *, host: str | None = None, api_key: str | None = None) -> HostedModel:
    """Fetch the description of `model_key` from the server and build it without weights."""
    from ..backends.client import RemoteRequestError, shared_client

    if not isinstance(model_key, str) or not model_key:
        raise TypeError(f"model_key must be the non-empty key of a hosted model, got {model_key!r}.")
    client = shared_client(host, api_key)
    try:
        meta = client.model_meta(model_key)
    except RemoteRequestError as e:
        if e.status_code == 404 and e.detail == "Not Found":  # the route itself is unknown
            detail = ("this server cannot describe its models (it predates GET /v1/models/{key}/meta). "
                      "Upgrade the server, or load the model locally and trace it with remote=True.")
        else:
            detail = e.detail
        raise RemoteRequestError(
            e.status_code, f"Cannot build {model_key!r} from the server at {client.host}: {detail}"
        ) from None
    return build_hosted(model_key, meta, host=client.host, api_key=api_key)


def build_hosted(model_key: str, meta: Any, *, host: str, api_key: str | None = None) -> HostedModel:
    """Build the module (meta device) and tokenizer that `meta` (the server's answer) describes."""
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or not isinstance(meta.get("files"), dict):
        raise HostedModelError(
            f"The server at {host} described {model_key!r} in a format this client does not know "
            f"(format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {META_FORMAT}). "
            "Use the same Interlace version as the server (`interlace env` shows both)."
        )
    from transformers import AutoConfig, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="interlace-hosted-") as tmp:
        folder = Path(tmp)
        _write_files(folder, meta["files"], model_key, host)
        # Never trust_remote_code: a model whose code is not in the installed transformers
        # cannot be built from what a server sends (code never travels).
        config = AutoConfig.from_pretrained(folder)
        module = _build_module(config, meta, model_key)
        if (folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            module.generation_config = GenerationConfig.from_pretrained(folder)
        tokenizer = None
        if meta.get("has_tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    return HostedModel(model_key, host, api_key, module, tokenizer, str(meta.get("wrapper") or "LanguageModel"))


def _write_files(folder: Path, files: dict[str, Any], model_key: str, host: str) -> None:
    for name, content in files.items():
        # Only plain file names (no paths), and never code or weights, whatever the server says.
        if not isinstance(name, str) or not FILE_NAME.match(name) or name.endswith(REFUSED_SUFFIXES):
            continue
        if isinstance(content, dict) and isinstance(content.get("text"), str):
            (folder / name).write_text(content["text"], encoding="utf-8")
        elif isinstance(content, dict) and isinstance(content.get("base64"), str):
            (folder / name).write_bytes(base64.b64decode(content["base64"], validate=True))
    if not (folder / "config.json").is_file():
        raise HostedModelError(
            f"The server at {host} sent no config for {model_key!r}, so its architecture cannot be "
            "built here. Load the model locally instead: `LanguageModel(path_or_hub_id)`."
        )


def _build_module(config: Any, meta: dict[str, Any], model_key: str) -> torch.nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedModel

    dtype = getattr(torch, str(meta.get("dtype") or "float32"), None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    # The server's own class when the installed transformers has it (exactly its module tree);
    # only names of transformers' model classes are looked up, nothing is imported by name.
    name = meta.get("architecture")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    try:
        with BUILD_LOCK, torch.device("meta"):  # one build at a time (see `BUILD_LOCK`)
            if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
                module = cls._from_config(config, dtype=dtype)
            else:
                module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, ImportError) as e:
        raise HostedModelError(
            f"Cannot build {model_key!r} ({name or getattr(config, 'model_type', '?')}) with the installed "
            f"transformers {transformers.__version__}: {e}. Install the transformers version the server "
            "uses (`interlace env` lists it)."
        ) from None
    return module.eval()  # as the server's model (from_pretrained returns it in eval mode)


def no_local_weights_error(model_key: str, remote: Any) -> HostedModelError:
    """The error for running a model known only by its server key anywhere but on the server."""
    how = {False: "remote=False (a local run)", "local": "remote='local' (the in-process dry run)"}.get(
        remote, f"remote={remote!r}"
    )
    return HostedModelError(
        f"{model_key!r} was built from the server's description (model_key=...): it has the module "
        f"tree and config but no weights here, so {how} cannot run it. Run it on the server:\n\n"
        "    with model.trace(inputs, remote=True):\n        ...\n\n"
        "remote='local' runs the server path in-process on local weights. To check a trace "
        "without them (shapes, order of access, what can be sent; values fake): "
        "`model.trace(inputs, remote='local', dry_run=True)`. To run locally, load the "
        f"weights: `LanguageModel({model_key!r})` (by hub id or path) or `NNsight(module)`."
    )


def refuse_local_run(model_key: str, remote: Any, kwargs: dict[str, Any]) -> None:
    """Raise `no_local_weights_error` unless this run is a dry run (which needs no weights):
    the user's `dry_run=True`, or the dry run's own inner trace (`execution.fake`)."""
    if kwargs.get("dry_run") or fake_run_active():
        return
    raise no_local_weights_error(model_key, remote)
