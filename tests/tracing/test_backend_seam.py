"""The engine's seam (`tracing/backend.py`): a backend gets the captured block as data and
returns the values to bind; it never reaches into the tracer.

The values a backend returns are checked against raw PyTorch hooks, not against another trace.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import interlace
from interlace.backends import LocalSimulationBackend, RemoteBackend, select_backend
from interlace.tracing.backend import CapturedTrace, LocalBackend, TraceOutcome, forced_local, running_shipped_body
from interlace.tracing.namespace import MISSING

from engine_helpers import hooks


class Recording:
    """A user's backend: records what it was handed, then runs it as a local trace would."""

    def __init__(self) -> None:
        self.seen: list[CapturedTrace] = []

    def __call__(self, trace: CapturedTrace) -> dict[str, Any]:
        self.seen.append(trace)
        return LocalBackend()(trace)


def _layer1_output(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: list[torch.Tensor] = []
    with hooks((mlp.layer1, lambda m, a, o: out.append(o.detach().clone()))):
        mlp(x)
    return out[0]


def test_a_backend_is_handed_the_block_as_data(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    truth = _layer1_output(mlp_model._module, tiny_input)
    scale = 3.0
    backend = Recording()
    with mlp_model.trace(tiny_input, backend=backend) as tracer:
        h = mlp_model.layer1.output.save()
        scaled = (mlp_model.layer1.output * scale).save()
    assert torch.equal(h, truth) and torch.allclose(scaled, truth * 3.0)
    (trace,) = backend.seen
    assert trace.kind == "trace" and trace.args == (tiny_input,) and dict(trace.kwargs) == {}
    assert trace.model is mlp_model and trace.tracer is tracer
    assert trace.lookup("scale") == 3.0 and trace.lookup("tiny_input") is tiny_input
    assert trace.lookup("no_such_name_here") is MISSING
    assert "scale" in trace.block.loaded_names and trace.block.saved_names >= {"h", "scaled"}
    with pytest.raises(AttributeError):
        trace.kind = "session"  # type: ignore[misc]  # a frozen value


def test_a_backend_returns_data_and_the_tracer_binds_it(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    """Whatever a backend returns is what the caller gets: a stand-in backend that computes
    nothing binds its own values, and a `TraceOutcome` carries the job to `tracer.job`."""
    marker = torch.full((2,), 7.0)
    job = object()

    def stand_in(trace: CapturedTrace) -> TraceOutcome:
        return TraceOutcome({"h": marker}, job=job)

    with mlp_model.trace(tiny_input, backend=stand_in) as tracer:
        h = mlp_model.layer1.output.save()
    assert h is marker and tracer.job is job


def test_a_failing_backend_run_keeps_what_was_saved_before_the_failure(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    truth = _layer1_output(mlp_model._module, tiny_input)
    with pytest.raises(ZeroDivisionError):
        with mlp_model.trace(tiny_input, backend=Recording()):
            h = mlp_model.layer1.output.save()
            1 / 0
    assert torch.equal(h, truth)


def test_select_backend_is_the_one_place_a_backend_is_chosen(mlp_model: interlace.NNsight) -> None:
    assert type(select_backend(mlp_model, False, {})) is LocalBackend
    assert isinstance(select_backend(mlp_model, "local", {}), LocalSimulationBackend)
    kwargs: dict[str, Any] = {"blocking": False, "max_new_tokens": 2}
    backend = select_backend(mlp_model, True, kwargs)
    assert isinstance(backend, RemoteBackend) and backend.blocking is False
    assert kwargs == {"max_new_tokens": 2}  # the client's option is consumed, the model's stays
    with pytest.raises(ValueError, match="remote must be False, True or 'local'"):
        select_backend(mlp_model, "yes", {})


def test_inside_a_shipped_body_every_trace_runs_on_the_hosted_model(mlp_model: interlace.NNsight) -> None:
    assert not forced_local()
    with running_shipped_body():
        assert forced_local()
        kwargs: dict[str, Any] = {"blocking": False}
        assert type(select_backend(mlp_model, True, kwargs)) is LocalBackend and kwargs == {}
    assert not forced_local()
