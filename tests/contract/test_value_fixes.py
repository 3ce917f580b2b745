"""Suggested fixes fit the value that cannot be sent: an open file is read before the trace,
a generator listed, a lock left out of the body; never `torch.as_tensor(log_file)`."""

from __future__ import annotations

import ast
import collections
import decimal
import fractions
import functools
import io
import itertools
import json
import logging
import socket
import tempfile
import threading
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interlace
from interlace.contract.errors import UnsupportedValueError
from interlace.contract.fixes import fix_for_value, value_fix
from interlace.contract.values.encode import ValueEncoder


class Plain:  # a user class (readable source, not decorated)
    def __init__(self) -> None:
        self.x = 1


Pair = collections.namedtuple("Pair", "a b")


def _gen():
    yield 1


# name -> (factory of the value, kind, text the code fix must contain, text the hint must contain)
CASES: dict[str, tuple[Callable[[Any], Any], str, str, str]] = {
    "text-file": (lambda tmp: open(tmp / "log.txt", "w"), "file", "log_file_text = log_file.read()", "read it before the trace"),
    "binary-file": (lambda tmp: open(tmp / "w.bin", "wb"), "file", "log_file_bytes = log_file.read()", "read it before the trace"),
    "temp-file": (lambda tmp: tempfile.NamedTemporaryFile(dir=tmp), "file", "log_file.read()", "read it"),
    "string-io": (lambda tmp: io.StringIO("x"), "file", "log_file.read()", "read it"),
    "module": (lambda tmp: json, "module", "import json", "import it inside a @interlace.remote function"),
    "generator": (lambda tmp: _gen(), "iterator", "log_file = list(log_file)", "list(...)"),
    "map": (lambda tmp: map(str, [1]), "iterator", "list(log_file)", "list(...)"),
    "count": (lambda tmp: itertools.count(), "iterator", "list(log_file)", "list(...)"),
    "lock": (lambda tmp: threading.Lock(), "process-local", "don't use `log_file`", "don't use it in the trace body"),
    "rlock": (lambda tmp: threading.RLock(), "process-local", "don't use `log_file`", "don't use it"),
    "event": (lambda tmp: threading.Event(), "process-local", "don't use `log_file`", "don't use it"),
    "thread": (lambda tmp: threading.Thread(target=print), "process-local", "don't use `log_file`", "don't use it"),
    "socket": (lambda tmp: socket.socket(), "process-local", "don't use `log_file`", "don't use it"),
    "logger": (lambda tmp: logging.getLogger("x"), "logger", "print(", "print(...)"),
    "namedtuple": (lambda tmp: Pair(1, 2), "subclass", "log_file = tuple(log_file)", "tuple(...)"),
    "defaultdict": (lambda tmp: collections.defaultdict(list), "subclass", "dict(log_file)", "dict(...)"),
    "counter": (lambda tmp: collections.Counter("ab"), "subclass", "dict(log_file)", "dict(...)"),
    "deque": (lambda tmp: collections.deque([1]), "sequence", "list(log_file)", "list(...)"),
    "decimal": (lambda tmp: decimal.Decimal("1.5"), "number", "float(log_file)", "float(...)"),
    "fraction": (lambda tmp: fractions.Fraction(1, 3), "number", "float(log_file)", "float(...)"),
    "memoryview": (lambda tmp: memoryview(b"ab"), "bytes-like", "bytes(log_file)", "bytes(...)"),
    "dict-keys": (lambda tmp: {1: 2}.keys(), "set-like", "set(log_file)", "set(...)"),
    "partial": (lambda tmp: functools.partial(print, 1), "callable", "@remote", "@interlace.remote function"),
    "user-object": (lambda tmp: Plain(), "object", "class Plain", "decorate its class with @interlace.remote"),
    "masked-array": (lambda tmp: np.ma.masked_array([1.0]), "array-like", "torch.as_tensor(np.asarray(log_file))", "np.asarray"),
}


