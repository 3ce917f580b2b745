"""The Interlace wire format: one message = a JSON envelope plus named tensors.

Layout (all integers little-endian)::

    b"ILC1"           magic; rejects other protocols and future layouts at the first byte
    flags: u8         bit 0 = the payload is one zstd frame; every other bit must be 0
    payload           [one zstd frame of:]
                        json_len: u64 | JSON envelope (UTF-8) | safetensors bytes

    envelope = {"format": 1, "kind": str, "body": {...}, "raw"?: {name: {"dtype", "shape"}}}

Design note:

- **No pickle, ever.** Unpickling untrusted bytes runs arbitrary code. JSON and safetensors
  carry data only, and both have strict parsers, so a server can decode whatever arrives.
- **JSON for structure** because it is debuggable and language-neutral; ``values.py`` turns
  Python values into JSON nodes and puts tensors in the tensor part by name.
- **safetensors for tensor data**: a plain header plus raw bytes (no code), readable by
  other tools. We read and write it ourselves: ``safetensors.torch.save`` and ``load`` each
  cost two full extra copies of the data, while we stream each tensor's memory straight into
  the output (or the compressor) and copy it once into its own tensor when decoding. The
  parser is as strict as safetensors' (contiguous, non-overlapping offsets, sizes matching
  shapes); tests check compatibility with safetensors in both directions.
- **One zstd frame that declares its decompressed size.** The decoder checks that size
  against its limit before it allocates and then decompresses into a buffer of exactly that
  size, so a zip bomb fails fast and cannot grow memory past the limit. Compression is
  skipped when a sample of the tensor data says it will not pay: float tensors rarely shrink
  by more than a few per cent, and zstd would cost more time than the bytes it saves.
- Dtypes that safetensors lacks (complex128, complex32, some float8/float4, bits*) travel as
  their raw bytes (``U8``) with the real dtype and shape in the envelope's ``"raw"`` map.
- numpy arrays are accepted as a convenience and come back as torch tensors; ``values.py``
  records which values were numpy arrays (and their exact numpy dtype), so they come back as
  numpy there.
- Decoded tensors own writable memory; ``Message.tensors`` is ordered by name.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import zstandard

from interlace.remote.errors import UnsupportedValueError, WireFormatError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FLAG_ZSTD",
    "Message",
    "encode_message",
    "decode_message",
    "check_tensor",
]

MAGIC = b"ILC1"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
_KNOWN_FLAGS = FLAG_ZSTD

_U64 = struct.Struct("<Q")
_ENVELOPE_KEYS = frozenset({"format", "kind", "body", "raw"})
_RAW_SPEC_KEYS = frozenset({"dtype", "shape"})

# Below this much tensor data, compressing everything costs microseconds: no need to sample.
_SAMPLE_MIN_BYTES = 1 << 20
_SAMPLE_COUNT = 16
_SAMPLE_BYTES = 64 << 10
# Worker threads only pay off once each gets a few zstd jobs' worth of input.
_THREADS_MIN_BYTES = 4 << 20
# A zstd block holds at most 128 KiB and needs at least 4 bytes, so no real frame expands by
# more than ~32768x; a header claiming more is lying and is rejected before any allocation.
_MAX_ZSTD_RATIO = 1 << 16

# torch dtype name -> safetensors dtype code, for the dtypes safetensors reads natively.
_NATIVE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
_RAW_NAMES = (
    "complex128",
    "complex32",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    *(f"uint{i}" for i in range(1, 8)),
    *(f"int{i}" for i in range(1, 8)),
)


def _dtype(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


_TO_CODE: dict[torch.dtype, str] = {
    dt: code for name, code in _NATIVE_CODES.items() if (dt := _dtype(name)) is not None
}
_FROM_CODE: dict[str, torch.dtype] = {code: dt for dt, code in _TO_CODE.items()}
# Keyed by the name in the envelope; looked up in this table only, never with getattr on
# untrusted text.
_RAW_DTYPES: dict[str, torch.dtype] = {
    name: dt for name in _RAW_NAMES if (dt := _dtype(name)) is not None and dt not in _TO_CODE
}
_RAW_NAME_OF: dict[torch.dtype, str] = {dt: name for name, dt in _RAW_DTYPES.items()}
_TENSOR_ITEMSIZE: dict[torch.dtype, int] = {
    dt: dt.itemsize for dt in [*_TO_CODE, *_RAW_NAME_OF]
}
_CODE_WIDTH: dict[str, int] = {code: _TENSOR_ITEMSIZE[dt] for dt, code in _TO_CODE.items()}

# numpy arrays handed to the wire directly (values.py sends raw bytes instead).
_NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {
    np.dtype(n): getattr(torch, n)
    for n in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
              "uint64", "uint32", "uint16", "uint8", "bool", "complex64", "complex128")
}


@dataclass(frozen=True)
class Message:
    """A decoded message: ``kind``, JSON ``body`` and the named tensors (CPU, writable)."""

    kind: str
    body: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Entry:
    name: str
    code: str  # safetensors dtype code of the stored bytes
    shape: list[int]  # stored shape (1-D byte count for raw dtypes)
    data: np.ndarray  # uint8 view of the tensor's memory, no copy
    raw: dict[str, Any] | None  # {"dtype", "shape"} when stored as raw bytes


# --------------------------------------------------------------------------- encoding


def check_tensor(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot go over the wire (a sentence with the fix), or None if it can."""
    if tensor.is_quantized:
        return "quantized tensors cannot be sent; call .dequantize() on it first"
    if tensor.is_nested:
        return "nested tensors cannot be sent; call .to_padded_tensor(0) or unbind() it first"
    if tensor.layout != torch.strided:
        return f"{tensor.layout} tensors cannot be sent; call .to_dense() on it first"
    if tensor.device.type == "meta":
        return (
            "meta tensors have no data (the model's weights are not loaded); run the model "
            "for real first, or create the tensor on 'cpu'"
        )
    if tensor.dtype not in _TO_CODE and tensor.dtype not in _RAW_NAME_OF:
        return f"dtype {tensor.dtype} is not supported on the wire; convert it with .to(torch.float32)"
    return None


