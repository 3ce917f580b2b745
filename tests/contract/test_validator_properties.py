"""Property-based checks of the contract: the validator and the request decoder."""

from __future__ import annotations

import keyword

from hypothesis import given, settings, strategies as st

from interlace.contract.codecheck import check_source
from interlace.contract.errors import WireFormatError
from interlace.contract.policy import DEFAULT_POLICY, FORBIDDEN_CALLS
from interlace.contract.request import decode_request

identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))


@settings(max_examples=200, deadline=None)
@given(module=identifiers, line=st.integers(1, 5000))
def test_an_import_is_flagged_exactly_when_the_policy_refuses_it(module, line):
    source = f"with model.trace(x):\n    import {module}\n    h = model.layer.output.save()\n"
    problems = check_source(source, "/user.py", line, DEFAULT_POLICY)
    flagged = [p for p in problems if module in p.message]
    assert bool(flagged) == (not DEFAULT_POLICY.allows_module(module))
    assert all(p.lineno == line + 1 and p.filename == "/user.py" for p in flagged)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(FORBIDDEN_CALLS)), shadowed=st.booleans())
def test_forbidden_builtins_are_flagged_unless_the_body_defines_them(name, shadowed):
    define = f"    {name} = lambda *a: 0\n" if shadowed else ""
    source = f"with model.trace(x):\n{define}    y = {name}('1')\n"
    problems = check_source(source, "/user.py", 10, DEFAULT_POLICY)
    assert bool(problems) == (not shadowed)
    assert all(p.fix is not None for p in problems)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_crash_the_request_decoder(data):
    try:
        decode_request(data)
    except WireFormatError:
        pass
