"""Value codec: exact round trips of nested values, clear errors, strict decoding."""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import math
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from interlace.contract.errors import UnsupportedValueError, WireFormatError
from interlace.contract.values.encode import ClassRegistry, ValueEncoder
from interlace.contract.values.decode import ValueDecoder
from interlace.contract.wire.decode import decode_message
from interlace.contract.wire.encode import encode_message

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass
class Point:
    x: Any
    y: Any = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Frozen:
    a: Any

    def __post_init__(self) -> None:
        raise AssertionError("decoding must not run __post_init__")


class Color(enum.Enum):
    RED = 1
    GREEN = "g"
    BLUE = (1, 2)


class Perm(enum.IntFlag):
    R = 4
    W = 2


class NotData:
    pass


REGISTRY = ClassRegistry()
for _cls in (Point, Frozen, Color, Perm, NotData):
    REGISTRY.register(_cls)


def round_trip(value: Any, extension: Any = REGISTRY) -> Any:
    """Python -> nodes -> bytes -> nodes -> Python, the way a request travels."""
    encoder = ValueEncoder(extension)
    node = encoder.encode(value)
    msg = decode_message(encode_message("test", {"v": node}, encoder.tensors))
    return ValueDecoder(msg.tensors, extension).decode(msg.body["v"])


def float_key(x: float) -> str:
    return struct.pack(">d", x).hex()  # bits: tells -0.0 from 0.0 and NaNs apart


def canon(v: Any) -> Any:
    """A comparable form that is exact about types, float bits, tensor and array bytes."""
    t = type(v)
    if v is None or t in (bool, int, str, bytes, bytearray):
        return (t.__name__, bytes(v) if t is bytearray else v)
    if t is float:
        return ("float", float_key(v))
    if t is complex:
        return ("complex", float_key(v.real), float_key(v.imag))
    if t in (list, tuple):
        return (t.__name__, [canon(x) for x in v])
    if t in (dict, OrderedDict):
        return (t.__name__, [(canon(k), canon(x)) for k, x in v.items()])
    if t in (set, frozenset):
        return (t.__name__, sorted(repr(canon(x)) for x in v))
    if t in (slice, range):
        return (t.__name__, canon(v.start), canon(v.stop), canon(v.step))
    if v is ...:
        return ("ellipsis",)
    if isinstance(v, torch.Tensor):
        raw = bytes(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()) if v.numel() else b""
        return ("tensor", str(v.dtype), tuple(v.shape), raw, v.requires_grad)
    if t is np.ndarray:
        return ("ndarray", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, np.generic):
        return ("npscalar", t.__name__, v.dtype.str, v.tobytes())
    if t in (torch.dtype, torch.device, torch.Size):
        return (t.__name__, str(v))
    if isinstance(v, enum.Enum):
        return ("enum", t.__qualname__, canon(v.value))
    if dataclasses.is_dataclass(v):
        return ("dataclass", t.__qualname__, [(f.name, canon(getattr(v, f.name))) for f in dataclasses.fields(v)])
    raise AssertionError(f"canon: unexpected {t}")


def assert_same(a: Any, b: Any) -> None:
    assert canon(a) == canon(b)


# ---------------------------------------------------------------------------- strategies

