"""The local-block conversation's codecs: values both ways, the client's messages, and the
WebSocket frame a block's final message may ride. Property-based: whatever a peer sends either
decodes to what was encoded or is refused with the codec's own error, never anything else."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interlace.contract.errors import WireFormatError
from interlace.contract.http import local_frame, parse_local_frame
from interlace.contract.local_block import (
    CATEGORY_RAISED,
    BlockDone,
    BlockFailed,
    LocalBlockSpec,
    ReadRequest,
    UnsendableLocalValue,
    decode_local_values,
    encode_local_values,
    message_from_wire,
    message_to_wire,
)

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
names = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, plain, max_size=5))
def test_plain_values_round_trip_with_their_types(values):
    assert decode_local_values(encode_local_values(values, line=3, direction="up")) == values


def test_tensors_round_trip_bitwise_with_dtype_and_shape():
    values = {"h": torch.randn(2, 3, 5), "i": torch.arange(7), "b": torch.randn(4).to(torch.bfloat16)}
    back = decode_local_values(encode_local_values(values, line=1, direction="down"))
    for name, tensor in values.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


def test_a_value_the_codec_refuses_names_it_the_line_and_the_direction():
    with pytest.raises(UnsendableLocalValue, match=r"`handle`, assigned in the local block at line 12"):
        encode_local_values({"handle": object()}, line=12, direction="up")
    with pytest.raises(UnsendableLocalValue, match=r"`handle`, read by the local block at line 12"):
        encode_local_values({"handle": object()}, line=12, direction="down")


def test_the_size_limit_is_the_policy_s():
    with pytest.raises(UnsendableLocalValue, match="over the server's"):
        encode_local_values({"big": torch.randn(100_000)}, line=1, direction="up", max_bytes=10_000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_by_the_codec_only(data):
    try:
        decode_local_values(data)
    except WireFormatError:
        pass


@pytest.mark.parametrize("message", [
    ReadRequest("model.layers.0", "output"),
    ReadRequest("transformer.h.1.attn", "inputs"),
    BlockDone(b"\x00\x01bytes"),
    BlockFailed("Traceback ...\nZeroDivisionError: division by zero", CATEGORY_RAISED),
])
def test_messages_round_trip_through_the_wire_and_the_websocket_frame(message):
    header, body = message_to_wire(message)
    assert message_from_wire(header, body) == message
    exchange, frame_header, frame_body = parse_local_frame(local_frame(7, header, body))
    assert exchange == 7 and message_from_wire(frame_header, frame_body) == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_frames_are_refused_with_value_error_only(frame):
    try:
        exchange, header, body = parse_local_frame(frame)
        message_from_wire(header, body)
    except (ValueError, WireFormatError):
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "path", "kind", "text", "category", "x"]),
                       st.none() | st.integers() | st.text(max_size=30), max_size=5))
def test_arbitrary_headers_decode_to_a_checked_message_or_are_refused(header):
    try:
        message = message_from_wire(header, b"")
    except WireFormatError:
        return
    if isinstance(message, ReadRequest):
        assert message.kind in ("output", "input", "inputs") and isinstance(message.path, str)
    if isinstance(message, BlockFailed):
        assert message.category.startswith("local-block")


def test_a_frame_without_its_exchange_number_is_refused():
    head = json.dumps({"op": "done"}).encode()
    with pytest.raises(ValueError, match="exchange"):
        parse_local_frame(len(head).to_bytes(4, "big") + head)


@pytest.mark.parametrize("bad", ["__class__", "_private", "a b", "1x", ""])
def test_a_spec_takes_plain_identifiers_only(bad):
    with pytest.raises(ValueError):
        LocalBlockSpec(line=1, reads=(bad,))
