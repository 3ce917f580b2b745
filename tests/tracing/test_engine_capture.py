"""Where a traced body can live: functions, methods, loops, closures, notebook-like cells.

Also: the per-call-site compile cache gives the right answer when the same site runs again
with other inputs, other variables, or (for a cell run again) other source.
"""

from __future__ import annotations

import linecache
from typing import Any, Iterator

import pytest
import torch

import interlace


@pytest.fixture
def cell() -> Iterator[Any]:
    """Run source as an IPython cell does: registered in linecache under a fake filename."""
    names: list[str] = []

    def run(src: str, ns: dict[str, Any], filename: str = "<ipython-input-3-abc>") -> dict[str, Any]:
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        names.append(filename)
        exec(compile(src, filename, "exec"), ns)
        return ns

    yield run
    for n in names:
        linecache.cache.pop(n, None)


def _expected(mlp: torch.nn.Sequential, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return mlp.layer2(mlp.act(mlp.layer1(x) * scale))


def _trace_in_helper(model: interlace.NNsight, x: torch.Tensor, scale: float) -> torch.Tensor:
    with model.trace(x):
        model.layer1.output = model.layer1.output * scale
        out = model.output.save()
    return out


def test_body_in_a_helper_function_called_with_different_arguments(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential) -> None:
    torch.manual_seed(1)
    for scale in (0.0, 1.0, -2.0):
        x = torch.rand(3, 5)
        assert torch.equal(_trace_in_helper(mlp_model, x, scale), _expected(tiny_mlp, x, scale))


def test_same_site_in_a_loop_with_other_inputs_and_values(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential) -> None:
    torch.manual_seed(2)
    inputs = [torch.rand(1, 5), torch.rand(4, 5), torch.rand(2, 5)]
    results = []
    for i, x in enumerate(inputs):
        scale = float(i) - 1
        with mlp_model.trace(x):
            mlp_model.layer1.output = mlp_model.layer1.output * scale
            out = mlp_model.output.save()
        results.append(out)
    for i, (x, out) in enumerate(zip(inputs, results)):
        assert torch.equal(out, _expected(tiny_mlp, x, float(i) - 1))


def test_loop_inside_the_body(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(tiny_input):
        outs = interlace.save({})
        for name in ("layer1", "act", "layer2"):
            outs[name] = getattr(mlp_model, name).output
    assert torch.equal(outs["layer2"], tiny_mlp(tiny_input))
    assert torch.equal(outs["act"], torch.relu(outs["layer1"]))


class _Probe:
    def __init__(self, model: interlace.NNsight) -> None:
        self.model = model
        self.scale = 3.0

    def run(self, x: torch.Tensor) -> torch.Tensor:
        with self.model.trace(x):
            self.model.layer1.output = self.model.layer1.output * self.scale
            out = self.model.output.save()
        return out


def test_body_in_a_method_reads_self(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    assert torch.equal(_Probe(mlp_model).run(tiny_input), _expected(tiny_mlp, tiny_input, 3.0))


def test_body_in_a_nested_function_reads_closure_variables(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    scale = 0.25

    def inner() -> torch.Tensor:
        with mlp_model.trace(tiny_input):
            mlp_model.layer1.output = mlp_model.layer1.output * scale
            out = mlp_model.output.save()
        return out

    assert torch.equal(inner(), _expected(tiny_mlp, tiny_input, 0.25))


def test_body_defines_and_calls_its_own_function(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(tiny_input):

        def halve(t: torch.Tensor) -> torch.Tensor:
            return t / 2

        mlp_model.layer1.output = halve(mlp_model.layer1.output)
        out = mlp_model.output.save()
    assert torch.equal(out, _expected(tiny_mlp, tiny_input, 0.5))


def test_body_calls_a_helper_that_reads_module_values(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    def grab(model: interlace.NNsight) -> torch.Tensor:
        return model.layer1.output.save()  # a real Tensor.save() outside the rewritten body

    with mlp_model.trace(tiny_input):
        h = grab(mlp_model)
    assert torch.equal(h, tiny_mlp.layer1(tiny_input))


def test_multi_line_with_header_and_one_line_body(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(
        tiny_input,
    ) as tracer:
        out = mlp_model.output.save()
    assert torch.equal(out, tiny_mlp(tiny_input))
    with mlp_model.trace(tiny_input): one = mlp_model.output.save()  # noqa: E701
    assert torch.equal(one, out)
    assert isinstance(tracer, interlace.tracing.tracer.InterleavingTracer)


def test_ipython_like_cell(cell: Any, mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    src = (
        "with model.trace(x):\n"
        "    model.layer1.output[:] = 0\n"
        "    tmp = model.layer2.input\n"
        "    out = model.output.save()\n"
    )
    ns = cell(src, {"model": mlp_model, "x": tiny_input})
    assert torch.equal(ns["out"], tiny_mlp.layer2(torch.zeros(1, 10)))
    with pytest.raises(interlace.NotSavedError, match="`tmp` was assigned in the trace at <ipython-input-.*>:3"):
        eval("tmp.shape", ns)  # not saved: the cell's namespace says so when it is used


def test_ipython_like_cell_with_a_function(cell: Any, mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    src = (
        "def probe(x, k):\n"
        "    with model.trace(x):\n"
        "        model.layer1.output = model.layer1.output * k\n"
        "        out = model.output.save()\n"
        "    return out\n"
        "a = probe(x, 2.0)\n"
        "b = probe(x, 0.0)\n"
    )
    ns = cell(src, {"model": mlp_model, "x": tiny_input}, filename="<ipython-input-4-def>")
    assert torch.equal(ns["a"], _expected(tiny_mlp, tiny_input, 2.0))
    assert torch.equal(ns["b"], _expected(tiny_mlp, tiny_input, 0.0))


def test_cell_run_again_with_new_source_under_the_same_name(cell: Any, mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    first = "with model.trace(x):\n    out = model.layer1.output.save()\n"
    second = "with model.trace(x):\n    out = model.layer2.output.save()\n"
    ns = cell(first, {"model": mlp_model, "x": tiny_input}, filename="<ipython-input-5-same>")
    assert ns["out"].shape == (1, 10)
    ns = cell(second, {"model": mlp_model, "x": tiny_input}, filename="<ipython-input-5-same>")
    assert torch.equal(ns["out"], tiny_mlp(tiny_input))


def test_no_source_says_so_and_what_to_do(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    src = "with model.trace(x):\n    out = model.output.save()\n"
    filename = "<not-registered-anywhere>"
    linecache.cache.pop(filename, None)
    ns: dict[str, Any] = {"model": mlp_model, "x": tiny_input}
    with pytest.raises(interlace.SourceNotFoundError) as info:
        exec(compile(src, filename, "exec"), ns)
    message = str(info.value)
    assert filename in message
    assert "source" in message and "linecache" in message  # says what is missing and the fix
    assert "out" not in ns


def test_no_source_in_a_function_built_by_exec(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    src = "def f(model, x):\n    with model.trace(x):\n        out = model.output.save()\n    return out\n"
    ns: dict[str, Any] = {}
    exec(compile(src, "<generated>", "exec"), ns)
    with pytest.raises(interlace.SourceNotFoundError, match="<generated>"):
        ns["f"](mlp_model, tiny_input)
    # and the model is not left in a running state
    with mlp_model.trace(tiny_input):
        ok = mlp_model.output.save()
    assert ok.shape == (1, 2)


def test_return_inside_body_is_rejected_with_advice(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    def bad() -> Any:
        with mlp_model.trace(tiny_input):
            return mlp_model.output.save()

    with pytest.raises(interlace.TracingError, match="return"):
        bad()


def test_as_name_of_the_tracer_item_in_a_multi_item_with(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with torch.no_grad() as nothing, mlp_model.trace(tiny_input) as tracer:
        out = mlp_model.output.save()
        same = interlace.save(tracer)
    assert nothing is None  # no_grad's own `as` target is untouched
    assert same is tracer
    assert isinstance(tracer, interlace.tracing.tracer.InterleavingTracer)
    assert torch.equal(out, tiny_mlp(tiny_input)) and not out.requires_grad


def test_tracer_is_bound_after_the_block(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(tiny_input) as tracer:
        pass
    assert isinstance(tracer, interlace.tracing.tracer.InterleavingTracer)


def test_a_debugger_or_coverage_tracer_keeps_running_after_a_trace(
    mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor
) -> None:
    import sys

    lines: list[int] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is here and event == "line":
            lines.append(frame.f_lineno)
        return tracer

    here = test_a_debugger_or_coverage_tracer_keeps_running_after_a_trace.__code__
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        sys._getframe().f_trace = tracer  # this frame too, as a debugger stepping here would
        with mlp_model.trace(tiny_input):
            out = mlp_model.layer2.output.save()
        after = sys._getframe().f_lineno  # TRACED-AFTER
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    assert torch.equal(out, tiny_mlp(tiny_input))
    assert after in lines  # the line after the block was still reported to the tracer
