"""`HostedModel`: what the execution layer needs of the model a job runs beside.

The engine's own needs are `tracing.host.Host`; a job needs a little more, at its edges:
contexts to run the shipped body in (`trace`, `generate`, `session`), the client's module
aliases for the job's length (`renamed`), the torch module for isolation (`_module`), and the
model's default edits (`__dict__["_default_edits"]`), which a job may add to but must not keep.
`models.NNsight` and `models.LanguageModel` are hosted models; the execution layer names
this protocol instead of importing them (it sits below `models/`).
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol

import torch

__all__ = ["HostedModel"]


class HostedModel(Protocol):
    """The model a job runs beside (`execution.run.execute_request`, `execution.isolation`)."""

    #: The wrapped torch module: its parameters, buffers and hooks are what isolation guards.
    _module: torch.nn.Module
    #: Holds `_default_edits`, the edits every run of the model applies (`model.edit()`).
    __dict__: dict[str, Any]

    def trace(self, *inputs: Any, **options: Any) -> Any:
        """The context of a `"trace"` request: `model.trace(*args, **kwargs)`."""

    def generate(self, *inputs: Any, **options: Any) -> Any:
        """The context of a `"generate"` request (language models only)."""

    def session(self, **options: Any) -> Any:
        """The context of a `"session"` request."""

    def renamed(self, rename: dict[str, Any] | None) -> ContextManager[None]:
        """The client model's `rename=` aliases, for one job."""
