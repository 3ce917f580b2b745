"""The result: the saved values of a finished job, and how errors travel back."""

from __future__ import annotations

import warnings as warnings_module
from typing import Any, Sequence

from ..errors import GenerationEndedWarning

from .errors import UnsupportedValueError, WireFormatError
from .values.decode import ValueDecoder
from .values.encode import ValueEncoder
from .wire.decode import decode_message
from .wire.encode import encode_message

__all__ = ["encode_result", "decode_result", "UnsendableResult"]


class UnsendableResult(Exception):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"The saved value `{name}` cannot be sent back: {reason}. Save tensors, numbers, "
            f"strings, lists or dicts of them, e.g. `{name} = torch.as_tensor(...).save()`."
        )
        self.name = name


def encode_result(values: dict[str, Any], *, compress: bool = True, max_bytes: int | None = None,
                  warnings: Sequence[tuple[type[Warning], str]] = ()) -> bytes:
    """The saved values, and the engine's warnings of the run (`errors.collecting_warnings`)."""
    encoder = ValueEncoder()
    body: dict[str, Any] = {}
    for name, value in values.items():
        try:
            body[name] = encoder.encode(value, path=name)
        except UnsupportedValueError as e:
            raise UnsendableResult(name, str(e).splitlines()[0]) from None
    envelope: dict[str, Any] = {"values": body}
    if warnings:
        envelope["warnings"] = [{"category": category.__name__, "message": message} for category, message in warnings]
    data = encode_message("result", envelope, encoder.tensors, compress=compress)
    if max_bytes is not None and len(data) > max_bytes:
        raise UnsendableResult(", ".join(values), f"the result is {len(data) / 1e6:.1f} MB, over the server's {max_bytes / 1e6:.1f} MB limit; "
                                 "save less (`h[:, -1].save()` rather than `h.save()`), or ask the operator to raise "
                                 "`interlace serve --max-result-mb`")
    return data


def decode_result(data: bytes) -> dict[str, Any]:
    message = decode_message(data, expected_kind="result")
    values = message.body.get("values")
    if not isinstance(values, dict):
        raise WireFormatError("A result must hold a `values` object.")
    decoder = ValueDecoder(message.tensors)
    decoded = {name: decoder.decode(node, path=name) for name, node in values.items()}
    _raise_warnings(message.body.get("warnings", []))
    return decoded


def _raise_warnings(entries: Any) -> None:
    """The job's warnings, raised here as a local run raises them. Only known categories are
    rebuilt (by name, from a fixed table); anything else is a UserWarning."""
    if not isinstance(entries, list):
        raise WireFormatError("A result's `warnings` must be a list.")
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("message"), str)):
            raise WireFormatError("Each result warning must be an object with a `message` string.")
        category = _WARNING_CATEGORIES.get(str(entry.get("category")), UserWarning)
        warnings_module.warn(entry["message"], category, stacklevel=3)


_WARNING_CATEGORIES: dict[str, type[Warning]] = {
    cls.__name__: cls for cls in (UserWarning, RuntimeWarning, DeprecationWarning, FutureWarning, GenerationEndedWarning)
}
