"""The server's job runner: hosts models by key and runs their jobs one at a time.

Receiving and running a job are the execution layer's (`execution/`), which the simulation
calls too; this class adds what only a server has: several hosted models, a lock per model,
and a pristine copy of each model's weights to undo a job that changed them.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from ..contract.model_meta import describe_model
from ..contract.policy import DEFAULT_POLICY, Policy
from ..execution.errors import JobFailed
from ..execution.isolation import restore, snapshot
from ..execution.receive import PreparedRequest, prepare_payload
from ..execution.run import run_prepared

__all__ = ["DefaultJobRunner"]


class DefaultJobRunner:
    """Hosts models by key; one job at a time per model (the server keeps one worker per key)."""

    def __init__(self, models: Mapping[str, Any], policy: Policy | None = None) -> None:
        self.models = dict(models)
        self._policy = policy or DEFAULT_POLICY
        self._locks = {key: threading.Lock() for key in self.models}
        # A CPU copy of each model's weights, to undo a job that modified them (invariant 7:
        # one user cannot affect another). Costs host memory equal to the models' size.
        self._pristine = {key: snapshot(model) for key, model in self.models.items()}

    def prepare(self, payload: bytes) -> PreparedRequest:
        return prepare_payload(payload, self._policy, self.models)

    def run(self, job: PreparedRequest, log: Callable[[str], None]) -> bytes:
        with self._locks[job.model_key]:
            model = self.models[job.model_key]
            try:
                return run_prepared(job, model, self._policy, log)
            except JobFailed as e:
                if e.category == "model-modified":
                    restore(model, self._pristine[job.model_key])
                raise

    def model_keys(self) -> list[str]:
        return list(self.models)

    def model_meta(self, model_key: str) -> dict[str, Any]:
        """Config and tokenizer files of a hosted model, for clients without its weights
        (GET /v1/models/{key}/meta). Read-only, so it needs no job lock."""
        return describe_model(self.models[model_key])

    def policy(self) -> dict[str, Any]:
        return self._policy.to_json()