TENSOR_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool,
    torch.complex64, torch.complex128, torch.complex32, torch.float8_e4m3fn, torch.float8_e5m2,
]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(TENSOR_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = math.prod(shape) * dtype.itemsize
    data = bytearray(draw(st.binary(min_size=n, max_size=n)))
    if dtype is torch.bool:
        data = bytearray(b & 1 for b in data)
    t = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    if dtype in (torch.float32, torch.float64) and draw(st.booleans()):
        t = t.clone().requires_grad_(True)
    return t


np_dtypes = hnp.scalar_dtypes() | hnp.byte_string_dtypes() | hnp.unicode_string_dtypes()
arrays = hnp.arrays(np_dtypes, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
np_scalars = hnp.arrays(hnp.scalar_dtypes(), ()).map(lambda a: a[()])

ints = st.integers() | st.integers(-(2**200), 2**200) | st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1])
floats = st.floats() | st.sampled_from([-0.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324])
texts = st.text(max_size=8) | st.sampled_from(["$t", "$", "\ud800", "\x00", "é"])
scalars = st.none() | st.booleans() | ints | floats | texts
hashables = scalars | st.binary(max_size=8) | st.complex_numbers() | st.sampled_from(
    [..., torch.float32, torch.bfloat16, Color.BLUE, Perm.R | Perm.W, torch.device("cuda:1")]
) | st.tuples(scalars, scalars) | st.frozensets(ints, max_size=3)
leaves = (
    hashables
    | st.binary(max_size=8).map(bytearray)
    | st.builds(slice, st.none() | ints, st.none() | ints, st.none() | ints)
    | st.builds(range, ints, ints, ints.filter(bool))
    | st.lists(st.integers(0, 10), max_size=4).map(torch.Size)
    | st.sampled_from([torch.device("cpu"), torch.device("meta"), torch.int8, torch.complex32])
    | tensors()
    | arrays
    | np_scalars
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(texts, children, max_size=4)
        | st.dictionaries(hashables, children, max_size=3)
        | st.dictionaries(st.text(max_size=3), children, max_size=3).map(OrderedDict)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.builds(Point, children, children)
        | st.builds(_frozen, children)
    )


def _frozen(a: Any) -> Frozen:
    obj = object.__new__(Frozen)
    object.__setattr__(obj, "a", a)  # bypasses the __post_init__ trap, as the decoder does
    return obj


values = st.recursive(leaves, containers, max_leaves=20)


# ---------------------------------------------------------------------------- round trips


@FAST
@given(values)
def test_nested_values_round_trip_exactly(value: Any) -> None:
    assert_same(value, round_trip(value))


@FAST
@given(tensors())
def test_tensors_of_every_dtype_round_trip_exactly(t: torch.Tensor) -> None:
    assert_same(t, round_trip(t))


@FAST
@given(arrays)
def test_numpy_arrays_round_trip_as_numpy(a: np.ndarray) -> None:
    out = round_trip(a)
    assert type(out) is np.ndarray
    assert_same(a, out)


def test_scalars_stand_for_themselves_and_specials_are_tagged() -> None:
    enc = ValueEncoder()
    assert enc.encode({"a": [1, 2.5, "x", None, True]}) == {
        "a": {"$t": "list", "items": [1, 2.5, "x", None, True]}
    }
    assert enc.encode(2**53) == 2**53
    assert enc.encode(2**53 + 1) == {"$t": "int", "v": "9007199254740993"}
    assert enc.encode(-0.0) == {"$t": "float", "v": "-0.0"}
    assert enc.encode(math.nan) == {"$t": "float", "v": "nan"}
    assert enc.encode(-math.inf) == {"$t": "float", "v": "-inf"}
    assert enc.encode({"$t": 1}) == {"$t": "dict", "items": [["$t", 1]]}
    assert enc.encode({1: 2}) == {"$t": "dict", "items": [[1, 2]]}


def test_nan_sign_and_payload_survive() -> None:
    odd_nan = struct.unpack(">d", bytes.fromhex("fff8000000000123"))[0]
    for x in (-math.nan, odd_nan, math.nan):
        assert float_key(round_trip(x)) == float_key(x)
        assert float_key(round_trip(complex(x, -0.0)).real) == float_key(x)


def test_shared_tensor_is_stored_once_and_decodes_to_one_object() -> None:
    t = torch.randn(3)
    a = np.arange(3)
    enc = ValueEncoder()
    node = enc.encode({"first": t, "again": [t, t], "view": t[1:], "arr": a, "arr2": a})
    assert len(enc.tensors) == 3  # t, the view t[1:], a
    msg = decode_message(encode_message("k", {"v": node}, enc.tensors))
    out = ValueDecoder(msg.tensors).decode(msg.body["v"])
    assert out["first"] is out["again"][0] is out["again"][1]
    assert out["arr"] is out["arr2"]
    assert torch.equal(out["view"], t[1:])