def _entry(name: Any, value: torch.Tensor | np.ndarray) -> _Entry:
    if not isinstance(name, str) or not name or name == "__metadata__" or not _utf8_ok(name):
        raise ValueError(
            f"tensor name {name!r} is invalid: use a non-empty UTF-8 str other than '__metadata__'"
        )
    if isinstance(value, np.ndarray):
        torch_dtype = _NUMPY_TO_TORCH.get(value.dtype.newbyteorder("="))
        if torch_dtype is None:
            raise UnsupportedValueError(
                f"tensor {name!r}: numpy dtype {value.dtype} cannot be sent as a tensor; "
                "convert it with .astype(np.float32) or send it through ValueEncoder"
            )
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        # ascontiguousarray turns 0-d into 1-d, so the shape comes from the original.
        data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        shape = list(value.shape)
    elif isinstance(value, torch.Tensor):
        problem = check_tensor(value)
        if problem is not None:
            raise UnsupportedValueError(f"tensor {name!r} of type {type(value).__name__}: {problem}")
        torch_dtype = value.dtype
        try:
            t = value.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            # Conjugate/negative views are lazy bits on the tensor, not in its memory.
            t = t.resolve_conj().resolve_neg().contiguous()
            flat = t.reshape(-1)
            if flat.numel() <= 1:
                # Size-1 dims make any stride "contiguous", but view(uint8) needs stride 1.
                flat = flat.as_strided((flat.numel(),), (1,))
            data = flat.view(torch.uint8).numpy()
        except (RuntimeError, TypeError) as exc:
            raise UnsupportedValueError(
                f"tensor {name!r} of type {type(value).__name__}: cannot read its data ({exc}); "
                "pass a plain tensor, e.g. t.detach().cpu().clone()"
            ) from exc
        shape = list(t.shape)
    else:
        raise UnsupportedValueError(
            f"tensor {name!r}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}; "
            "put other values in the body via ValueEncoder"
        )
    code = _TO_CODE.get(torch_dtype)
    if code is not None:
        return _Entry(name, code, shape, data, None)
    raw = {"dtype": _RAW_NAME_OF[torch_dtype], "shape": shape}
    return _Entry(name, "U8", [data.nbytes], data, raw)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates cannot go into the safetensors header
    except UnicodeEncodeError:
        return False
    return True


