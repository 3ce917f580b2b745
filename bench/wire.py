"""Throughput of the wire format: encode/decode one large float32 tensor.

Run by hand: ``.venv/bin/python bench/wire.py [--mb 100] [--repeat 5]``. Prints MB/s (1 MB =
1e6 bytes of tensor data) for encode and decode, uncompressed, compressed-when-it-pays
(the default) and always-compressed, for random data (incompressible) and for a bf16-rounded
activation-like tensor (somewhat compressible). Best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from interlace.contract.wire.format import FLAG_ZSTD
from interlace.contract.wire.decode import decode_message
from interlace.contract.wire.encode import encode_message

__all__ = ["main"]


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best = float("inf")
    result: object = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n = int(args.mb * 1e6) // 4
    torch.manual_seed(0)
    data = {
        "randn f32": torch.randn(n),
        # Activations stored as bf16 and widened keep 16 zero mantissa bits: compressible.
        "bf16-rounded f32": torch.randn(n).to(torch.bfloat16).to(torch.float32),
    }
    modes = {
        "uncompressed": dict(compress=False),
        "compress=True (auto)": dict(compress=True),
        "forced zstd level 1": dict(compress=True, level=1, min_saving=0.0),
        "forced zstd level 3": dict(compress=True, level=3, min_saving=0.0),
    }
    mb = n * 4 / 1e6
    print(f"tensor: {mb:.0f} MB float32, torch threads {torch.get_num_threads()}, best of {args.repeat}")
    print(f"{'data':18} {'mode':22} {'encode MB/s':>12} {'decode MB/s':>12} {'size ratio':>11} zstd")
    for dname, tensor in data.items():
        tensors = {"x": tensor}
        for mname, kwargs in modes.items():
            t_enc, blob = _best(lambda: encode_message("bench", {"k": 1}, tensors, **kwargs), args.repeat)
            assert isinstance(blob, bytes)
            t_dec, msg = _best(lambda: decode_message(blob), args.repeat)
            assert torch.equal(msg.tensors["x"], tensor)  # type: ignore[attr-defined]
            zstd = "yes" if blob[4] & FLAG_ZSTD else "no"
            print(
                f"{dname:18} {mname:22} {mb / t_enc:12.0f} {mb / t_dec:12.0f} "
                f"{len(blob) / (n * 4):11.3f} {zstd}"
            )


if __name__ == "__main__":
    main()