def test_several_encode_calls_share_one_table() -> None:
    t = torch.ones(2)
    enc = ValueEncoder()
    args, kwargs = enc.encode((t,)), enc.encode({"x": t})
    assert len(enc.tensors) == 1
    dec = ValueDecoder(enc.tensors)
    assert dec.decode(args)[0] is dec.decode(kwargs)["x"]


def test_dataclass_is_rebuilt_without_running_init() -> None:
    value = _frozen([Point(1, {"k": Color.GREEN})])
    out = round_trip(value)
    assert type(out) is Frozen and out.a == [Point(1, {"k": Color.GREEN})]


def test_flag_combinations_and_aliases() -> None:
    assert round_trip(Perm.R | Perm.W) is Perm.R | Perm.W
    assert round_trip([Color.BLUE])[0] is Color.BLUE


def test_extension_handles_functions_and_nested_values() -> None:
    def double(x: int) -> int:
        return 2 * x

    class Functions:
        def encode(self, value: Any, encoder: ValueEncoder) -> Any:
            if value is double:
                return {"$t": "x:fn", "name": "double", "defaults": encoder.encode((1, t), path=".defaults")}
            return NotImplemented

        def decode(self, node: dict[str, Any], decoder: ValueDecoder) -> Any:
            return ("fn", node["name"], decoder.decode(node["defaults"], path=".defaults"))

    t = torch.ones(2)
    out = round_trip({"f": double, "t": t}, Functions())
    assert out["f"][:2] == ("fn", "double") and out["f"][2][1] is out["t"]


def test_node_is_plain_json() -> None:
    enc = ValueEncoder(REGISTRY)
    node = enc.encode([Point(math.nan, b"\x00"), {1, 2}, slice(None), torch.Size([1])])
    assert json.loads(json.dumps(node, allow_nan=False)) == node


# ------------------------------------------------------------------------ encoding errors


def encode_error(value: Any, match: str, extension: Any = None, **kwargs: Any) -> str:
    with pytest.raises(UnsupportedValueError, match=match) as info:
        ValueEncoder(extension).encode(value, **kwargs)
    assert isinstance(info.value, TypeError)
    return str(info.value)


def test_error_unsupported_type_names_type_path_and_fix() -> None:
    msg = encode_error({"layers": [0, 1, NotData()]}, r"type tests?.*NotData at config\['layers'\]\[2\]", path="config")
    assert "convert it to a tensor, list or dict before the trace, or decorate its class with @interlace.remote" in msg
    encode_error([lambda: 0], r"type function at value\[0\]")
    encode_error({(1, 2): {3: object()}}, r"type object at value\[\(1, 2\)\]\[3\]")
    encode_error({1: 2, object(): 3}, r"at value<key <object object")


def test_error_subclasses_suggest_converting() -> None:
    Pair = collections.namedtuple("Pair", "a b")
    encode_error(Pair(1, 2), r"Pair at value.*convert it with tuple\(\.\.\.\)")
    encode_error(collections.defaultdict(list), r"defaultdict.*convert it with dict\(\.\.\.\)")
    encode_error(np.ma.masked_array([1]), r"MaskedArray.*np.asarray")


def test_error_dataclass_and_enum_without_extension() -> None:
    encode_error({"p": Point(1)}, r"at value\['p'\]: the dataclass class .*Point is not known to the receiver; "
                                  r"decorate the class with @interlace.remote")
    encode_error(Color.RED, "the enum class .*Color is not known to the receiver")


