"""Decoding the Interlace wire format (see ``encode.py`` for the layout and the design note).

Every byte here comes from the network, so the parser is strict: anything malformed raises
``WireFormatError`` with what is wrong and what to do, and sizes are checked against the
caller's limits before anything is allocated.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
import zstandard

from ..errors import WireFormatError

from .format import (
    ENVELOPE_KEYS,
    FLAG_ZSTD,
    FORMAT_VERSION,
    FROM_CODE,
    KNOWN_FLAGS,
    MAGIC,
    MAX_ZSTD_RATIO,
    Message,
    RAW_DTYPES,
    RAW_SPEC_KEYS,
    TENSOR_ITEMSIZE,
    U64,
)

__all__ = ["decode_message"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed in the envelope")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a float")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r} in a JSON object")
    return result


def _parse_json(data: memoryview, what: str = "envelope") -> Any:
    try:
        text = str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"{what} is not valid UTF-8 ({exc}); the message is corrupt") from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except RecursionError as exc:
        raise WireFormatError(f"{what} JSON is nested too deeply to parse") from exc
    except ValueError as exc:
        raise WireFormatError(f"{what} is not valid JSON: {exc}") from exc


def _prefixed_json(data: memoryview, missing: str, length_name: str, what: str) -> tuple[Any, memoryview]:
    """Parse a u64 length then that many bytes of JSON (the envelope, the tensor header);
    returns the JSON value and the bytes after it."""
    if len(data) < U64.size:
        raise WireFormatError(f"the message is truncated: {missing}")
    (length,) = U64.unpack_from(data, 0)
    if length > len(data) - U64.size:
        raise WireFormatError(
            f"the message is truncated: the {length_name} says {length} bytes but only "
            f"{len(data) - U64.size} follow"
        )
    end = U64.size + length
    return _parse_json(data[U64.size : end], what), data[end:]


def _decompress(frame: memoryview, limit: int | None) -> bytes:
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise WireFormatError(f"the compressed payload has no valid zstd frame header ({exc})") from exc
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise WireFormatError(
            "the zstd frame does not declare its decompressed size; Interlace requires it "
            "(encode with interlace.remote.wire.encode_message)"
        )
    if limit is not None and size > limit:
        raise WireFormatError(
            f"the payload decompresses to {size} bytes, over the limit of {limit} bytes; "
            "send fewer or smaller tensors, or raise the receiver's limit"
        )
    if size > len(frame) * MAX_ZSTD_RATIO + 1024:
        raise WireFormatError(
            f"the zstd frame claims {size} bytes from only {len(frame)} compressed bytes; it is corrupt"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise WireFormatError(f"the compressed payload is corrupt or truncated ({exc})") from exc
    if len(out) != size:
        raise WireFormatError(f"the zstd frame declared {size} bytes but holds {len(out)}; it is corrupt")
    return out


def _check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise WireFormatError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    return shape


def _check_envelope(env: Any, expected_kind: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    if not isinstance(env, dict):
        raise WireFormatError(f"envelope must be a JSON object, got {type(env).__name__}")
    fmt = env.get("format")
    if type(fmt) is not int:
        raise WireFormatError(f"envelope has no integer 'format' field (got {fmt!r}); not an Interlace message")
    if fmt != FORMAT_VERSION:
        raise WireFormatError(
            f"message format version {fmt} is not supported (this Interlace reads version "
            f"{FORMAT_VERSION}); install matching Interlace versions on client and server"
        )
    unknown = set(env) - ENVELOPE_KEYS
    if unknown:
        raise WireFormatError(f"envelope has unknown fields {sorted(unknown)}; client and server versions differ")
    kind = env.get("kind")
    if not isinstance(kind, str) or not kind:
        raise WireFormatError(f"envelope 'kind' must be a non-empty string, got {kind!r}")
    if expected_kind is not None and kind != expected_kind:
        raise WireFormatError(f"expected a {expected_kind!r} message, got a {kind!r} message")
    body = env.get("body")
    if not isinstance(body, dict):
        raise WireFormatError(f"envelope 'body' must be a JSON object, got {type(body).__name__}")
    raw = env.get("raw", {})
    if not isinstance(raw, dict):
        raise WireFormatError(f"envelope 'raw' must be a JSON object, got {type(raw).__name__}")
    for name, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) != RAW_SPEC_KEYS:
            raise WireFormatError(f"raw tensor {name!r}: expected {{'dtype', 'shape'}}, got {spec!r}")
        if spec["dtype"] not in RAW_DTYPES:
            raise WireFormatError(
                f"raw tensor {name!r}: dtype {spec['dtype']!r} is unknown here; "
                "the sender's torch supports it but this one does not"
            )
        _check_shape(spec["shape"], f"raw tensor {name!r}")
    return kind, body, raw


_HEADER_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _header_entry(name: str, info: Any, data_len: int) -> tuple[int, int, torch.dtype, list[int]]:
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != _HEADER_ENTRY_KEYS:
        raise WireFormatError(f"{where}: header entry must have exactly {sorted(_HEADER_ENTRY_KEYS)}, got {info!r}")
    code = info["dtype"]
    dtype = FROM_CODE.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise WireFormatError(f"{where}: dtype {code!r} is not one Interlace sends")
    shape = _check_shape(info["shape"], where)
    offsets = info["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise WireFormatError(f"{where}: data_offsets {offsets!r} do not fit in {data_len} data bytes")
    begin, end = offsets
    if end - begin != math.prod(shape) * TENSOR_ITEMSIZE[dtype]:
        raise WireFormatError(f"{where}: {end - begin} bytes do not match shape {shape} of {dtype}")
    return begin, end, dtype, shape


def _load_tensors(section: memoryview, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Parse the safetensors section as strictly as safetensors does, copying each tensor once.

    safetensors' own parser takes only ``bytes`` and returns ``bytearray`` copies, i.e. two
    full copies; here each tensor is copied once, straight from the message into memory the
    tensor owns (independent, writable, nothing else kept alive).
    """
    header, data = _prefixed_json(section, "the tensor section has no header length", "tensor header length", "tensor header")
    if not isinstance(header, dict):
        raise WireFormatError(f"the tensor header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireFormatError("the tensor header's __metadata__ must map str to str")
    spans = sorted(
        ((*_header_entry(name, info, len(data)), name) for name, info in header.items()),
        key=lambda span: (span[0], span[1], span[4]),  # dtypes do not order; names are unique
    )
    position = 0
    for begin, end, _, _, name in spans:
        if begin != position:
            raise WireFormatError(f"tensor {name!r} starts at byte {begin}, expected {position}: tensors overlap or leave gaps")
        position = end
    if position != len(data):
        raise WireFormatError(f"the tensor section has {len(data) - position} stray bytes after the last tensor")
    source = np.frombuffer(data, dtype=np.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for begin, end, dtype, shape, name in sorted(spans, key=lambda span: span[4]):
        t = torch.empty(shape, dtype=dtype)
        if end > begin:
            t.view(-1).view(torch.uint8).numpy()[:] = source[begin:end]
            # Any byte other than 0/1 in a bool tensor is undefined behaviour in torch.
            if dtype is torch.bool and bool((t.view(torch.uint8) > 1).any()):
                raise WireFormatError(f"bool tensor {name!r} holds bytes other than 0 and 1; it is corrupt")
        tensors[name] = t
    for name, spec in raw.items():
        stored = tensors.get(name)
        if stored is None:
            raise WireFormatError(f"raw tensor {name!r} is listed in the envelope but missing from the tensors")
        if stored.dtype is not torch.uint8 or stored.dim() != 1:
            raise WireFormatError(f"raw tensor {name!r} must be stored as 1-D U8 bytes")
        dtype = RAW_DTYPES[spec["dtype"]]
        shape = spec["shape"]
        if stored.numel() != math.prod(shape) * TENSOR_ITEMSIZE[dtype]:
            raise WireFormatError(f"raw tensor {name!r}: {stored.numel()} bytes do not match shape {shape} of {dtype}")
        tensors[name] = stored.view(dtype).reshape(shape) if stored.numel() else torch.empty(shape, dtype=dtype)
    return tensors


def decode_message(
    data: bytes | bytearray | memoryview,
    *,
    expected_kind: str | None = None,
    max_bytes: int | None = None,
    max_decompressed_bytes: int | None = None,
) -> Message:
    """Decode and strictly check one message; anything wrong raises ``WireFormatError``.

    ``max_bytes`` caps the message as received, ``max_decompressed_bytes`` the payload after
    decompression (checked before allocating). ``None`` means no limit: a server must pass
    both.
    """
    try:
        return _decode(data, expected_kind, max_bytes, max_decompressed_bytes)
    except WireFormatError:
        raise
    except MemoryError as exc:
        raise WireFormatError("the message does not fit in memory; lower the limits or send less") from exc
    except Exception as exc:
        # The last line of defence: untrusted input must never surface as a stray KeyError.
        raise WireFormatError(f"malformed message ({type(exc).__name__}: {exc})") from exc


def _decode(
    data: Any, expected_kind: str | None, max_bytes: int | None, max_decompressed: int | None
) -> Message:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected the message as bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    n = len(view)
    if max_bytes is not None and n > max_bytes:
        raise WireFormatError(
            f"the message is {n} bytes, over the limit of {max_bytes} bytes; "
            "send fewer or smaller tensors, or raise the receiver's limit"
        )
    if n < len(MAGIC) + 1:
        raise WireFormatError(f"the message is truncated: {n} bytes, too short for the header")
    if view[: len(MAGIC)] != MAGIC:
        raise WireFormatError(
            f"not an Interlace message: expected magic {MAGIC!r}, got {bytes(view[:4])!r}; "
            "check that the URL points at an Interlace server and versions match"
        )
    flags = view[len(MAGIC)]
    if flags & ~KNOWN_FLAGS:
        raise WireFormatError(
            f"unknown flags 0x{flags:02x}; the sender uses a newer wire format, upgrade Interlace"
        )
    rest = view[len(MAGIC) + 1 :]
    if flags & FLAG_ZSTD:
        payload = memoryview(_decompress(rest, max_decompressed))
    else:
        if max_decompressed is not None and len(rest) > max_decompressed:
            raise WireFormatError(
                f"the payload is {len(rest)} bytes, over the limit of {max_decompressed} bytes; "
                "send fewer or smaller tensors, or raise the receiver's limit"
            )
        payload = rest
    envelope, rest = _prefixed_json(payload, "the payload has no JSON length field", "JSON length field", "envelope")
    kind, body, raw = _check_envelope(envelope, expected_kind)
    tensors = _load_tensors(rest, raw)
    return Message(kind, body, tensors)
