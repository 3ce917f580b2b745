"""nnsight's local-simulation tests (PR #573's `tests/test_local_simulation.py`, 30 tests) and
the function shapes of its serialization tests (§5.4-5.6 of nnsight-behavior.md), written the
way nnsight users write them, in both remote modes: `remote='local'` and a real server.

Changed from nnsight: the package name, the model (the tiny GPT-2: 128 hidden, not 32), and,
with transformers 5.x, a GPT-2 block returns a plain tensor, so nnsight's `h[0].output[0]`
(the hidden states of the old tuple) is `h[0].output` here. Values are compared with a plain
trace (`remote=False`) or with raw torch on the same weights, never with nnsight's strings.

Deliberate differences kept (docs/from-nnsight.md): under `remote='local'` the code that runs
is the shipped copy, so objects outside the block are not mutated (PR #573's probe tests read
`probe.linear.weight.grad` after the trace; here the gradient is saved instead), and code the
server would refuse is refused before anything is sent, as `RemoteValidationError`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import pytest
import torch

import interlace
from interlace import LanguageModel, RemoteValidationError
from interlace.remote import remote  # nnsight: `from nnsight.remote import remote`

HIDDEN = 128  # the tiny GPT-2's width (nnsight's tiny-random-gpt2 has 32)
PROMPT = "Hello world"


@pytest.fixture(scope="module")
def tiny_model(tiny_gpt2_path: Path) -> LanguageModel:
    return LanguageModel(str(tiny_gpt2_path), dispatch=True)


@pytest.fixture(params=["local", True], ids=["simulated", "server"])
def rmode(request: pytest.FixtureRequest) -> Any:
    """The two remote modes: every test here runs through the server's code path."""
    if request.param is True:
        request.getfixturevalue("use_server")
    return request.param


def _plain(model: LanguageModel, prompt: str = PROMPT) -> torch.Tensor:
    """h[0]'s output by a plain local trace: the truth the remote runs must equal."""
    with model.trace(prompt):
        out = model.transformer.h[0].output.save()
    return out


# --- basics -----------------------------------------------------------------------------------


@torch.no_grad()
def test_basic_trace(tiny_model, rmode):
    with tiny_model.trace(PROMPT, remote=rmode):
        hs = tiny_model.transformer.h[0].output.save()
    assert isinstance(hs, torch.Tensor) and hs.ndim == 3
    torch.testing.assert_close(hs, _plain(tiny_model))


@torch.no_grad()
def test_intervention(tiny_model, rmode):
    with tiny_model.trace(PROMPT, remote=rmode):
        tiny_model.transformer.h[0].output[:] = 1.0
        l1_out = tiny_model.transformer.h[0].output.save()
    assert torch.all(l1_out == 1.0)


@torch.no_grad()
def test_multiple_saves(tiny_model, rmode):
    with tiny_model.trace(PROMPT, remote=rmode):
        h0_out = tiny_model.transformer.h[0].output.save()
        h1_out = tiny_model.transformer.h[1].output.save()
    assert h0_out.ndim == 3 and h1_out.ndim == 3
    assert not torch.equal(h0_out, h1_out)


@torch.no_grad()
def test_empty_trace_body(tiny_model, rmode):
    with tiny_model.trace(PROMPT, remote=rmode):
        pass


# --- variables of every kind -------------------------------------------------------------------


@torch.no_grad()
def test_json_serializable_variables(tiny_model, rmode):
    multiplier = 2.0
    offset = 1
    config = {"scale": 0.5}
    values = [1, 2, 3]
    with tiny_model.trace(PROMPT, remote=rmode):
        out = tiny_model.transformer.h[0].output
        out[:] = out * multiplier * config["scale"] + offset + values[0]
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model) * 1.0 + 2)


@torch.no_grad()
def test_tensor_and_numpy_variables(tiny_model, rmode):
    shift = torch.arange(HIDDEN, dtype=torch.float32)
    scale = np.full((HIDDEN,), 0.5, dtype=np.float32)
    with tiny_model.trace(PROMPT, remote=rmode):
        out = tiny_model.transformer.h[0].output
        out[:] = out * torch.from_numpy(scale) + shift
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model) * 0.5 + shift)


@torch.no_grad()
def test_numpy_value_saved_and_returned(tiny_model, rmode):
    arr = np.array([3.0, 4.0])
    with tiny_model.trace(PROMPT, remote=rmode):
        norm = float(np.linalg.norm(arr))
        norm = interlace.save(norm)
    assert norm == 5.0


