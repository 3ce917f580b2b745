"""Layer 1 of the sandbox: the validator refuses each escape before anything runs, with the
user's line and a fix; and the runtime guard refuses every `_` name (a property test)."""

from __future__ import annotations

import ast

import pytest
from hypothesis import given, settings, strategies as st

from interlace.contract.codecheck import check_source
from interlace.contract.guard import JobGuards, guard_module
from interlace.contract.guard.access import AccessRefused
from interlace.contract.policy import DEFAULT_POLICY, SAFE_DUNDER_METHODS, SAFE_DUNDER_READS


def _problems(body: str) -> list:
    source = "with model.trace(x):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    return check_source(source, "/user.py", 20, DEFAULT_POLICY)


@pytest.mark.parametrize("body,category", [
    ("c = x.__class__", "forbidden-attribute"),
    ("c = x.__class__.__base__.__subclasses__()", "forbidden-attribute"),
    ("g = (i for i in y)\nf = g.gi_frame.f_globals", "forbidden-attribute"),
    ("t = e.__traceback__.tb_frame", "forbidden-attribute"),
    ("s = '{0.__class__}'.format(x)", "forbidden-attribute"),
    ("m = x._module", "forbidden-attribute"),
    ("x.tofile('/tmp/a')", "forbidden-attribute"),
    ("m.load_state_dict(sd)", "forbidden-attribute"),
    ("m.register_forward_hook(f)", "forbidden-attribute"),
    ("v = vars(x)", "forbidden-builtin"),
    ("v = eval('1')", "forbidden-builtin"),
    ("f = open('/etc/passwd')", "file-io"),
    ("b = breakpoint()", "forbidden-builtin"),
    ("o = __import__('os')", "reserved-name"),
    ("__interlace_save__(x)", "reserved-name"),
    ("_getattr_ = getattr", "reserved-name"),
    ("import os", "file-io"),
    ("import transformers", "module-not-allowed"),
    ("import interlace.server", "module-not-allowed"),
    ("class A(metaclass=M):\n    pass", "forbidden-metaclass"),
    ("class A:\n    def __reduce__(self):\n        return (f, ())", "forbidden-dunder"),
    ("class A:\n    def __getattr__(self, n):\n        return 1", "forbidden-dunder"),
    ("class A:\n    def __del__(self):\n        pass", "forbidden-dunder"),
    ("class A:\n    def __init_subclass__(cls):\n        pass", "forbidden-dunder"),
])
def test_the_validator_refuses_each_escape_with_line_and_fix(body, category):
    problems = _problems(body)
    assert category in [p.category for p in problems], problems
    assert all(p.filename == "/user.py" and p.lineno >= 21 and p.fix for p in problems)


@pytest.mark.parametrize("body", [
    "class Probe:\n    def __init__(self, k):\n        super().__init__()\n        self.k = k\n    def __call__(self, h):\n        return h * self.k",
    "import torch\nh = torch.nn.functional.relu(x)",
    "import interlace\nh = interlace.save(x)",
    "n = type(x).__name__",
    "for _ in range(3):\n    pass",
    "out[:, -1] += v",
    "h.output[0][:] += 1",
])
def test_the_validator_keeps_research_code(body):
    assert _problems(body) == []


@pytest.mark.parametrize("source", [
    "x.__class__", "x.gi_frame", "x.f_globals", "_getattr_ = 1", "class A(metaclass=M): pass",
    "class A:\n    def __reduce__(self): pass", "x.format(1)",
])
def test_the_transformer_refuses_what_the_validator_refuses(source):
    with pytest.raises(SyntaxError):
        guard_module(ast.parse(source))


_GUARDS = JobGuards(DEFAULT_POLICY)


class _Thing:
    def __init__(self) -> None:
        self.value = 1


@settings(max_examples=2000, deadline=None)
@given(name=st.from_regex(r"_[A-Za-z0-9_]{0,20}", fullmatch=True))
def test_every_underscore_name_is_refused_at_run_time(name):
    if name in SAFE_DUNDER_READS:
        return  # plain strings (`__name__`), readable anywhere
    for obj in (_Thing(), _Thing, [1], "s", _problems, ast):
        with pytest.raises(AccessRefused):
            _GUARDS.getattr(obj, name)
        with pytest.raises(AccessRefused):
            _GUARDS.setattr(obj, name, 1)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(SAFE_DUNDER_METHODS)))
def test_safe_dunder_methods_only_on_super_and_shipped_classes(name):
    with pytest.raises(AccessRefused):
        _GUARDS.getattr([1], name)
