"""The request: what a trace sends to a server (the schema), and its bytes both ways.

The client builds one from a captured trace (`backends/outbound.py`); the execution layer
decodes it (`decode_request`). Only what the body references travels: the names its code reads
that the caller defines, each encoded by value; the model and its submodules as references
bound on the other side; user functions and classes as source.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .._version import PROTOCOL_VERSION, __version__
from .errors import WireFormatError
from .local_block import LocalBlockSpec
from .policy import DEFAULT_POLICY, Policy
from .problems import Problem
from .wire.decode import decode_message
from .wire.encode import encode_message

__all__ = ["BlockSpec", "BuiltRequest", "ObjectSpec", "TraceRequest", "decode_request", "encode_request"]


class BlockSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: str = Field(max_length=4096)
    first_lineno: int = Field(ge=1)
    source: str
    as_name: str | None = None


class ObjectSpec(BaseModel):
    """A function, lambda or class shipped by source (see `source.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["function", "lambda", "class"]
    name: str = Field(max_length=512)
    decorated: bool = False
    source: str = ""
    filename: str = Field(default="<unknown>", max_length=4096)
    lineno: int = Field(default=0, ge=0)
    globals: dict[str, Any] = {}
    closure: dict[str, Any] = {}
    defaults: Any = None
    kwdefaults: Any = None


# `rename=` travels as data the server applies to its model for the job: module paths and
# plain alias names only, so an alias can never name a dunder or a private attribute.
_ModulePath = Annotated[str, StringConstraints(pattern=r"^\.?[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", max_length=200)]
_AliasName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=100)]


class TraceRequest(BaseModel):
    """The JSON envelope of a request (tensors travel beside it in the safetensors part)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = PROTOCOL_VERSION  # type: ignore[assignment]
    interlace_version: str = __version__
    python_version: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    model_key: str
    kind: Literal["trace", "generate", "session"]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    block: BlockSpec
    variables: dict[str, Any] = {}
    objects: dict[str, ObjectSpec] = {}
    model_refs: dict[str, str] = {}
    remote_objects: list[str] = []
    strict_remote: bool = False
    # Modules whose `.source` the client built before the trace: built on the server too,
    # before the run, so their ops count from the start there as well.
    source_modules: list[str] = []
    # The client model's aliases (`rename=`), so `model.layers[0]` means the same on the server.
    rename: dict[_ModulePath, _AliasName | list[_AliasName]] = Field(default_factory=dict, max_length=100)
    # The body's `with interlace.local():` blocks (their code stayed on the client), by line.
    local_blocks: list[LocalBlockSpec] = Field(default_factory=list, max_length=1000)


class BuiltRequest:
    def __init__(self, request: TraceRequest, tensors: dict[str, Any], problems: list[Problem]) -> None:
        self.request = request
        self.tensors = tensors
        self.problems = problems


def encode_request(built: BuiltRequest, *, compress: bool = True) -> bytes:
    return encode_message("request", built.request.model_dump(mode="json"), built.tensors, compress=compress)


def decode_request(data: bytes, policy: Policy = DEFAULT_POLICY) -> tuple[TraceRequest, dict[str, Any]]:
    """Strictly decode request bytes; anything wrong raises WireFormatError."""
    message = decode_message(data, expected_kind="request", max_bytes=policy.max_upload_bytes,
                             max_decompressed_bytes=policy.max_upload_bytes * 4)
    try:
        request = TraceRequest.model_validate(message.body)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise WireFormatError(f"The request does not match format {PROTOCOL_VERSION}: {errors}. "
                              "Use the same Interlace version on client and server (`interlace env` shows both).") from None
    return request, dict(message.tensors)