@torch.no_grad()
def test_nested_dict_variable(tiny_model, rmode):
    config = {"layer0": {"scale": 2.0, "offset": 1.0}, "layer1": {"scale": 0.5, "offset": 0.0}}
    with tiny_model.trace(PROMPT, remote=rmode):
        out = tiny_model.transformer.h[0].output
        out[:] = out * config["layer0"]["scale"] + config["layer0"]["offset"]
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model) * 2.0 + 1.0)


@torch.no_grad()
def test_different_tensor_dtypes_in_scope(tiny_model, rmode):
    float16_tensor = torch.ones(1, HIDDEN, dtype=torch.float16)
    int_tensor = torch.ones(1, HIDDEN, dtype=torch.int32)
    bf16 = torch.ones(2, dtype=torch.bfloat16)
    with tiny_model.trace(PROMPT, remote=rmode):
        dtypes = interlace.save([str(float16_tensor.dtype), str(int_tensor.dtype), str(bf16.dtype)])
        h0_out = tiny_model.transformer.h[0].output.save()
    assert dtypes == ["torch.float16", "torch.int32", "torch.bfloat16"]


# --- @remote functions and classes, lambdas ---------------------------------------------------


@torch.no_grad()
def test_remote_function(tiny_model, rmode):
    @remote
    def double_values(x):
        return x * 2

    with tiny_model.trace(PROMPT, remote=rmode):
        out = tiny_model.transformer.h[0].output
        tiny_model.transformer.h[0].output[:] = double_values(out)
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model) * 2)


@torch.no_grad()
def test_remote_class(tiny_model, rmode):
    @remote
    class Scaler:
        def __init__(self, factor):
            self.factor = factor

        def scale(self, x):
            return x * self.factor

    scaler = Scaler(3.0)
    with tiny_model.trace(PROMPT, remote=rmode):
        out = tiny_model.transformer.h[0].output
        tiny_model.transformer.h[0].output[:] = scaler.scale(out)
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model) * 3.0)


@torch.no_grad()
def test_simple_lambda(tiny_model, rmode):
    double = lambda x: x * 2  # noqa: E731
    with tiny_model.trace(PROMPT, remote=rmode):
        tiny_model.transformer.h[0].output[:] = double(tiny_model.transformer.h[0].output)
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model) * 2)


@torch.no_grad()
def test_lambda_with_capture(tiny_model, rmode):
    factor = 2.5
    scale = lambda x: x * factor  # noqa: E731
    with tiny_model.trace(PROMPT, remote=rmode):
        tiny_model.transformer.h[0].output[:] = scale(tiny_model.transformer.h[0].output)
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model) * 2.5)


