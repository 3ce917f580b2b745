"""The wire format's constants and tables, shared by `encode.py` and `decode.py`.

See the package's `encode.py` for the layout and the design note.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAGIC", "FORMAT_VERSION", "FLAG_ZSTD", "KNOWN_FLAGS", "U64", "ENVELOPE_KEYS", "RAW_SPEC_KEYS",
    "MAX_ZSTD_RATIO", "NATIVE_CODES", "RAW_NAMES", "TO_CODE", "FROM_CODE", "RAW_DTYPES", "RAW_NAME_OF",
    "TENSOR_ITEMSIZE", "CODE_WIDTH", "NUMPY_TO_TORCH", "Message", "dtype_named",
]

MAGIC = b"ILC1"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
KNOWN_FLAGS = FLAG_ZSTD

U64 = struct.Struct("<Q")
ENVELOPE_KEYS = frozenset({"format", "kind", "body", "raw"})
RAW_SPEC_KEYS = frozenset({"dtype", "shape"})


# A zstd block holds at most 128 KiB and needs at least 4 bytes, so no real frame expands by
# more than ~32768x; a header claiming more is lying and is rejected before any allocation.
MAX_ZSTD_RATIO = 1 << 16

# torch dtype name -> safetensors dtype code, for the dtypes safetensors reads natively.
NATIVE_CODES = {
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
RAW_NAMES = (
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


def dtype_named(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


TO_CODE: dict[torch.dtype, str] = {
    dt: code for name, code in NATIVE_CODES.items() if (dt := dtype_named(name)) is not None
}
FROM_CODE: dict[str, torch.dtype] = {code: dt for dt, code in TO_CODE.items()}
# Keyed by the name in the envelope; looked up in this table only, never with getattr on
# untrusted text.
RAW_DTYPES: dict[str, torch.dtype] = {
    name: dt for name in RAW_NAMES if (dt := dtype_named(name)) is not None and dt not in TO_CODE
}
RAW_NAME_OF: dict[torch.dtype, str] = {dt: name for name, dt in RAW_DTYPES.items()}
TENSOR_ITEMSIZE: dict[torch.dtype, int] = {
    dt: dt.itemsize for dt in [*TO_CODE, *RAW_NAME_OF]
}
CODE_WIDTH: dict[str, int] = {code: TENSOR_ITEMSIZE[dt] for dt, code in TO_CODE.items()}

# numpy arrays handed to the wire directly (the value codec sends raw bytes instead).
NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {
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
