"""Fuzzing the receiving end: the wire decoder and the validator take generated payloads and
source texts and answer each with a documented error (`WireFormatError`, `BadRequest`, a list of
`Problem`s), never a crash and never a hang.

The CI budget runs a few thousand examples per target; `INTERLACE_FUZZ_EXAMPLES=100000` runs
the acceptance count (10^5 per target; see the closing note of issue "Sandbox" for the time).
Examples come from three generators, so that they get past the first check: raw bytes,
mutations of valid payloads (bit flips, cuts, splices, changed lengths), and valid envelopes
around generated bodies and generated Python source.
"""

from __future__ import annotations

import json
import os
import random
import struct
from datetime import timedelta
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlace.contract.codecheck import check_source
from interlace.contract.errors import WireFormatError
from interlace.contract.policy import Policy
from interlace.contract.problems import Problem
from interlace.contract.request import BlockSpec, BuiltRequest, ObjectSpec, TraceRequest, decode_request, encode_request
from interlace.contract.validate import validate_request
from interlace.contract.values.encode import ValueEncoder
from interlace.contract.wire.encode import encode_message
from interlace.execution.errors import BadRequest
from interlace.execution.receive import prepare_payload

EXAMPLES = int(os.environ.get("INTERLACE_FUZZ_EXAMPLES", "1500"))
POLICY = Policy(max_upload_bytes=256 * 1024)  # small, so generated sizes reach the limit too
KEYS = ["m"]

# Generated source is often odd Python (`1_a`, `"\d"`): the parser's warnings are expected.
pytestmark = pytest.mark.filterwarnings("ignore::SyntaxWarning", "ignore::DeprecationWarning")

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # a hang is an example over 5 s (generous on a loaded machine)
    database=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
)


# -- seeds: valid payloads -----------------------------------------------------------------------

SOURCES = [
    "h = model.transformer.h[0].output.save()",
    "with model.trace('hi') as t:\n    out = model.lm_head.output[:, -1].save()",
    "for i, layer in enumerate(model.transformer.h):\n    layer.output[0][:] = 0\nx = getattr(model, 'lm_head').output.save()",
    "def f(a, *b, c=1, **d):\n    return [x * 2 for x in a if x]\nclass C:\n    y = 1\nz = f([1, 2]).save()",
    "import torch\nw = torch.nn.functional.softmax(model.lm_head.output, -1).save()",
    "x = ().__class__.__base__.__subclasses__()",
    "f'{model.__class__.__init__.__globals__}'",
    "getattr(model, '__cl' + 'ass__')",
    "try:\n    1/0\nexcept Exception as e:\n    tb = e.__traceback__.tb_frame.f_globals",
    "import os\nos.system('id')",
    "lambda: (yield)",
    "@torch.no_grad()\ndef g():\n    pass",
]


def _request(source: str, **fields) -> TraceRequest:
    return TraceRequest(model_key="m", kind="trace", block=BlockSpec(filename="job.py", first_lineno=1, source=source),
                        **fields)


def _seed_payloads() -> list[bytes]:
    enc = ValueEncoder()
    values = {"a": enc.encode([1, 2.5, "s", None, {"k": (1, 2)}]), "t": enc.encode(torch.arange(6.0).reshape(2, 3))}
    objects = {"f": ObjectSpec(kind="function", name="f", source="def f(x):\n    return x + 1\n")}
    out = []
    for i, source in enumerate(SOURCES):
        request = _request(source, variables=values if i % 2 else {}, objects=objects if i % 3 == 0 else {},
                           kwargs={"max_new_tokens": 3} if i % 4 == 0 else {}, rename={"transformer.h": "layers"})
        for compress in (False, True):
            out.append(encode_request(BuiltRequest(request, dict(enc.tensors), []), compress=compress))
    return out


SEEDS = _seed_payloads()