@remote
class SentimentProbe(torch.nn.Module):
    """PR #573's probe: an `nn.Module` defined at module level, decorated."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 2)

    def forward(self, x):
        return self.linear(x)


def test_nn_module_probe_in_trace(tiny_model, rmode):
    torch.manual_seed(0)
    probe = SentimentProbe(HIDDEN)
    with tiny_model.trace("test input", remote=rmode):
        hidden = tiny_model.transformer.h[0].output[:, -1, :]
        result = probe(hidden).save()
    assert result.shape == (1, 2)
    with torch.no_grad():
        truth = probe(_plain(tiny_model, "test input")[:, -1, :])
    torch.testing.assert_close(result.detach(), truth)


def test_backward_pass_in_trace(tiny_model, rmode):
    import torch.nn.functional as F

    torch.manual_seed(0)
    probe = SentimentProbe(HIDDEN)
    with tiny_model.trace("test input", remote=rmode):
        hidden = tiny_model.transformer.h[0].output[:, -1, :]
        logits = probe(hidden)
        loss = F.cross_entropy(logits, torch.tensor([1]))
        loss.backward()  # a plain statement: runs autograd as usual
        loss_value = loss.save()
        weight_grad = probe.linear.weight.grad.save()  # the shipped copy's gradient
    assert loss_value.ndim == 0
    assert weight_grad.shape == (2, HIDDEN) and weight_grad.abs().sum() > 0


def test_session_with_multiple_traces_and_probe(tiny_model, rmode):
    torch.manual_seed(0)
    probe = SentimentProbe(HIDDEN)
    with tiny_model.session(remote=rmode):
        with tiny_model.trace("first input"):
            hidden = tiny_model.transformer.h[0].output[:, -1, :]
            logits1 = probe(hidden).save()
        with tiny_model.trace("second input"):
            hidden = tiny_model.transformer.h[0].output[:, -1, :]
            logits2 = probe(hidden).save()
    assert logits1.shape == logits2.shape == (1, 2)
    assert not torch.equal(logits1, logits2)


# --- verbose output -------------------------------------------------------------------------


@torch.no_grad()
def test_verbose_mode_output(tiny_model, capsys):
    def run_trace():
        my_variable = 42
        with tiny_model.trace(PROMPT, remote="local", verbose=True):
            x = my_variable + 1
            h0_out = tiny_model.transformer.h[0].output.save()
        return h0_out

    run_trace()
    out = capsys.readouterr().out
    assert "[LocalSimulation]" in out and "bytes" in out
    assert "my_variable" in out


# --- control flow, repetition, sessions -------------------------------------------------------


@torch.no_grad()
def test_conditional_in_trace(tiny_model, rmode):
    condition = True
    with tiny_model.trace(PROMPT, remote=rmode):
        if condition:
            h0_out = tiny_model.transformer.h[0].output.save()
        else:
            h1_out = tiny_model.transformer.h[1].output.save()
    assert isinstance(h0_out, torch.Tensor)
    with pytest.raises(UnboundLocalError):
        h1_out  # noqa: B018 - the branch not taken leaves it unbound, as in nnsight


@torch.no_grad()
def test_loop_in_trace(tiny_model, rmode):
    with tiny_model.trace(PROMPT, remote=rmode):
        for i in range(3):
            tiny_model.transformer.h[0].output[:, :, i] = float(i)
        h0_out = tiny_model.transformer.h[0].output.save()
    assert h0_out[0, 0, 0] == 0.0 and h0_out[0, 0, 1] == 1.0 and h0_out[0, 0, 2] == 2.0


@torch.no_grad()
def test_matches_local_execution(tiny_model, rmode):
    with tiny_model.trace(PROMPT):
        tiny_model.transformer.h[0].output[:] = 7.0
        normal_result = tiny_model.lm_head.output.save()
    with tiny_model.trace(PROMPT, remote=rmode):
        tiny_model.transformer.h[0].output[:] = 7.0
        remote_result = tiny_model.lm_head.output.save()
    torch.testing.assert_close(normal_result, remote_result)


@torch.no_grad()
def test_multiple_traces(tiny_model, rmode):
    results = []
    for i in range(3):
        with tiny_model.trace(PROMPT, remote=rmode):
            tiny_model.transformer.h[0].output[:] = float(i)
            result = tiny_model.transformer.h[0].output.save()
        results.append(result)
    assert [bool(torch.all(r == float(i))) for i, r in enumerate(results)] == [True] * 3


@torch.no_grad()
def test_session(tiny_model, rmode):
    with tiny_model.session(remote=rmode) as session:
        with tiny_model.trace(PROMPT):
            h0_out = tiny_model.transformer.h[0].output.save()
        with tiny_model.trace(PROMPT):
            h1_out = tiny_model.transformer.h[1].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model))
    assert h1_out.shape == h0_out.shape


# --- errors -----------------------------------------------------------------------------------


def test_undecorated_function_is_refused_with_strict_remote(tiny_model, rmode):
    def undecorated_function():
        return 42

    with pytest.raises(RemoteValidationError) as info:
        with tiny_model.trace(PROMPT, remote=rmode, strict_remote=True):
            result = undecorated_function()
            tiny_model.transformer.h[0].output[:] = result
    assert "undecorated_function" in str(info.value)


@torch.no_grad()
def test_undecorated_function_is_shipped_by_default(tiny_model, rmode):
    """PR #573's default (strict_remote=False) discovers undecorated functions by source."""

    def undecorated_function():
        return 42

    with tiny_model.trace(PROMPT, remote=rmode):
        tiny_model.transformer.h[0].output[:] = undecorated_function()
        h0_out = tiny_model.transformer.h[0].output.save()
    assert torch.all(h0_out == 42)


def test_catches_module_the_server_lacks(tiny_model, rmode):
    import subprocess

    with pytest.raises(RemoteValidationError) as info:
        with tiny_model.trace(PROMPT, remote=rmode):
            result = subprocess
            tiny_model.transformer.h[0].output.save()
    assert "subprocess" in str(info.value)


@torch.no_grad()
def test_error_does_not_break_subsequent_traces(tiny_model, rmode):
    import subprocess

    try:
        with tiny_model.trace(PROMPT, remote=rmode):
            result = subprocess.run
            tiny_model.transformer.h[0].output.save()
    except RemoteValidationError:
        pass
    with tiny_model.trace(PROMPT, remote=rmode):
        h0_out = tiny_model.transformer.h[0].output.save()
    torch.testing.assert_close(h0_out, _plain(tiny_model))


