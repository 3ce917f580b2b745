"""Strict decoding of requests and the analysis of what a body needs from outside."""

from __future__ import annotations

import json

import pytest
import torch

from interlace.contract.errors import WireFormatError
from interlace.contract.request import decode_request
from interlace.tracing.outer_names import free_names
from interlace.contract.wire.encode import encode_message


def _request(**changes):
    body = {
        "model_key": "m",
        "kind": "trace",
        "block": {"filename": "/u.py", "first_lineno": 3, "source": "with model.trace(x):\n    pass\n"},
    }
    body.update(changes)
    return encode_message("request", body, {})


def test_minimal_request_decodes():
    request, tensors = decode_request(_request())
    assert request.model_key == "m" and request.kind == "trace" and tensors == {}


@pytest.mark.parametrize(
    "changes,fragment",
    [
        ({"surprise": 1}, "surprise"),
        ({"kind": "exec"}, "kind"),
        ({"format": 99}, "format"),
        ({"objects": {"o0": {"kind": "function", "name": "f", "pickle": "..."}}}, "pickle"),
        ({"objects": {"o0": {"kind": "module", "name": "f"}}}, "kind"),
        ({"block": {"filename": "/u.py", "first_lineno": 0, "source": ""}}, "first_lineno"),
    ],
)
def test_unknown_fields_and_wrong_types_are_rejected(changes, fragment):
    with pytest.raises(WireFormatError, match=fragment):
        decode_request(_request(**changes))


def test_wrong_message_kind_is_rejected():
    with pytest.raises(WireFormatError):
        decode_request(encode_message("result", {"values": {}}, {}))


def _body(text):
    return "with model.trace(x):\n" + "".join("    " + line + "\n" for line in text.strip().splitlines())


@pytest.mark.parametrize(
    "body,needed",
    [
        ("h = model.layer.output.save()", {"model"}),
        ("k = k + 1", {"k"}),  # read before its own assignment
        ("k = 1\nh = k * scale", {"scale"}),
        ("if flag:\n    y = 1\nz = y", {"flag", "y"}),  # conditional assignment may not happen
        ("for i in items:\n    total = i\nz = i", {"items", "i"}),
        ("def f(a):\n    return a * w\nr = f(2)", {"w"}),
        ("with tracer.invoke(p):\n    h = m.out.save()\nz = h", {"tracer", "p", "m"}),
        ("import math\nz = math.pi", set()),
    ],
)
def test_free_names(body, needed):
    assert set(free_names(_body(body))) == needed


@pytest.mark.parametrize(
    "body,needed",
    [
        ("f = lambda a: a + b", {"b"}),
        ("xs = [i * c for i in rng]", {"c", "rng"}),
        ("d = {k: v for k, v in pairs}", {"pairs"}),
        ("def g(a, *rest, scale=s0):\n    t = a * scale\n    return t + u", {"s0", "u"}),
    ],
)
def test_free_names_respects_inner_scopes(body, needed):
    assert set(free_names(_body(body))) == needed
