"""Wire format: exact round trips, safetensors compatibility, strict decoding."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlace.contract.errors import RemoteProtocolError, UnsupportedValueError, WireFormatError
from interlace.contract.wire.format import FLAG_ZSTD, MAGIC, Message
from interlace.contract.wire.decode import decode_message
from interlace.contract.wire.encode import encode_message
from interlace.contract.wire import format as wire_format

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL_DTYPES = sorted({*wire_format.TO_CODE, *wire_format.RAW_NAME_OF}, key=str)
# Sub-byte "shell" dtypes (uint1..7, int1..7) have storage but almost no ops; test the rest
# with torch ops and all of them with raw bytes.
OPERABLE = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
]


def raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bits (so NaN payloads and -0.0 count)."""
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert raw_bytes(a.detach().resolve_conj().resolve_neg()) == raw_bytes(b)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    n = int(np.prod(shape)) * dtype.itemsize
    buf = bytearray((data * (n // max(len(data), 1) + 1))[:n]) if data else bytearray(n)
    if dtype is torch.bool:
        buf = bytearray(b & 1 for b in buf)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    # No clone: sub-byte shell dtypes (int1...) have no copy kernel; the tensor keeps buf alive.
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


def frame(envelope: object, section: bytes, *, flags: int = 0, raw_json: bytes | None = None) -> bytes:
    env = raw_json if raw_json is not None else json.dumps(envelope).encode()
    payload = struct.pack("<Q", len(env)) + env + section
    if flags & FLAG_ZSTD:
        payload = zstandard.ZstdCompressor().compress(payload)
    return MAGIC + bytes([flags]) + payload


EMPTY_SECTION = safetensors.torch.save({})
GOOD_ENV = {"format": 1, "kind": "k", "body": {}}


def section(header: object, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(dtype: torch.dtype, compress: bool) -> None:
    tensors = {
        "vec": random_tensor(dtype, (7,), bytes(range(3, 250, 7))),
        "scalar": random_tensor(dtype, (), b"\x01\x7f\xff\x80" * 4),
        "empty": torch.empty((0, 3), dtype=dtype),
        "matrix": random_tensor(dtype, (3, 4), bytes(range(200))),
    }
    msg = decode_message(encode_message("k", {}, tensors, compress=compress, min_saving=0))
    assert set(msg.tensors) == set(tensors)
    for name, t in tensors.items():
        assert_exact(t, msg.tensors[name])


@FAST
@given(
    dtype=st.sampled_from(OPERABLE),
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    data=st.binary(max_size=64),
    compress=st.booleans(),
    transpose=st.booleans(),
)
def test_random_tensors_round_trip(dtype, shape, data, compress, transpose) -> None:
    t = random_tensor(dtype, shape, data)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous
    msg = decode_message(encode_message("k", {"x": [1]}, {"t": t}, compress=compress, min_saving=0))
    assert_exact(t, msg.tensors["t"])
    if dtype.is_floating_point:
        assert torch.equal(t.nan_to_num(), msg.tensors["t"].nan_to_num())
    else:
        assert torch.equal(t, msg.tensors["t"])
    assert msg.body == {"x": [1]}


def test_special_floats_keep_their_bits() -> None:
    t = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-45])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        out = decode_message(encode_message("k", {}, {"t": t.to(dtype)})).tensors["t"]
        assert_exact(t.to(dtype), out)
        assert torch.signbit(out[1]) and not torch.signbit(out[2])


def test_views_sharing_storage_and_odd_layouts() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "base": base,
        "slice": base[1:3],
        "t": base.t(),
        "strided": base[:, ::2],
        "same_object": base,
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "conj": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj(),
        "neg": torch.tensor([1 + 2j], dtype=torch.complex128).conj().imag,
        "one_strided": torch.arange(4.0)[1:2],
        "zero_strided": torch.zeros(3, 0).t(),
        "param": torch.nn.Parameter(torch.ones(2)),
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    msg = decode_message(encode_message("k", {}, tensors))
    for name, t in tensors.items():
        out = msg.tensors[name]
        assert torch.equal(out, t.detach().resolve_conj().resolve_neg()), name
        assert out.is_contiguous() and not out.requires_grad
    # Decoded tensors are independent and writable.
    msg.tensors["base"][0, 0] = 100
    assert msg.tensors["slice"][0, 0] == 6 and msg.tensors["same_object"][0, 0] == 0


def test_several_empty_tensors_at_one_offset() -> None:
    # Zero-size tensors share their offset; the parser must not try to order their dtypes.
    tensors = {"a": torch.empty(0), "b": torch.empty(0, 2, dtype=torch.float64), "c": torch.empty(0, dtype=torch.bool)}
    msg = decode_message(encode_message("k", {}, tensors, compress=False))
    for name, t in tensors.items():
        assert_exact(t, msg.tensors[name])


def test_numpy_inputs_come_back_as_torch() -> None:
    arrays = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2],
        "big_endian": np.arange(4, dtype=">i4"),
        "c128": np.array([1 + 1j, -0.0 - 2j]),
        "bool": np.array([True, False]),
        "u16": np.array([65535], dtype=np.uint16),
        "zero_d": np.array(2.5),
    }
    msg = decode_message(encode_message("k", {}, arrays))
    for name, a in arrays.items():
        assert isinstance(msg.tensors[name], torch.Tensor)
        assert msg.tensors[name].shape == a.shape
        np.testing.assert_array_equal(msg.tensors[name].numpy(), a)


