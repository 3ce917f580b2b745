"""A finished trace lets go of everything it does not return, at once.

Reference cycles (interleaver <-> mediators, tracer <-> the caller's frame, the trace body's
namespace <-> the tracer) would keep a run's unsaved activations alive until Python's cycle
collector happens to run, which on a large model is gigabytes held for no reason.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from typing import Any, Callable, Iterator

import pytest
import torch

import interlace


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _cycle_garbage(run: Callable[[], Any]) -> Counter[str]:
    """Types of the objects `run` left in reference cycles (found with DEBUG_SAVEALL)."""
    run()  # warm caches first, so only the run itself is measured
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        return Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_unsaved_activation_is_freed_when_the_trace_ends(gpt2: interlace.LanguageModel, no_automatic_gc: None) -> None:
    refs: list[weakref.ref[torch.Tensor]] = []
    keep = weakref.ref  # read by the body: names it uses come from this frame

    with gpt2.trace("The Eiffel Tower is in") as tracer:
        hidden = gpt2.transformer.h[0].output[0] * 2
        refs.append(keep(hidden))
        logits = gpt2.lm_head.output.save()

    assert tracer.model is gpt2 and logits.shape[0] == 1
    assert refs and refs[0]() is None  # freed without a garbage collection


def _save_blocks(model: interlace.LanguageModel) -> Any:
    with model.trace("The Eiffel Tower is in"):
        outs = interlace.save([b.output for b in model.transformer.h])
    return outs


def _invokes(model: interlace.LanguageModel) -> Any:
    with model.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            a = model.lm_head.output.save()
        with tracer.invoke("Hello"):
            b = model.transformer.h[0].output[0].save()
    return a, b


def _generate(model: interlace.LanguageModel) -> Any:
    with model.generate("Hello", max_new_tokens=3) as tracer:
        logits = interlace.save([])
        for _ in tracer.iter[:]:
            logits.append(model.lm_head.output)
    return logits


def _stopped(model: interlace.LanguageModel) -> Any:
    with model.trace("Hello") as tracer:
        h = model.transformer.h[0].output[0].save()
        tracer.stop()
    return h


def _failed(model: interlace.LanguageModel) -> Any:
    with pytest.raises(ValueError):
        with model.trace("Hello"):
            h = model.transformer.h[0].output[0].save()
            raise ValueError("stop here")
    return None


def _session(model: interlace.LanguageModel) -> Any:
    with model.session():
        with model.trace("Hello"):
            h = model.transformer.h[0].output[0]
        with model.trace("Hello"):
            model.transformer.h[1].output[0][:] = h
            out = model.lm_head.output.save()
    return out


@pytest.mark.parametrize("run", [_save_blocks, _invokes, _generate, _stopped, _failed, _session], ids=lambda f: f.__name__.strip("_"))
def test_a_run_leaves_no_reference_cycles(gpt2: interlace.LanguageModel, run: Callable[[interlace.LanguageModel], Any]) -> None:
    assert _cycle_garbage(lambda: run(gpt2)) == Counter()