def _receive(payload: bytes) -> None:
    """The server's receipt: decode, options, model key, validation. Only BadRequest may leave."""
    try:
        prepare_payload(payload, POLICY, KEYS)
    except BadRequest as error:
        assert 400 <= error.status < 500 and error.message
    try:
        request, tensors = decode_request(payload, POLICY)
    except WireFormatError as error:
        assert str(error)
    else:
        assert isinstance(validate_request(request, POLICY, payload_size=len(payload)), list)


# -- generators ----------------------------------------------------------------------------------


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "splice", "length", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data[at:] = other[draw(st.integers(0, len(other) - 1)):]
        elif op == "length" and len(data) >= 8:  # a length prefix (the formats use 4- and 8-byte ones)
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, len(data) + 1]))
            pos = min(at, len(data) - width)
            data[pos:pos + width] = struct.pack("<I" if width == 4 else "<Q", value % (2 ** (8 * width)))
        elif op == "truncate":
            del data[at:]
    return bytes(data)


# Bodies and source texts are built by a seeded `random.Random` from one drawn seed: about 100
# times faster than composing hypothesis strategies (a recursive strategy costs ~50 ms an
# example), which is what makes 10^5 examples a matter of minutes. A failure names its seed.

_FIELDS = ["model_key", "kind", "args", "kwargs", "block", "variables", "objects", "model_refs", "remote_objects",
           "strict_remote", "source_modules", "rename", "format", "interlace_version", "python_version"]
_STRINGS = ["", "m", "trace", "session", "generate", "__class__", "x" * 300, "\x00", "\ud800", "transformer.h",
            "..", "/etc/passwd", "{}", "1e999", "-1", "layers", "tensor", "t0", "ref", "kind", "type", "value"]


