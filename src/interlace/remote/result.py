"""The result: the saved values of a finished job, and how errors travel back."""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedValueError, WireFormatError
from .values import ValueDecoder, ValueEncoder
from .wire import decode_message, encode_message

__all__ = ["encode_result", "decode_result", "UnsendableResult"]


class UnsendableResult(Exception):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"The saved value `{name}` cannot be sent back: {reason}. Save tensors, numbers, "
            f"strings, lists or dicts of them, e.g. `{name} = torch.as_tensor(...).save()`."
        )
        self.name = name


def encode_result(values: dict[str, Any], *, compress: bool = True, max_bytes: int | None = None) -> bytes:
    encoder = ValueEncoder()
    body: dict[str, Any] = {}
    for name, value in values.items():
        try:
            body[name] = encoder.encode(value, path=name)
        except UnsupportedValueError as e:
            raise UnsendableResult(name, str(e).splitlines()[0]) from None
    data = encode_message("result", {"values": body}, encoder.tensors, compress=compress)
    if max_bytes is not None and len(data) > max_bytes:
        raise UnsendableResult(", ".join(values), f"the result is {len(data) / 1e6:.1f} MB, over the server's {max_bytes / 1e6:.1f} MB limit")
    return data


def decode_result(data: bytes) -> dict[str, Any]:
    message = decode_message(data, expected_kind="result")
    values = message.body.get("values")
    if not isinstance(values, dict):
        raise WireFormatError("A result must hold a `values` object.")
    decoder = ValueDecoder(message.tensors)
    return {name: decoder.decode(node, path=name) for name, node in values.items()}