def _dump_json(obj: Any, what: str) -> bytes:
    try:
        # ensure_ascii: lone surrogates in str survive as \\udXXX escapes instead of failing.
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise UnsupportedValueError(
            f"{what} is not plain JSON ({exc}); encode Python values with "
            "interlace.remote.values.ValueEncoder and put tensors in the tensors dict"
        ) from exc
    return text.encode("ascii")


def _safetensors_header(entries: list[_Entry]) -> bytes:
    header: dict[str, Any] = {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.code, "shape": e.shape, "data_offsets": [offset, offset + e.data.nbytes]}
        offset += e.data.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # safetensors pads the header with spaces so tensor data starts 8-byte aligned.
    text += b" " * (-len(text) % 8)
    return _U64.pack(len(text)) + text


def _sample_ratio(views: list[np.ndarray], total: int, level: int) -> float:
    """Compressed/original size of a few evenly spread samples of the tensor data."""
    ends = []
    acc = 0
    for v in views:
        acc += v.nbytes
        ends.append(acc)
    cctx = zstandard.ZstdCompressor(level=level)
    original = compressed = 0
    for k in range(_SAMPLE_COUNT):
        pos = k * total // _SAMPLE_COUNT
        i = bisect.bisect_right(ends, pos)
        start = pos - (ends[i] - views[i].nbytes)
        chunk = views[i][start : start + _SAMPLE_BYTES]
        original += chunk.nbytes
        compressed += len(cctx.compress(chunk))
    return compressed / max(original, 1)


def _pays_to_compress(views: list[np.ndarray], size: int, level: int, min_saving: float) -> bool:
    data_bytes = sum(v.nbytes for v in views)
    if min_saving <= 0 or data_bytes < _SAMPLE_MIN_BYTES:
        return True
    ratio = _sample_ratio([v for v in views if v.nbytes], data_bytes, level)
    # JSON typically shrinks to well under half; a guess is enough for a yes/no decision.
    saving = data_bytes * (1.0 - ratio) + (size - data_bytes) * 0.5
    return saving >= min_saving * size


