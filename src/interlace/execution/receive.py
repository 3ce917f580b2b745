"""Receiving a request: bytes in, a decoded and validated request out, or `BadRequest`.

The server calls `prepare_payload` when a job is submitted (and again after a restart, from
the stored bytes); the simulation calls it in-process, so both refuse the same requests with
the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..contract.errors import WireFormatError
from ..contract.options import forbidden_server_option
from ..contract.policy import Policy
from ..contract.problems import Problem
from ..contract.request import TraceRequest, decode_request
from ..contract.validate import FIX_TOO_LARGE, upload_too_large, validate_request
from .errors import BadRequest

__all__ = ["PreparedRequest", "prepare_payload"]


@dataclass
class PreparedRequest:
    model_key: str
    request: TraceRequest
    tensors: dict[str, Any]
    size: int


def prepare_payload(payload: bytes, policy: Policy, model_keys: Mapping[str, Any] | list[str]) -> PreparedRequest:
    """Decode and validate request bytes; raises BadRequest with the HTTP status to answer."""
    too_large = upload_too_large(len(payload), policy)
    if too_large is not None:
        raise BadRequest(f"{too_large[0].upper()}{too_large[1:]}.\n{FIX_TOO_LARGE}", status=413)
    try:
        request, tensors = decode_request(payload, policy)
    except WireFormatError as e:
        raise BadRequest(f"The request could not be decoded: {e}", status=400) from None
    for name in request.kwargs:
        # Only the model's own options travel (`contract/options.py`); the client refuses the
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
        raise BadRequest(_summary(problems), status=422, problems=problems)
    return PreparedRequest(request.model_key, request, tensors, len(payload))


def _summary(problems: list[Problem]) -> str:
    count = len(problems)
    return f"The request was rejected ({count} problem{'s' if count != 1 else ''}): " + "; ".join(
        f"{p.filename}:{p.lineno} [{p.category}] {p.message}" for p in problems
    )