def test_error_cycles_and_depth() -> None:
    cyclic: list[Any] = [1]
    cyclic.append({"back": cyclic})
    encode_error(cyclic, r"at value\[1\]\['back'\]: it contains itself \(a reference cycle\)")
    p = Point(1)
    p.y = p
    encode_error(p, r"at value\.y: it contains itself", REGISTRY)
    deep: Any = 0
    for _ in range(250):
        deep = [deep]
    encode_error(deep, "nested more than 200 levels deep")
    shallow: Any = 0
    for _ in range(150):
        shallow = [shallow]
    assert round_trip(shallow) == shallow
    # Sharing without a cycle is fine (copied per use).
    shared = [1, 2]
    assert round_trip([shared, shared]) == [[1, 2], [1, 2]]


def test_error_bad_tensors_arrays_and_huge_ints() -> None:
    encode_error({"h": torch.empty(2, device="meta")}, r"at value\['h'\]: meta tensors have no data")
    encode_error([torch.eye(2).to_sparse()], r"at value\[0\]: .*call .to_dense\(\)")
    encode_error(np.array([object()]), "numpy dtype object holds objects")
    encode_error(np.zeros(2, dtype=[("a", "i4")]), "holds objects or structure")
    encode_error(10**5000, "more than 4300 digits")


# ------------------------------------------------------------------------ decoding errors


TABLE = {"t0": torch.arange(4, dtype=torch.uint8), "t1": torch.ones(2, dtype=torch.int64)}


def decode_error(node: Any, match: str, extension: Any = REGISTRY) -> None:
    with pytest.raises(WireFormatError, match=match):
        ValueDecoder(TABLE, extension).decode(node)


@pytest.mark.parametrize(
    "node, match",
    [
        ({"$t": "pickle", "v": "x"}, r"at value: unknown tag 'pickle'"),
        ({"$t": 5}, "tag 5 is not a string"),
        ({"$t": "tuple"}, r"tag 'tuple' needs fields \['items'\], got \[\]"),
        ({"$t": "ellipsis", "x": 1}, r"needs fields \[\], got \['x'\]"),
        ({"$t": "tensor", "name": "t1", "grad": 1}, "'grad' must be true or false"),
        ({"$t": "list", "items": {}}, "'items' must be list, got dict"),
        ({"$t": "tensor", "name": "t9"}, "tensor 't9' is not in the message's tensors"),
        ({"$t": "tensor", "name": "t1", "grad": True}, "of dtype torch.int64 cannot require grad"),
        ([1, 2], "a bare JSON array is not a node"),
        ({"$x": 1}, r"object key '\$x' starts with '\$'"),
        ({"a": {"$t": "list", "items": [1, {"$t": "nope"}]}}, r"at value\['a'\]\[1\]: unknown tag 'nope'"),
        ({"$t": "bytes", "b64": "a$=="}, "'b64' is not valid base64"),
        ({"$t": "bytes", "b64": 3}, "'b64' must be str, got int"),
        ({"$t": "int", "v": "1_000"}, "'v' must be a decimal integer"),
        ({"$t": "int", "v": "9" * 4301}, "at most 4300 digits"),
        ({"$t": "float", "v": "NaN"}, r"float 'v' must be one of"),
        ({"$t": "float", "v": "nan:0000000000000000"}, "is not a NaN bit pattern"),
        ({"$t": "complex", "re": 1, "im": 2.0}, "'re' must be float, got int"),
        ({"$t": "range", "start": 0, "stop": 1, "step": 0}, "range step must not be zero"),
        ({"$t": "range", "start": 0.5, "stop": 1, "step": 1}, "range start, stop and step must be ints"),
        ({"$t": "set", "items": [{"$t": "list", "items": []}]}, "set element of type list is not hashable"),
        ({"$t": "dict", "items": [[1]]}, r"dict items must be \[key, value\] pairs"),
        ({"$t": "dict", "items": [[{"a": 1}, 2]]}, "dict key of type dict is not hashable"),
        ({"$t": "ndarray", "name": "t0", "dtype": "|O", "shape": [4]}, "numpy dtype '|O' is not allowed"),
        ({"$t": "ndarray", "name": "t0", "dtype": "O8", "shape": [4]}, "is not allowed"),
        ({"$t": "ndarray", "name": "t0", "dtype": "<f4", "shape": [2]}, "4 bytes do not match shape"),
        ({"$t": "ndarray", "name": "t1", "dtype": "<f4", "shape": [4]}, "must be stored as 1-D uint8"),
        ({"$t": "ndarray", "name": "t0", "dtype": "<f4", "shape": [-1]}, "'shape' must be non-negative"),
        ({"$t": "npscalar", "dtype": "<f8", "b64": "AAAA"}, "needs 8 bytes, got 3"),
        ({"$t": "dtype", "name": "float128"}, "'float128' is not a torch dtype"),
        ({"$t": "device", "v": "cuda:0; rm -rf"}, "is not a device string"),
        ({"$t": "device", "v": "warp"}, "is not a valid torch device"),
        ({"$t": "size", "items": [1, 2.0]}, "torch.Size items must be 64-bit ints"),
        ({"$t": "x:class", "name": "os.system"}, "class 'os.system' is not registered here"),
        ({"$t": "dataclass", "cls": {"$t": "x:class", "name": f"{__name__}.NotData"}, "fields": {}},
         "must decode to a dataclass class"),
        ({"$t": "dataclass", "cls": {"$t": "x:class", "name": f"{__name__}.Point"}, "fields": {"x": 1}},
         r"has fields \['x', 'y'\], got \['x'\]"),
        ({"$t": "dataclass", "cls": "Point", "fields": {}}, "'cls' must decode to a dataclass class"),
        ({"$t": "enum", "cls": {"$t": "x:class", "name": f"{__name__}.Color"}, "value": 7},
         "7 is not a member of Color"),
        ({"$t": "enum", "cls": {"$t": "x:class", "name": f"{__name__}.Point"}, "value": 1},
         "'cls' must decode to an Enum class"),
    ],
)
def test_decoder_rejects(node: Any, match: str) -> None:
    decode_error(node, match)