def _json(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(10 if depth < 4 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63, -2**70, 10**30])
    if pick == 3:
        return rng.choice([0.0, -0.0, 1.5, 1e308, -1e-308])
    if pick in (4, 5):
        return rng.choice(_STRINGS)
    if pick in (6, 7):
        return [_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(_STRINGS): _json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _body(rng: random.Random) -> bytes:
    """A well-formed envelope around a body that is partly valid, partly generated."""
    body = _request(_source(rng)).model_dump(mode="json")
    for _ in range(rng.randrange(5)):
        body[rng.choice(_FIELDS)] = _json(rng)
    if rng.random() < 0.5:
        body["variables"] = {rng.choice(_STRINGS): _json(rng) for _ in range(rng.randrange(4))}
    tensors = {}
    if rng.random() < 0.5:
        dtype = rng.choice([torch.float32, torch.int64, torch.bool, torch.bfloat16])
        tensors[rng.choice(["t0", "t1", "x"])] = torch.zeros(rng.randrange(17), dtype=dtype)
    return encode_message("request", body, tensors, compress=rng.random() < 0.5)


_ATOMS = ["model", "x", "torch", "np", "h", "self", "getattr", "setattr", "type", "vars", "print", "__import__",
          "().__class__", "'a'", "b'\\x00'", "1", "1.5e308", "None", "...", "[]", "{}", "lambda: 0", "e", "f'{x!r}'",
          "model.transformer.h[0]", "'__cl' + 'ass__'", "object", "super()", "globals()", "__builtins__"]
_ATTRS = ["output", "input", "save", "__class__", "__base__", "__subclasses__", "__globals__", "__dict__", "_module",
          "f_back", "gi_frame", "tb_frame", "__reduce_ex__", "weight", "data", "numpy", "load", "hub", "ops", "_C",
          "register_forward_hook", "format", "mro", "__init__", "__getattribute__", "cr_frame", "__code__"]
_OPS = ["+", "-", "*", "/", "//", "%", "**", "@", "&", "|", "^", "<<", ">>", "and", "or", "==", "<", "is", "in"]
_IMPORTS = ["import os", "import torch", "from torch import load", "import numpy as np", "from interlace import CONFIG",
            "import sys", "from math import *", "global g", "del y", "yield 1", "await x", "async def a(): pass",
            "raise SystemExit", "import torch.hub", "from numpy import ctypeslib", "import builtins as b"]
_SHAPES = ["{}", "y = {}", "y = {}.save()", "def f(a=None):\n    return {}", "class C({}):\n    pass",
           "class C:\n    def __init_subclass__(cls): {}", "with {} as y:\n    pass", "for i in {}:\n    break",
           "@{}\ndef g():\n    pass", "try:\n    {}\nexcept Exception as err:\n    err.__traceback__",
           "while {}:\n    pass", "y = [{} for q in range(2)]", "y.attr = {}", "y[0] = {}"]
_JUNK = ["(" * 300, "-" * 5000 + "1", "\x00", "\t", "\\", "\ufeff", "'" * 3, "#", ":", "\r", "lambda", "**"]


def _expr(rng: random.Random, depth: int = 0) -> str:
    if depth > 4 or rng.random() < 0.3:
        return rng.choice(_ATOMS)
    inner = _expr(rng, depth + 1)
    pick = rng.randrange(8)
    if pick == 0:
        return f"{inner}.{rng.choice(_ATTRS)}"
    if pick == 1:
        return f"{inner}({', '.join(_expr(rng, depth + 1) for _ in range(rng.randrange(3)))})"
    if pick == 2:
        return f"{inner}[{_expr(rng, depth + 1)}]"
    if pick == 3:
        return f"({inner} {rng.choice(_OPS)} {_expr(rng, depth + 1)})"
    if pick == 4:
        return f"[{inner} for x in range(3)]"
    if pick == 5:
        return "f'{" + inner.replace("'", '"') + "}'"
    if pick == 6:
        return f"(lambda y: {inner})"
    return f"-{inner}"


def _source(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randrange(1, 7)):
        if rng.random() < 0.15:
            lines.append(rng.choice(_IMPORTS))
        else:
            lines.append(rng.choice(_SHAPES).format(_expr(rng)))
    text = "\n".join(lines)
    if rng.random() < 0.1:  # a damaged text too: odd characters, cuts, deep nesting
        at = rng.randrange(len(text) + 1)
        junk = rng.choice(_JUNK) if rng.random() < 0.7 else "".join(chr(rng.randrange(1, 0x3000)) for _ in range(4))
        text = text[:at] + junk + text[at + rng.randrange(3):]
    return text


_SEED = st.integers(0, 2**64 - 1)


# -- the targets ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048))
def test_raw_bytes(payload):
    _receive(payload)


@FUZZ
@given(mutated())
def test_mutated_valid_payloads(payload):
    _receive(payload)


@FUZZ
@given(_SEED)
def test_generated_bodies_in_valid_envelopes(seed):
    _receive(_body(random.Random(seed)))


@FUZZ
@given(_SEED)
def test_the_validator_on_generated_source(seed):
    source = _source(random.Random(seed))
    problems = check_source(source, "job.py", 1, POLICY)
    assert isinstance(problems, list) and all(isinstance(p, Problem) for p in problems)
    assert isinstance(validate_request(_request(source), POLICY), list)


@pytest.mark.parametrize("source", ["-" * 100_000 + "1", "x" + ".a" * 100_000, "a = " + "+".join(["1"] * 50_000),
                                    "lambda: " * 3000 + "0", "(" * 5000 + ")" * 5000, "x" + "[0]" * 20_000])
def test_code_nested_thousands_deep_is_a_problem_not_a_crash(source):
    """Found by this fuzzing: CPython's parser raised MemoryError or RecursionError out of the validator."""
    problems = check_source(source, "job.py", 1, POLICY)
    assert problems and problems[0].category == "invalid-request"
    payload = encode_request(BuiltRequest(_request(source), {}, []))
    with pytest.raises(BadRequest) as info:
        prepare_payload(payload, Policy(), KEYS)
    assert info.value.status == 422


def test_the_seeds_are_valid():
    """The mutations start from payloads the server accepts (else the fuzzing only hits the first check)."""
    accepted = 0
    for payload in SEEDS:
        try:
            prepare_payload(payload, POLICY, KEYS)
            accepted += 1
        except BadRequest as error:
            assert error.status == 422, error.message  # the attack sources: decoded, then refused
    assert accepted >= 4
    json.dumps(_request("x").model_dump(mode="json"))
