"""The value codec's grammar: node tags' limits and patterns, the extension protocol, and the
checks both directions share (`encode.py` writes nodes, `decode.py` reads them)."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from types import NotImplementedType
from typing import Any, Protocol

import torch


__all__ = [
    "Node", "Decoding", "Encoding", "Extension", "DEFAULT_MAX_DEPTH", "MAX_SAFE_INT", "MAX_INT_DIGITS", "INT_RE", "NP_DTYPE_RE", "NP_KINDS",
    "DEVICE_RE", "SPECIAL_FLOATS", "NAN_BITS", "CANONICAL_NAN", "NAN_RE", "TORCH_DTYPES", "DEFAULT_FIX",
    "format_path", "is_hf_output_class", "is_dynamic_cache", "is_batch_encoding",
]

Node = Any  # a JSON value: None | bool | int | float | str | list[Node] | dict[str, Node]

DEFAULT_MAX_DEPTH = 200
MAX_SAFE_INT = 2**53
# Python refuses int <-> decimal str conversions beyond this many digits (CVE-2020-10735).
MAX_INT_DIGITS = 4300
INT_RE = re.compile(r"-?(0|[1-9][0-9]*)")
NP_DTYPE_RE = re.compile(r"[<>|=]?[biufcmMSU][0-9]{1,6}(\[[0-9]*[A-Za-z]+\])?")
NP_KINDS = frozenset("biufcmMSU")  # everything without pointers or structure
DEVICE_RE = re.compile(r"[a-z_]{1,32}(:[0-9]{1,6})?")
SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-0.0": -0.0}
NAN_BITS = struct.Struct(">d")
CANONICAL_NAN = NAN_BITS.pack(math.nan)
NAN_RE = re.compile(r"nan:[0-9a-f]{16}")
TORCH_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
DEFAULT_FIX = (
    "convert it to a tensor, list or dict before the trace, or decorate its class with "
    "@interlace.remote"
)

class Encoding(Protocol):
    """What an extension may call on the encoder (`encode.ValueEncoder`)."""

    path: str

    def encode(self, value: Any, *, path: str | None = None) -> Node: ...

    def add_tensor(self, tensor: Any) -> str: ...


class Decoding(Protocol):
    """What an extension may call on the decoder (`decode.ValueDecoder`)."""

    path: str

    def decode(self, node: Node, *, path: str | None = None) -> Any: ...


class Extension(Protocol):
    """Hooks for values the codec does not know (functions, classes, instances, ...)."""

    def encode(self, value: Any, encoder: Encoding) -> Node | NotImplementedType:
        """A node for ``value`` (tag ``"x:..."``), or ``NotImplemented`` to decline."""
        ...

    def decode(self, node: dict[str, Any], decoder: Decoding) -> Any:
        """The value for a node whose tag starts with ``"x:"``; raise WireFormatError if bad."""
        ...



def format_path(root: str, segments: list[tuple[str, Any]]) -> str:
    out = [root]
    for kind, key in segments:
        if kind == "[]":
            out.append(f"[{key!r}]")
        elif kind == "key":
            out.append(f"<key {key!r}>")
        else:  # "raw": text supplied by the caller, e.g. ".attr" or "<set element>"
            out.append(key)
    return "".join(out)



def is_hf_output_class(cls: Any) -> bool:
    """A Hugging Face `ModelOutput` subclass defined in transformers (checked by name, so
    this module needs no transformers import)."""
    return isinstance(cls, type) and cls.__module__.startswith("transformers.") and any(
        c.__name__ == "ModelOutput" and c.__module__.startswith("transformers.") for c in cls.__mro__
    )


def is_dynamic_cache(value: Any) -> bool:
    """A transformers `DynamicCache` whose layers all hold plain key/value tensors (checked by
    name, so this module needs no transformers import); other caches are not data."""
    cls = type(value)
    if cls.__name__ != "DynamicCache" or cls.__module__ != "transformers.cache_utils":
        return False
    return all(type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)
               and isinstance(getattr(layer, "values", None), torch.Tensor) for layer in value.layers)


def is_batch_encoding(cls: type) -> bool:
    """Hugging Face's `BatchEncoding` (what a tokenizer returns; checked by name, so this
    module needs no transformers import)."""
    return isinstance(cls, type) and issubclass(cls, Mapping) and any(
        c.__name__ == "BatchEncoding" and c.__module__.startswith("transformers.") for c in cls.__mro__
    )
