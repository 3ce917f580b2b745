"""A body whose first act is reading a module's output starts when that value arrives.

`capture.first_output_read` finds such bodies; the interleaver then skips running the body
before the forward (a greenlet round trip). Nothing a user can see may change: values,
edits, errors and their lines, `tracer.stop()`.
"""

from __future__ import annotations


import pytest
import torch

import interlace
from interlace.tracing import interleaver as interleaver_module
from engine_helpers import line_of

THIS_FILE = __file__

# These tests are about bodies that run on a greenlet; bodies made only of inline statements
# bypass what they check (see test_engine_inline.py).
pytestmark = pytest.mark.usefixtures("greenlet_bodies")




@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each deferred start (the index of the module whose value started the body)."""
    seen: list[int] = []
    original = interleaver_module.Interleaver._start_body

    def recording(self: interleaver_module.Interleaver, mediator: interleaver_module.Mediator, value: object = None) -> object:
        if mediator.deferred:  # `start` puts bodies on workers the same way
            seen.append(mediator.current.idx if mediator.current is not None else -1)  # -1: not served
        return original(self, mediator, value)

    monkeypatch.setattr(interleaver_module.Interleaver, "_start_body", recording)
    return seen


def test_deferred_and_early_start_give_the_same_values_and_edits(
    mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor, starts: list[int]
) -> None:
    with mlp_model.trace(tiny_input):
        mlp_model.layer1.output[:] = 0  # first act: an edit of layer1's output
        out = mlp_model.layer2.output.save()
    assert starts  # the body started when layer1's output arrived
    starts.clear()
    with mlp_model.trace(tiny_input):
        _first = 0  # noqa: F841 - any other first statement: the body starts before the forward
        mlp_model.layer1.output[:] = 0
        again = mlp_model.layer2.output.save()
    assert not starts
    with torch.no_grad():
        expected = tiny_mlp.layer2(tiny_mlp.act(torch.zeros_like(tiny_mlp.layer1(tiny_input))))
    assert torch.equal(out, again) and torch.equal(out, expected)


def test_a_deferred_read_of_a_module_that_never_runs_fails_at_its_line(
    mlp_model: interlace.NNsight, tiny_input: torch.Tensor, starts: list[int]
) -> None:
    class Unused(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    mlp_model._module.layer1.add_module("unused", Unused())  # a Linear never calls it
    with pytest.raises(interlace.ModuleNotCalledError, match=r"model\.layer1\.unused") as info:
        with mlp_model.trace(tiny_input):
            never = mlp_model.layer1.unused.output.save()  # DEFERRED-NEVER
    assert starts
    frames = [(f.filename, f.lineno) for f in __import__("traceback").extract_tb(info.value.__traceback__)]
    assert (THIS_FILE, line_of(THIS_FILE, "# DEFERRED-NEVER")) in frames


def test_errors_and_stop_after_a_deferred_read(mlp_model: interlace.NNsight, tiny_input: torch.Tensor, starts: list[int]) -> None:
    with pytest.raises(AttributeError) as info:
        with mlp_model.trace(tiny_input):
            h = mlp_model.layer1.output.no_such_attribute  # DEFERRED-ERROR
    frames = [(f.filename, f.lineno) for f in __import__("traceback").extract_tb(info.value.__traceback__)]
    assert (THIS_FILE, line_of(THIS_FILE, "# DEFERRED-ERROR")) in frames

    with mlp_model.trace(tiny_input) as tracer:
        h = mlp_model.layer1.output.save()
        tracer.stop()
        after = mlp_model.layer2.output.save()  # noqa: F841 - never reached
    assert h.shape == (1, 10)
    with pytest.raises(UnboundLocalError, match="after"):  # saved but not reached: unbound, as in nnsight
        after.shape
    assert starts


def test_a_path_that_is_not_plain_modules_starts_the_body_first(
    mlp_model: interlace.NNsight, tiny_input: torch.Tensor, starts: list[int]
) -> None:
    holder = {"model": mlp_model}
    with mlp_model.trace(tiny_input):
        out = holder["model"].layer2.output.save()  # a subscript of a dict: not a plain path
    assert not starts and out.shape == (1, 2)


def test_a_comprehension_over_layers_starts_at_the_first_layer(gpt2: interlace.LanguageModel, starts: list[int]) -> None:
    prompt = "The Eiffel Tower is in"
    with gpt2.trace(prompt):
        outs = interlace.save([layer.output for layer in gpt2.transformer.h])
    assert starts == [gpt2._module_index(gpt2.transformer.h[0]._module)]
    starts.clear()
    with gpt2.trace(prompt):
        _first = 0  # noqa: F841 - starts before the forward
        again = interlace.save([layer.output for layer in gpt2.transformer.h])
    assert not starts
    assert len(outs) == len(again) == len(gpt2.transformer.h)
    for a, b in zip(outs, again):
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert torch.equal(a, b)


def test_a_call_on_a_plain_object_before_the_read_starts_the_body_first(
    mlp_model: interlace.NNsight, tiny_input: torch.Tensor, starts: list[int]
) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.seen: list[object] = []

        def keep(self, value: object) -> object:
            self.seen.append(value)
            return value

    recorder = Recorder()
    with mlp_model.trace(tiny_input):
        h = recorder.keep(mlp_model.layer1.output)  # `recorder.keep` is not a module attribute
    assert not starts and len(recorder.seen) == 1