def test_empty_message_and_message_type() -> None:
    data = encode_message("ping", {}, {})
    msg = decode_message(data, expected_kind="ping")
    assert msg == Message("ping", {}, {})
    assert data[:4] == MAGIC


def test_body_survives_exactly() -> None:
    body = {"s": "é\u2028\ud800", "n": [1, 2.5, -0.0, 2**70, None, True], "nested": {"a": {"b": []}}}
    assert decode_message(encode_message("k", body, {})).body == body


def test_memoryview_and_bytearray_inputs() -> None:
    data = encode_message("k", {"a": 1}, {"t": torch.ones(3)})
    for form in (bytearray(data), memoryview(data)):
        assert torch.equal(decode_message(form).tensors["t"], torch.ones(3))


# ----------------------------------------------------------------- safetensors compatibility


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    assert data[4] == 0
    (n,) = struct.unpack_from("<Q", data, 5)
    return data[:13], json.loads(data[13 : 13 + n]), data[13 + n :]


def test_safetensors_reads_what_we_write() -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int8), "c": torch.tensor(True),
               "d": torch.zeros(0, 2, dtype=torch.bfloat16)}
    _, _, sec = split(encode_message("k", {}, tensors, compress=False))
    loaded = safetensors.torch.load(sec)
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert_exact(t, loaded[k])


def test_we_read_what_safetensors_writes() -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int8), "z": torch.zeros(0)}
    sec = safetensors.torch.save(tensors, metadata={"who": "safetensors"})
    msg = decode_message(frame(GOOD_ENV, sec))
    for k, t in tensors.items():
        assert_exact(t, msg.tensors[k])


# ----------------------------------------------------------------------------- compression


def test_compression_is_used_when_it_pays_and_skipped_when_not() -> None:
    zeros = {"z": torch.zeros(1 << 20)}
    noise = {"n": torch.randn(1 << 20)}
    assert encode_message("k", {}, zeros)[4] & FLAG_ZSTD
    assert not encode_message("k", {}, noise)[4] & FLAG_ZSTD
    assert encode_message("k", {}, noise, min_saving=0)[4] & FLAG_ZSTD
    assert not encode_message("k", {}, zeros, compress=False)[4] & FLAG_ZSTD
    small = encode_message("k", {"a": "x" * 1000}, {})
    assert small[4] & FLAG_ZSTD and len(small) < 200


def test_decompressed_size_limit_is_checked_before_decompressing() -> None:
    bomb = encode_message("k", {}, {"z": torch.zeros(4 << 20)})  # 16 MB of zeros, tiny on the wire
    assert len(bomb) < 10_000
    with pytest.raises(WireFormatError, match="decompresses to .* over the limit of 1000000 bytes"):
        decode_message(bomb, max_decompressed_bytes=1_000_000)
    assert decode_message(bomb, max_decompressed_bytes=20_000_000).tensors["z"].shape == (4 << 20,)


# ------------------------------------------------------------------------ decoding errors


def bad(data: object, match: str, **kwargs: object) -> WireFormatError:
    with pytest.raises(WireFormatError, match=match) as info:
        decode_message(data, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, RemoteProtocolError)
    return info.value


def test_error_wrong_magic() -> None:
    bad(b"GET / HTTP/1.1\r\n", r"not an Interlace message: expected magic b'ILC1', got b'GET '")


def test_error_unknown_flags() -> None:
    data = bytearray(encode_message("k", {}, {}, compress=False))
    data[4] = 0x82
    bad(bytes(data), "unknown flags 0x82.*upgrade Interlace")


def test_error_too_short_and_not_bytes() -> None:
    bad(b"ILC", "truncated: 3 bytes")
    bad(b"ILC1\x00\x01", "no JSON length field")
    bad("ILC1", "expected the message as bytes, got str")


def test_error_json_length_beyond_data() -> None:
    data = MAGIC + b"\x00" + struct.pack("<Q", 2**63) + b"{}"
    bad(data, r"JSON length field says 9223372036854775808 bytes but only 2 follow")