def encode_message(
    kind: str,
    body: dict[str, Any],
    tensors: Mapping[str, torch.Tensor | np.ndarray],
    *,
    compress: bool = True,
    level: int = 1,
    min_saving: float = 0.1,
) -> bytes:
    """Encode one message.

    ``body`` must be plain JSON (use ``ValueEncoder`` for Python values). With ``compress``
    the payload is zstd-compressed at ``level`` if a sample of the tensor data predicts a
    saving of at least ``min_saving`` of the size (``min_saving=0`` always compresses).
    Raises ``UnsupportedValueError`` for values the wire cannot carry, ``TypeError`` /
    ``ValueError`` for misuse (bad kind, tensor names, level).
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty str, got {kind!r}")
    if not isinstance(body, dict):
        raise TypeError(f"body must be a dict, got {type(body).__name__}")
    if not isinstance(level, int) or not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(f"level must be an int in [-131072, {zstandard.MAX_COMPRESSION_LEVEL}], got {level!r}")
    entries = [_entry(name, value) for name, value in tensors.items()]
    # Widest elements first (as safetensors does) so each tensor starts aligned in the file.
    entries.sort(key=lambda e: (-_CODE_WIDTH[e.code], e.name))
    envelope: dict[str, Any] = {"format": FORMAT_VERSION, "kind": kind, "body": body}
    raw = {e.name: e.raw for e in entries if e.raw is not None}
    if raw:
        envelope["raw"] = raw
    env = _dump_json(envelope, "message body")
    views = [e.data for e in entries]
    parts: list[Any] = [_U64.pack(len(env)), env, _safetensors_header(entries), *views]
    size = sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in parts)
    if compress and _pays_to_compress(views, size, level, min_saving):
        cctx = zstandard.ZstdCompressor(
            level=level,
            threads=-1 if size >= _THREADS_MIN_BYTES else 0,
            write_checksum=True,
            write_content_size=True,
        )
        chunker = cctx.chunker(size=size, chunk_size=1 << 22)
        out = [MAGIC, bytes([FLAG_ZSTD])]
        for p in parts:
            if len(p):
                out.extend(chunker.compress(p))
        out.extend(chunker.finish())
        return b"".join(out)
    return b"".join([MAGIC, b"\x00", *parts])


# --------------------------------------------------------------------------- decoding


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
    if size > len(frame) * _MAX_ZSTD_RATIO + 1024:
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
    unknown = set(env) - _ENVELOPE_KEYS
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
        if not isinstance(spec, dict) or set(spec) != _RAW_SPEC_KEYS:
            raise WireFormatError(f"raw tensor {name!r}: expected {{'dtype', 'shape'}}, got {spec!r}")
        if spec["dtype"] not in _RAW_DTYPES:
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
    dtype = _FROM_CODE.get(code) if isinstance(code, str) else None
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
    if end - begin != math.prod(shape) * _TENSOR_ITEMSIZE[dtype]:
        raise WireFormatError(f"{where}: {end - begin} bytes do not match shape {shape} of {dtype}")
    return begin, end, dtype, shape


def _load_tensors(section: memoryview, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Parse the safetensors section as strictly as safetensors does, copying each tensor once.

    safetensors' own parser takes only ``bytes`` and returns ``bytearray`` copies, i.e. two
    full copies; here each tensor is copied once, straight from the message into memory the
    tensor owns (independent, writable, nothing else kept alive).
    """
    if len(section) < _U64.size:
        raise WireFormatError("the message is truncated: the tensor section has no header length")
    (header_len,) = _U64.unpack_from(section, 0)
    if header_len > len(section) - _U64.size:
        raise WireFormatError(
            f"the message is truncated: the tensor header length says {header_len} bytes but only "
            f"{len(section) - _U64.size} follow"
        )
    header = _parse_json(section[_U64.size : _U64.size + header_len], "tensor header")
    if not isinstance(header, dict):
        raise WireFormatError(f"the tensor header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireFormatError("the tensor header's __metadata__ must map str to str")
    data = section[_U64.size + header_len :]
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
        dtype = _RAW_DTYPES[spec["dtype"]]
        shape = spec["shape"]
        if stored.numel() != math.prod(shape) * _TENSOR_ITEMSIZE[dtype]:
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
    if flags & ~_KNOWN_FLAGS:
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
    if len(payload) < _U64.size:
        raise WireFormatError("the message is truncated: the payload has no JSON length field")
    (json_len,) = _U64.unpack_from(payload, 0)
    if json_len > len(payload) - _U64.size:
        raise WireFormatError(
            f"the message is truncated: the JSON length field says {json_len} bytes but only "
            f"{len(payload) - _U64.size} follow"
        )
    envelope = _parse_json(payload[_U64.size : _U64.size + json_len])
    kind, body, raw = _check_envelope(envelope, expected_kind)
    tensors = _load_tensors(payload[_U64.size + json_len :], raw)
    return Message(kind, body, tensors)
