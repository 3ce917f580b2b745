"""Errors: out-of-order access fails at the access, missing modules are named, user errors
keep their type and a traceback that points at the user's own lines."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
import torch

import interlace
from engine_helpers import line_of

THIS_FILE = __file__




def _user_frames(tb: Any) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(tb) if f.filename == THIS_FILE]


def test_out_of_order_raises_at_the_access(gpt2: interlace.LanguageModel, counter: Any) -> None:
    inner = gpt2._module
    later = counter(inner.transformer.h[3])
    head = counter(inner.lm_head)
    with pytest.raises(interlace.OutOfOrderError) as info:
        with gpt2.trace("Hello world"):
            late = gpt2.transformer.h[2].output.save()
            early = gpt2.transformer.h[0].output  # ACCESS-OUT-OF-ORDER
            reached = interlace.save(True)
    # The forward did not go on past the module where the error surfaced.
    assert later.calls == 0 and head.calls == 0
    message = str(info.value)
    assert "model.transformer.h.0" in message
    line = line_of(THIS_FILE, "# ACCESS-OUT-OF-ORDER")
    assert f"{THIS_FILE}:{line}" in message
    frames = _user_frames(info.value.__traceback__)
    assert frames[-1].lineno == line  # the last user frame is the access line
    assert "late" in locals()  # saved before the error: kept
    assert "reached" not in locals()  # statements after the access did not run


def test_out_of_order_input_after_output(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(interlace.OutOfOrderError, match=r"model\.layer1\.input"):
        with mlp_model.trace(tiny_input):
            mlp_model.layer1.output
            mlp_model.layer1.input


def test_out_of_order_is_a_missed_provider_error(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(interlace.MissedProviderError):
        with mlp_model.trace(tiny_input):
            mlp_model.layer2.output
            mlp_model.layer1.output


def test_other_invokes_may_access_in_any_order(gpt2: interlace.LanguageModel) -> None:
    with gpt2.trace() as tracer:
        with tracer.invoke("Hello"):
            late = gpt2.transformer.h[3].output.save()
        with tracer.invoke("x y"):
            early = gpt2.transformer.h[0].output.save()
    # Each invoke got its own prompt's values (compared with separate plain traces).
    with gpt2.trace("Hello"):
        late_alone = gpt2.transformer.h[3].output.save()
    with gpt2.trace("x y"):
        early_alone = gpt2.transformer.h[0].output.save()
    n_late, n_early = late_alone.shape[1], early_alone.shape[1]
    assert torch.allclose(late[:, -n_late:], late_alone, atol=1e-5)
    assert torch.allclose(early[:, -n_early:], early_alone, atol=1e-5)


class _WithUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(5, 2)
        self.unused = torch.nn.Linear(5, 2)  # registered, never called by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_module_never_called_is_reported_with_its_path(tiny_input: torch.Tensor) -> None:
    model = interlace.NNsight(_WithUnused())
    with pytest.raises(interlace.ModuleNotCalledError, match=r"model\.unused") as info:
        with model.trace(tiny_input):
            used = model.used.output.save()
            model.unused.output  # NEVER-CALLED
    assert used.shape == (1, 2)
    assert _user_frames(info.value.__traceback__)[-1].lineno == line_of(THIS_FILE, "# NEVER-CALLED")


def test_module_under_a_skipped_parent_is_not_called(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(interlace.ModuleNotCalledError) as info:
        with gpt2.trace("Hello"):
            saved_before = gpt2.transformer.h[0].output.save()
            block = gpt2.transformer.h[1]
            block.skip(block.input)
            block.mlp.output  # never runs: its parent was skipped
    assert "model.transformer.h.1.mlp" in str(info.value)
    assert saved_before.shape[0] == 1


def test_user_exception_keeps_its_type_and_user_lines(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(KeyError, match="boom") as info:
        with mlp_model.trace(tiny_input):
            h = mlp_model.layer1.output
            {}["boom"]  # USER-RAISE
    frames = _user_frames(info.value.__traceback__)
    assert frames and frames[-1].lineno == line_of(THIS_FILE, "# USER-RAISE")
    assert frames[-1].line and "boom" in frames[-1].line


def _helper_that_fails(t: torch.Tensor) -> torch.Tensor:
    raise ValueError(f"bad shape {tuple(t.shape)}")  # HELPER-RAISE


def test_user_exception_in_a_called_helper_shows_both_lines(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="bad shape") as info:
        with mlp_model.trace(tiny_input):
            _helper_that_fails(mlp_model.layer1.output)  # CALLS-HELPER
    lines = [f.lineno for f in _user_frames(info.value.__traceback__)]
    assert lines[-2:] == [line_of(THIS_FILE, "# CALLS-HELPER"), line_of(THIS_FILE, "# HELPER-RAISE")]
    assert not any("greenlet" in f.filename for f in traceback.extract_tb(info.value.__traceback__))


def test_user_exception_in_an_invoke_keeps_type_and_line(gpt2: interlace.LanguageModel) -> None:
    with pytest.raises(ZeroDivisionError) as info:
        with gpt2.trace() as tracer:
            with tracer.invoke("Hello"):
                ok = gpt2.transformer.h[0].output.save()
            with tracer.invoke("x y"):
                gpt2.transformer.h[1].output
                1 / 0  # INVOKE-RAISE
    assert _user_frames(info.value.__traceback__)[-1].lineno == line_of(THIS_FILE, "# INVOKE-RAISE")
    assert ok.shape[0] == 1


# Torch records a C++ stack walk of at most 64 frames (after skipping one) for each of its C++
# errors; a walk that reaches a greenlet's base reads stale memory and can crash the process.
_TORCH_WALK = 66


def test_torch_cpp_errors_in_a_body_never_walk_past_its_greenlet(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    """A C++ error in a body (a bad index: the commonest user mistake) stays a Python error."""
    walks = []
    for _ in range(3):  # a new worker, then reused ones
        with mlp_model.trace(tiny_input):
            _ = 0  # a statement that cannot run inline: the body runs on a greenlet
            h = mlp_model.layer1.output
            walk = interlace.save(torch._C._get_cpp_backtrace(0, _TORCH_WALK))
        walks.append(walk)
        with pytest.raises(IndexError):
            with mlp_model.trace(tiny_input):
                _ = 0
                mlp_model.layer1.output[999]  # a C++ error, with its stack walk
    assert all("greenlet" not in walk for walk in walks), walks[0]
    # The check above can only fail if greenlet's frames show up by name: they do in a walk
    # from a greenlet whose starter still waits below it (safe to walk all the way).
    from greenlet import greenlet

    assert "g_initialstub" in greenlet(lambda: torch._C._get_cpp_backtrace(0, 200)).switch()


def test_a_worker_too_near_the_recursion_limit_to_descend_still_runs_bodies(
    mlp_model: interlace.NNsight, tiny_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from interlace.tracing import mediator

    monkeypatch.setattr(mediator, "_FLOOR_DEPTH", 10**6)  # every descent hits the limit
    monkeypatch.setattr(mediator._pool, "idle", [])  # so a new worker is made
    with mlp_model.trace(tiny_input):
        _ = 0
        h = mlp_model.layer1.output.save()
    assert h.shape[0] == 1


def test_error_in_the_model_from_a_bad_edit_propagates(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(RuntimeError):
        with mlp_model.trace(tiny_input):
            mlp_model.layer1.output = torch.zeros(1, 3)  # wrong width for layer2
            mlp_model.output.save()
    # the model is left clean and usable
    with mlp_model.trace(tiny_input):
        out = mlp_model.output.save()
    assert out.shape == (1, 2)


def test_module_access_outside_a_trace_is_a_clear_error(mlp_model: interlace.NNsight) -> None:
    with pytest.raises(interlace.TracingError, match="inside a traced block"):
        mlp_model.layer1.output


def test_invoke_inside_a_trace_with_input_is_an_error(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(interlace.TracingError, match="invoke"):
        with mlp_model.trace(tiny_input) as tracer:
            with tracer.invoke(tiny_input):
                pass


def test_trace_inside_a_running_trace_is_an_error(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(interlace.TracingError, match="already running"):
        with mlp_model.trace(tiny_input):
            h = mlp_model.layer1.output
            with mlp_model.trace(tiny_input):
                pass
    with mlp_model.trace(tiny_input):
        out = mlp_model.output.save()
    assert out.shape == (1, 2)
