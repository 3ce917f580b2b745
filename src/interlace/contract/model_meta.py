"""What a client needs to build a hosted model without its weights: config and tokenizer files.

Part of the contract: the server writes this description and the client reads it (`models/hosted.py`).

`GET /v1/models/{key}/meta` answers `describe_model(model)`: the files a Hugging Face
checkout holds besides the weights (config, generation config, tokenizer), as JSON text or
base64 bytes, plus the class and dtype of the hosted module. The client writes them to a
temporary directory and loads them with the usual `from_pretrained` calls, so it builds the
very architecture the server runs, on the meta device. Never pickle, never code: names are
plain file names and nothing executable is sent (see `FILE_NAME`, `REFUSED_SUFFIXES`).
"""

from __future__ import annotations

import base64
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["describe_model", "NotDescribable", "FILE_NAME", "REFUSED_SUFFIXES", "META_FORMAT"]

#: Bumped when the answer's shape changes incompatibly.
META_FORMAT = 1
#: The only file names that travel: one path component, no hidden files.
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Code and weights never travel (a client must not run server-sent code or fetch weights).
REFUSED_SUFFIXES = (".py", ".pyc", ".so", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                    ".msgpack", ".gguf", ".onnx", ".pkl", ".pickle")


class NotDescribable(Exception):
    """The hosted model is not a Hugging Face model, so there is no config to send."""


def describe_model(model: Any) -> dict[str, Any]:
    """The JSON-able description of a hosted model (a `LanguageModel` or `NNsight`)."""
    module = model._module
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise NotDescribable(
            f"The hosted model is a plain {type(module).__name__} without a Hugging Face config, "
            "so the server cannot describe it for building without weights. Load it locally "
            "(`NNsight(module)`) and pass `backend=RemoteBackend(model_key=...)` to trace it remotely."
        )
    dtype = next((p.dtype for p in module.parameters()), None)
    tokenizer = model.__dict__.get("tokenizer")
    with tempfile.TemporaryDirectory(prefix="interlace-meta-") as tmp:
        folder = Path(tmp)
        config.save_pretrained(folder)
        generation = getattr(module, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(folder)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)
        files = _read_files(folder)
    return {
        "format": META_FORMAT,
        "wrapper": type(model).__name__,
        "architecture": type(module).__name__,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "has_tokenizer": tokenizer is not None,
        "files": files,
    }


def _read_files(folder: Path) -> dict[str, dict[str, str]]:
    files: dict[str, dict[str, str]] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if not path.is_file() or not FILE_NAME.match(name) or name.endswith(REFUSED_SUFFIXES):
            continue
        data = path.read_bytes()
        try:
            files[name] = {"text": data.decode("utf-8")}
        except UnicodeDecodeError:  # e.g. a sentencepiece model
            files[name] = {"base64": base64.b64encode(data).decode("ascii")}
    return files