def test_error_invalid_utf8_json_and_constants() -> None:
    bad(frame(None, EMPTY_SECTION, raw_json=b'{"a": "\xff"}'), "envelope is not valid UTF-8")
    bad(frame(None, EMPTY_SECTION, raw_json=b'{"format": 1,'), "envelope is not valid JSON")
    bad(frame(None, EMPTY_SECTION, raw_json=b'{"format": NaN}'), "non-finite number NaN")
    bad(frame(None, EMPTY_SECTION, raw_json=b'{"format": 1e999}'), "overflows a float")
    bad(frame(None, EMPTY_SECTION, raw_json=b'{"format": 1, "format": 1}'), "duplicate key 'format'")
    bad(frame(None, EMPTY_SECTION, raw_json=b"[" * 100_000 + b"]" * 100_000), "nested too deeply|not valid JSON")


def test_error_envelope_shape() -> None:
    bad(frame([1], EMPTY_SECTION), "envelope must be a JSON object, got list")
    bad(frame({"kind": "k", "body": {}}, EMPTY_SECTION), "no integer 'format' field")
    bad(frame({**GOOD_ENV, "format": True}, EMPTY_SECTION), "no integer 'format' field")
    bad(frame({**GOOD_ENV, "format": 2}, EMPTY_SECTION),
        "format version 2 is not supported .* reads version 1.*matching Interlace versions")
    bad(frame({**GOOD_ENV, "extra": 1}, EMPTY_SECTION), r"unknown fields \['extra'\]")
    bad(frame({**GOOD_ENV, "kind": ""}, EMPTY_SECTION), "'kind' must be a non-empty string")
    bad(frame({**GOOD_ENV, "body": [1]}, EMPTY_SECTION), "'body' must be a JSON object, got list")


def test_error_wrong_kind() -> None:
    bad(encode_message("result", {}, {}), "expected a 'request' message, got a 'result' message",
        expected_kind="request")


def test_error_message_too_large() -> None:
    data = encode_message("k", {}, {"t": torch.zeros(100)}, compress=False)
    bad(data, f"the message is {len(data)} bytes, over the limit of 100 bytes", max_bytes=100)
    bad(data, "the payload is .* over the limit of 50 bytes", max_decompressed_bytes=50)


def test_error_zstd_problems() -> None:
    payload = struct.pack("<Q", 2) + b"{}" + EMPTY_SECTION
    co = zstandard.ZstdCompressor().compressobj()
    unknown_size = co.compress(payload) + co.flush()
    bad(MAGIC + b"\x01" + unknown_size, "does not declare its decompressed size")
    bad(MAGIC + b"\x01" + b"not zstd at all", "no valid zstd frame header")
    good = encode_message("k", {"a": "b" * 500}, {})
    assert good[4] & FLAG_ZSTD
    bad(good[:-5], "corrupt or truncated")
    bad(good + b"junk", "corrupt or truncated")
    flipped = bytearray(good)
    flipped[-6] ^= 0x40
    bad(bytes(flipped), "corrupt")


def test_error_lying_zstd_header_is_rejected_without_allocating() -> None:
    header = bytearray(zstandard.ZstdCompressor().compress(b"x" * 100))
    # Frame header descriptor with an 8-byte content size field claiming 2**60 bytes.
    data = MAGIC + b"\x01" + bytes([0x28, 0xB5, 0x2F, 0xFD, 0xE0]) + struct.pack("<Q", 2**60) + bytes(header[6:])
    bad(data, "claims 1152921504606846976 bytes from only")


