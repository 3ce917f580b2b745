"""The worker process's entry point: `python -m interlace.models.worker --fd N`.

Started by `execution.process.WorkerProcess` (never by hand). It loads the hosted model from
the spec the parent sends (its path or hub id, from the model files, read-only) and then
serves jobs with `execution.worker.serve`, confined. It lives here, not in `execution/`,
because building a `LanguageModel` from a path is this layer's work and imports only point
down.

A spec is `{"kind": "language_model", "path": PATH_OR_ID}`: `LanguageModel(path,
dispatch=True)`, as `interlace serve --model PATH_OR_ID` loads it.
"""

from __future__ import annotations

import sys
from typing import Any

from ..execution.worker import worker_main
from .language_model import LanguageModel

__all__ = ["load_model", "main"]


def load_model(spec: dict[str, Any]) -> Any:
    kind = spec.get("kind")
    if kind == "language_model":
        return LanguageModel(spec["path"], dispatch=True, **dict(spec.get("load_kwargs") or {}))
    raise ValueError(f"unknown model spec kind {kind!r}; expected 'language_model'")


def main(argv: list[str] | None = None) -> int:
    return worker_main(list(sys.argv[1:] if argv is None else argv), load_model)


if __name__ == "__main__":
    sys.exit(main())
