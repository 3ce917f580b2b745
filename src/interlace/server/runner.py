"""The engine side of the server: decode and validate on receipt, execute in a worker.

`prepare_payload` and `run_prepared` are also what `remote='local'` calls, in-process, so the
simulation takes the very path a server job takes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import collecting_warnings
from ..contract.errors import WireFormatError
from ..contract.options import forbidden_server_option
from ..contract.policy import DEFAULT_POLICY, Policy
from ..contract.problems import Problem
from ..contract.request import TraceRequest, decode_request
from ..contract.result import UnsendableResult, encode_result
from ..contract.validate import validate_request
from ..execution.errors import BadRequest, JobFailed
from ..execution.run import ExecutionFailed, execute_request

__all__ = ["DefaultJobRunner", "PreparedRequest", "prepare_payload", "run_prepared"]


@dataclass
class PreparedRequest:
    model_key: str
    request: TraceRequest
    tensors: dict[str, Any]
    size: int


def prepare_payload(payload: bytes, policy: Policy, model_keys: Mapping[str, Any] | list[str]) -> PreparedRequest:
    """Decode and validate request bytes; raises BadRequest with the HTTP status to answer."""
    if len(payload) > policy.max_upload_bytes:
        raise BadRequest(
            f"The request is {len(payload) / 1e6:.1f} MB; this server accepts at most "
            f"{policy.max_upload_bytes / 1e6:.1f} MB. Save less, or compute large inputs inside the trace.",
            status=413,
        )
    try:
        request, tensors = decode_request(payload, policy)
    except WireFormatError as e:
        raise BadRequest(f"The request could not be decoded: {e}", status=400) from None
    for name in request.kwargs:
        # Only the model's own options travel (`remote/options.py`); the client refuses the
        # same names up front with the same message.
        message = forbidden_server_option(name)
        if message is not None:
            raise BadRequest(message, status=400)
    if request.model_key not in model_keys:
        raise BadRequest(
            f"This server does not host {request.model_key!r}. Hosted models: "
            f"{', '.join(sorted(model_keys)) or 'none'}. Check `interlace env` or the server's --model options.",
            status=404,
        )
    problems = validate_request(request, policy, payload_size=len(payload))
    if problems:
        raise BadRequest(_summary(problems), status=422, problems=[p.model_dump() for p in problems])
    return PreparedRequest(request.model_key, request, tensors, len(payload))


def run_prepared(prepared: PreparedRequest, model: Any, policy: Policy, log: Callable[[str], None]) -> bytes:
    """Execute and encode the result; failures raise JobFailed with the user's traceback."""
    try:
        with collecting_warnings() as caught:  # they travel back with the result
            values = execute_request(prepared.request, prepared.tensors, model, policy=policy, log=log)
    except ExecutionFailed as e:
        raise JobFailed(e.text, e.category) from None
    try:
        return encode_result(values, max_bytes=policy.max_result_bytes, warnings=caught)
    except UnsendableResult as e:
        raise JobFailed(f"UnsendableResult: {e}", "unserializable-result") from None


def _snapshot(model: Any) -> dict[str, Any]:
    module = model._module
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return {name: (tensor, tensor.detach().to("cpu", copy=True)) for name, tensor in state.items()}


def _restore(model: Any, pristine: dict[str, Any]) -> None:
    """Put back the original tensor objects and their values."""
    import torch

    module = model._module
    with torch.no_grad():
        for name, (original, copy) in pristine.items():
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if attr in owner._parameters:
                owner._parameters[attr] = original
            elif attr in owner._buffers:
                owner._buffers[attr] = original
            original.copy_(copy.to(original.device))


def _summary(problems: list[Problem]) -> str:
    count = len(problems)
    return f"The request was rejected ({count} problem{'s' if count != 1 else ''}): " + "; ".join(
        f"{p.filename}:{p.lineno} [{p.category}] {p.message}" for p in problems
    )


class DefaultJobRunner:
    """Hosts models by key; one job at a time per model (the server keeps one worker per key)."""

    def __init__(self, models: Mapping[str, Any], policy: Policy | None = None) -> None:
        self.models = dict(models)
        self._policy = policy or DEFAULT_POLICY
        self._locks = {key: threading.Lock() for key in self.models}
        # A CPU copy of each model's weights, to undo a job that modified them (invariant 7:
        # one user cannot affect another). Costs host memory equal to the models' size.
        self._pristine = {key: _snapshot(model) for key, model in self.models.items()}

    def prepare(self, payload: bytes) -> PreparedRequest:
        return prepare_payload(payload, self._policy, self.models)

    def run(self, job: PreparedRequest, log: Callable[[str], None]) -> bytes:
        with self._locks[job.model_key]:
            model = self.models[job.model_key]
            try:
                return run_prepared(job, model, self._policy, log)
            except JobFailed as e:
                if e.category == "model-modified":
                    _restore(model, self._pristine[job.model_key])
                raise

    def model_keys(self) -> list[str]:
        return list(self.models)

    def model_meta(self, model_key: str) -> dict[str, Any]:
        """Config and tokenizer files of a hosted model, for clients without its weights
        (GET /v1/models/{key}/meta). Read-only, so it needs no job lock."""
        from ..contract.model_meta import describe_model

        return describe_model(self.models[model_key])

    def policy(self) -> dict[str, Any]:
        return self._policy.to_json()