def test_error_tensor_section_problems() -> None:
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    bad(frame(GOOD_ENV, b""), "tensor section has no header length")
    bad(frame(GOOD_ENV, struct.pack("<Q", 99) + b"{}"), "tensor header length says 99 bytes")
    bad(frame(GOOD_ENV, section([1])), "tensor header must be a JSON object")
    bad(frame(GOOD_ENV, section({"a": {**f32, "dtype": "F99"}}, bytes(8))), "dtype 'F99' is not one Interlace sends")
    bad(frame(GOOD_ENV, section({"a": {**f32, "shape": [3]}}, bytes(8))), "8 bytes do not match shape")
    bad(frame(GOOD_ENV, section({"a": {**f32, "shape": [-2]}}, bytes(8))), "shape must be a list of non-negative")
    bad(frame(GOOD_ENV, section({"a": {**f32, "data_offsets": [0, 16]}}, bytes(8))), "do not fit in 8 data bytes")
    bad(frame(GOOD_ENV, section({"a": {**f32, "extra": 1}}, bytes(8))), "header entry must have exactly")
    bad(frame(GOOD_ENV, section({"a": f32, "b": f32}, bytes(8))), "overlap or leave gaps")
    bad(frame(GOOD_ENV, section({"a": f32}, bytes(12))), "4 stray bytes")
    bad(frame(GOOD_ENV, section({"__metadata__": {"a": 1}})), "__metadata__ must map str to str")
    bad(frame(GOOD_ENV, section({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02")),
        "bool tensor 'b' holds bytes other than 0 and 1")


def test_error_raw_dtype_specs() -> None:
    u8 = {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}
    sec = section({"c": u8}, bytes(16))
    raw = lambda spec: frame({**GOOD_ENV, "raw": {"c": spec}}, sec)  # noqa: E731
    assert decode_message(raw({"dtype": "complex128", "shape": [1]})).tensors["c"].dtype == torch.complex128
    bad(raw({"dtype": "complex256", "shape": [1]}), "dtype 'complex256' is unknown here")
    bad(raw({"dtype": "complex128", "shape": [2]}), "16 bytes do not match shape")
    bad(raw({"dtype": "complex128"}), r"expected \{'dtype', 'shape'\}")
    bad(frame({**GOOD_ENV, "raw": {"zz": {"dtype": "complex128", "shape": [1]}}}, sec), "'zz' is listed .* but missing")
    bad(frame({**GOOD_ENV, "raw": []}, sec), "'raw' must be a JSON object")


# ------------------------------------------------------------------------ encoding errors


def test_encoding_errors_name_the_problem_and_the_fix() -> None:
    sparse = torch.eye(2).to_sparse()
    with pytest.raises(UnsupportedValueError, match=r"tensor 's'.*call .to_dense\(\)"):
        encode_message("k", {}, {"s": sparse})
    with pytest.raises(UnsupportedValueError, match="meta tensors have no data"):
        encode_message("k", {}, {"m": torch.empty(2, device="meta")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated, still supported
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(UnsupportedValueError, match=r"call .dequantize\(\)"):
        encode_message("k", {}, {"q": q})
    with pytest.raises(UnsupportedValueError, match="numpy dtype object"):
        encode_message("k", {}, {"o": np.array([object()])})
    with pytest.raises(UnsupportedValueError, match="expected a torch.Tensor or numpy.ndarray, got list"):
        encode_message("k", {}, {"l": [1]})  # type: ignore[dict-item]
    with pytest.raises(UnsupportedValueError, match="message body is not plain JSON.*ValueEncoder"):
        encode_message("k", {"t": torch.ones(1)}, {})
    with pytest.raises(UnsupportedValueError, match="not plain JSON"):
        encode_message("k", {"x": float("nan")}, {})
    with pytest.raises(ValueError, match="__metadata__"):
        encode_message("k", {}, {"__metadata__": torch.ones(1)})
    with pytest.raises(ValueError, match="kind must be a non-empty str"):
        encode_message("", {}, {})
    with pytest.raises(TypeError, match="body must be a dict"):
        encode_message("k", [], {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level must be"):
        encode_message("k", {}, {}, level=99)


# ------------------------------------------------------------------------- fuzzing


def only_wire_errors(data: bytes) -> None:
    try:
        msg = decode_message(data, max_decompressed_bytes=1 << 22)
    except WireFormatError:
        return
    assert isinstance(msg, Message)


SAMPLES = [
    encode_message("k", {"a": [1, "x"], "b": {"c": None}}, {"t": torch.arange(6.0).reshape(2, 3),
                                                          "c": torch.ones(2, dtype=torch.complex128),
                                                          "b": torch.tensor([True, False])},
                   compress=compress, min_saving=0)
    for compress in (False, True)
]


@FAST
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    only_wire_errors(data)
    only_wire_errors(MAGIC + b"\x00" + data)
    only_wire_errors(MAGIC + b"\x01" + data)


@FAST
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_truncated(sample: bytes, data: st.DataObject) -> None:
    only_wire_errors(sample[: data.draw(st.integers(0, len(sample) - 1))])


@FAST
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_bit_flips(sample: bytes, data: st.DataObject) -> None:
    corrupted = bytearray(sample)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(sample) - 1))
        corrupted[i] ^= 1 << data.draw(st.integers(0, 7))
    only_wire_errors(bytes(corrupted))


def test_every_truncation_and_single_bit_flip_of_a_small_message() -> None:
    sample = encode_message("k", {"a": 1}, {"t": torch.tensor([1.0, 2.0])}, compress=False)
    for i in range(len(sample)):
        only_wire_errors(sample[:i])
        for bit in range(8):
            corrupted = bytearray(sample)
            corrupted[i] ^= 1 << bit
            only_wire_errors(bytes(corrupted))
