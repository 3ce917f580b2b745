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
- **JSON for structure** because it is debuggable and language-neutral; ``contract/values/`` turns
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
- numpy arrays are accepted as a convenience and come back as torch tensors; ``contract/values/``
  records which values were numpy arrays (and their exact numpy dtype), so they come back as
  numpy there.
- Decoded tensors own writable memory; ``Message.tensors`` is ordered by name.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import zstandard

from ..errors import UnsupportedValueError
from .format import CODE_WIDTH, FLAG_ZSTD, FORMAT_VERSION, MAGIC, NUMPY_TO_TORCH, RAW_NAME_OF, TO_CODE, U64

__all__ = [
    "encode_message",
    "check_tensor",
]

# Below this much tensor data, compressing everything costs microseconds: no need to sample.
_SAMPLE_MIN_BYTES = 1 << 20
_SAMPLE_COUNT = 16
_SAMPLE_BYTES = 64 << 10
# Worker threads only pay off once each gets a few zstd jobs' worth of input.
_THREADS_MIN_BYTES = 4 << 20


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
    if tensor.dtype not in TO_CODE and tensor.dtype not in RAW_NAME_OF:
        return f"dtype {tensor.dtype} is not supported on the wire; convert it with .to(torch.float32)"
    return None


def _entry(name: Any, value: torch.Tensor | np.ndarray) -> _Entry:
    if not isinstance(name, str) or not name or name == "__metadata__" or not _utf8_ok(name):
        raise ValueError(
            f"tensor name {name!r} is invalid: use a non-empty UTF-8 str other than '__metadata__'"
        )
    if isinstance(value, np.ndarray):
        torch_dtype = NUMPY_TO_TORCH.get(value.dtype.newbyteorder("="))
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
    code = TO_CODE.get(torch_dtype)
    if code is not None:
        return _Entry(name, code, shape, data, None)
    raw = {"dtype": RAW_NAME_OF[torch_dtype], "shape": shape}
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
    return U64.pack(len(text)) + text


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
    entries.sort(key=lambda e: (-CODE_WIDTH[e.code], e.name))
    envelope: dict[str, Any] = {"format": FORMAT_VERSION, "kind": kind, "body": body}
    raw = {e.name: e.raw for e in entries if e.raw is not None}
    if raw:
        envelope["raw"] = raw
    env = _dump_json(envelope, "message body")
    views = [e.data for e in entries]
    parts: list[Any] = [U64.pack(len(env)), env, _safetensors_header(entries), *views]
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