@pytest.fixture
def made(tmp_path, request):
    closers = []

    def make(factory):
        value = factory(tmp_path)
        if hasattr(value, "close"):
            closers.append(value)
        return value

    yield make
    for value in closers:
        value.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_kind_of_value_gets_a_fix_that_fits(case, made):
    factory, kind, code, hint = CASES[case]
    value = made(factory)
    fix = fix_for_value(value)
    assert fix.kind == kind
    text = fix.code("log_file")
    assert code in text, text
    assert hint in fix.hint, fix.hint
    ast.parse(text)  # the fix is code the user can paste
    if kind != "array-like":
        assert "as_tensor" not in text and "as_tensor" not in fix.hint


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoder_messages_carry_the_fitting_hint(case, made):
    factory, kind, _code, hint = CASES[case]
    value = made(factory)
    with pytest.raises(UnsupportedValueError) as info:
        ValueEncoder().encode({"cfg": [value]}, path="config")
    assert hint in str(info.value)
    assert info.value.value is value and info.value.path == "config['cfg'][0]"


_IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda s: s not in __import__("keyword").kwlist)
_EXPR = st.builds(lambda name, parts: name + "".join(parts), _IDENT,
                  st.lists(st.one_of(st.builds(lambda k: f"[{k!r}]", st.text(max_size=5)),
                                     st.builds(lambda i: f"[{i}]", st.integers(0, 99)),
                                     st.builds(lambda a: f".{a}", _IDENT)), max_size=3))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(CASES)), _EXPR)
def test_fixes_are_valid_code_for_any_spelling_of_the_value(case, expr):
    factory, _kind, _code, _hint = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        value = factory(Path(tmp))
        try:
            text = value_fix(expr, value)
        finally:
            if hasattr(value, "close"):
                value.close()
    ast.parse(text)
    assert expr in text


# -- through a trace: the problem's fix is the fitting one ---------------------------------------


LOG_FILE: Any = None


def log_line(x):
    LOG_FILE.write(str(x))
    return x


@pytest.fixture
def net():
    torch.manual_seed(0)
    return interlace.NNsight(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))


def test_open_file_in_the_body_is_told_to_read_it(net, tmp_path):
    log_file = open(tmp_path / "log.txt", "w")
    try:
        with pytest.raises(interlace.RemoteValidationError) as info:
            with net.trace(torch.ones(1, 3), remote="local"):
                log_file.write("x")
                out = net.output.save()  # noqa: F841
    finally:
        log_file.close()
    (problem,) = info.value.problems
    assert problem.category == "unserializable-variable"
    assert "log_file_text = log_file.read()" in problem.fix
    assert "as_tensor" not in problem.fix and "as_tensor" not in problem.message


def test_open_file_nested_in_a_value_names_its_path(net, tmp_path):
    config = {"scale": 2.0, "log": open(tmp_path / "log.txt", "w")}
    try:
        with pytest.raises(interlace.RemoteValidationError) as info:
            with net.trace(torch.ones(1, 3), remote="local"):
                out = (net.output * config["scale"]).save()  # noqa: F841
    finally:
        config["log"].close()
    (problem,) = info.value.problems
    assert "config_log_text = config['log'].read()" in problem.fix


def test_open_file_used_by_a_helper_is_told_to_read_it(net, tmp_path):
    global LOG_FILE
    LOG_FILE = open(tmp_path / "log.txt", "w")
    try:
        with pytest.raises(interlace.RemoteValidationError) as info:
            with net.trace(torch.ones(1, 3), remote="local"):
                out = log_line(net.output).save()  # noqa: F841
    finally:
        LOG_FILE.close()
        LOG_FILE = None
    (problem,) = info.value.problems
    assert "`log_line` uses `LOG_FILE`" in problem.message
    assert "LOG_FILE_text = LOG_FILE.read()" in problem.fix
    assert "@remote\ndef LOG_FILE" not in problem.fix  # the old advice made a function of the file