def test_payload_size_and_backend(tiny_model):
    from interlace.backends import LocalSimulationBackend

    backend = LocalSimulationBackend(tiny_model, verbose=False)
    assert backend.last_payload_size == 0 and backend.get_last_payload() is None
    with tiny_model.trace(PROMPT, backend=backend):
        h0_out = tiny_model.transformer.h[0].output.save()
    assert backend.last_payload_size > 0
    assert len(backend.get_last_payload()) == backend.last_payload_size
    torch.testing.assert_close(h0_out, _plain(tiny_model))


# --- function shapes that ship by source (§5.4-5.6) --------------------------------------------


def _make_adder(n):
    def add(x):
        return x + n

    return add


def _make_nested(a):
    def outer(b):
        def inner(x):
            return x * a + b

        return inner

    return outer


def _with_defaults(x, scale=2.0, shift=(1.0, 2.0), fn=lambda v: v * 0 + 1):
    return x * scale + shift[0] + fn(x)


def _comprehension(xs):
    x = 100  # shadowed by the comprehension variable
    return [x * 2 for x in xs] + [x]


def _imports_inside(x):
    import math as m
    from functools import reduce

    return reduce(lambda a, b: a + b, [x, x]) * m.sqrt(4.0)


def _star_args(*args, **kwargs):
    return sum(args) + sum(kwargs.values())


def _recursive(n):
    return 1 if n <= 1 else n * _recursive(n - 1)


def _uses_other(x):
    return _recursive(3) * x


def _annotated(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """A docstring and annotations survive."""
    return x * k


@dataclasses.dataclass
class _Config:
    scale: float = 2.0
    layers: list = dataclasses.field(default_factory=lambda: [0, 1])
    name: Optional[str] = None
    KIND: ClassVar[str] = "cfg"

    def factor(self) -> float:
        return self.scale * len(self.layers)


@dataclasses.dataclass(frozen=True)
class _Frozen:
    a: int
    b: int = 3

    def __post_init__(self):
        if self.a < 0:
            raise ValueError("a must be >= 0")


@dataclasses.dataclass
class _Outer:
    inner: _Frozen
    items: list


@torch.no_grad()
def test_closures_nested_and_returned(tiny_model, rmode):
    add3 = _make_adder(3.0)
    inner = _make_nested(2.0)(1.0)
    counter = _make_nested(0.0)  # a closure returned by a closure
    with tiny_model.trace(PROMPT, remote=rmode):
        h = tiny_model.transformer.h[0].output
        got = interlace.save([float(add3(h).sum() - h.sum()) / h.numel(), float(inner(torch.ones(1))[0]),
                              float(counter(5.0)(torch.ones(1))[0])])
    assert got == [pytest.approx(3.0, abs=1e-3), 3.0, 5.0]


@torch.no_grad()
def test_defaults_comprehensions_imports_and_star_args(tiny_model, rmode):
    with tiny_model.trace(PROMPT, remote=rmode):
        h = tiny_model.transformer.h[0].output
        d = _with_defaults(torch.zeros(2))
        got = interlace.save([d.tolist(), _comprehension([1, 2]), float(_imports_inside(torch.tensor(1.5))),
                              _star_args(1, 2, 3, a=4, b=5), _uses_other(2), float(_annotated(torch.tensor(2.0))),
                              _annotated.__doc__, math.floor(float(h[0, 0, 0]))])
    assert got[:7] == [[2.0, 2.0], [2, 4, 100], 6.0, 15, 12, 4.0, "A docstring and annotations survive."]


@torch.no_grad()
def test_dataclasses_classes_and_instances(tiny_model, rmode):
    cfg = _Config(scale=0.5, name="probe")
    frozen = _Frozen(1)
    outer = _Outer(inner=_Frozen(2, 4), items=[_Frozen(5)])
    with tiny_model.trace(PROMPT, remote=rmode):
        h = tiny_model.transformer.h[0].output
        made = _Config()
        got = interlace.save([cfg.factor(), cfg.name, cfg.KIND, frozen.a + frozen.b, outer.inner.b,
                              outer.items[0].a, made.factor(), made.layers, cfg == _Config(0.5, [0, 1], "probe")])
        tiny_model.transformer.h[0].output[:] = h * cfg.factor()
        h0 = tiny_model.transformer.h[0].output.save()
    assert got == [1.0, "probe", "cfg", 4, 4, 5, 4.0, [0, 1], True]
    torch.testing.assert_close(h0, _plain(tiny_model) * 1.0)


def test_dataclass_post_init_runs_where_the_body_runs(tiny_model, rmode):
    with pytest.raises((ValueError, interlace.RemoteException), match="a must be >= 0"):
        with tiny_model.trace(PROMPT, remote=rmode):
            h = tiny_model.transformer.h[0].output
            bad = _Frozen(-1)