def test_decoder_rejects_non_json_and_depth_and_missing_extension() -> None:
    decode_error(object(), "object is not a JSON node")
    decode_error(math.inf, "bare float inf is not JSON")
    decode_error((1, 2), "tuple is not a JSON node")
    deep: Any = 1
    for _ in range(300):
        deep = {"$t": "list", "items": [deep]}
    decode_error(deep, "nested more than 200 levels deep")
    decode_error({"$t": "x:fn"}, "tag 'x:fn' needs an extension, and this decoder has none", extension=None)


def test_decoder_wraps_extension_failures() -> None:
    class Broken:
        def encode(self, value: Any, encoder: Any) -> Any:
            return NotImplemented

        def decode(self, node: Any, decoder: Any) -> Any:
            raise KeyError("boom")

    decode_error({"a": {"$t": "x:y"}}, r"at value\['a'\]: the extension failed on tag 'x:y': KeyError", Broken())


# ------------------------------------------------------------------------- fuzzing

from interlace.contract.values.decode import _FIELDS  # noqa: E402

FIELD_NAMES = sorted({f for req, opt in _FIELDS.values() for f in req | opt} | {"$t", "name"})
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["t0", "t1", "t9", "<f4", "|b1", "|O", "<U2", "cpu", "float32", "nan", "-0.0",
                       "AAAA", "AA==", "x:class", f"{__name__}.Point", f"{__name__}.Color", "1"])
)


def json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    tagged = st.fixed_dictionaries(
        {"$t": st.sampled_from([*_FIELDS, "x:class", "x:other", "bogus"])},
        optional={f: children for f in FIELD_NAMES if f != "$t"},
    )
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=3), children, max_size=4)
        | tagged
    )


json_nodes = st.recursive(json_leaves, json_containers, max_leaves=25)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_nodes)
def test_fuzz_decoder_raises_only_wire_format_errors(node: Any) -> None:
    try:
        ValueDecoder(TABLE, REGISTRY).decode(node)
    except WireFormatError:
        pass
