"""A name the trace body assigned but did not save: using it after the block says so, names
the line, and shows the `.save()` to add. The same in all three modes (the remote modes send
back only saved values, so nothing here depends on what the body did at run time)."""

from __future__ import annotations

import pytest
import torch

import interlace
from interlace.errors import NotSavedError

PROMPT = "The Eiffel Tower is in the city of"
THIS_FILE = __file__


def _line(marker: str) -> int:
    with open(THIS_FILE) as f:
        for i, text in enumerate(f, 1):
            if marker in text and "_line(" not in text:
                return i
    raise AssertionError(marker)


def test_using_an_unsaved_name_names_its_line_and_the_fix(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.trace(PROMPT, remote=mode):
        hidden = lm.transformer.h[1].output  # FORGOT-SAVE
        logits = lm.lm_head.output.save()
    assert torch.equal(logits.argmax(-1), logits.argmax(-1))  # the saved value came back
    where = f"{THIS_FILE}:{_line('# FORGOT-SAVE')}"
    with pytest.raises(NotSavedError) as info:
        hidden.mean()
    message = str(info.value)
    assert f"`hidden` was assigned in the trace at {where} but not saved" in message
    assert "hidden = lm.transformer.h[1].output.save()" in message
    # What Python itself would have raised, so `except NameError` code keeps working.
    assert isinstance(info.value, UnboundLocalError) and isinstance(info.value, interlace.TracingError)
    # Other uses say the same: torch functions, printing, arithmetic, indexing.
    for use in (lambda: torch.allclose(hidden, logits), lambda: print(hidden), lambda: hidden + 1, lambda: hidden[0]):
        with pytest.raises(NotSavedError, match="`hidden` was assigned in the trace"):
            use()
    assert "hidden = ....save()" in repr(hidden)  # a debugger can still show it


def test_an_older_value_of_the_name_is_not_kept_silently(feat_gpt2, mode):
    lm = feat_gpt2
    hidden = torch.zeros(1)
    with lm.trace(PROMPT, remote=mode):
        hidden = lm.transformer.h[1].output * 2  # noqa: F841 (not saved)
        kept = lm.transformer.h[1].output.save()
    with pytest.raises(NotSavedError, match=r"hidden = \(lm.transformer.h\[1\].output \* 2\).save\(\)"):
        hidden.sum()
    assert kept.shape == (1, 12, 128)


def test_a_saved_line_that_did_not_run_leaves_the_name_as_it_was(feat_gpt2, mode):
    """As in nnsight (and plain Python): unbound if it had no value, else its earlier value."""
    lm = feat_gpt2
    default = None
    with lm.trace(PROMPT, remote=mode) as tracer:
        first = lm.transformer.h[0].output.save()
        if first.shape[1] > 100:  # not taken: 12 tokens
            late = lm.transformer.h[2].output.save()  # NOT-REACHED
            default = lm.transformer.h[2].output.save()
        tracer.stop()
    assert first.shape == (1, 12, 128)
    assert default is None
    with pytest.raises(UnboundLocalError, match="late") as info:
        late  # noqa: B018 (a bare use raises, as nnsight's tests check)
    assert not isinstance(info.value, NotSavedError)


def test_saved_names_and_the_tracer_are_bound_as_before(feat_gpt2, mode):
    lm = feat_gpt2
    with lm.trace(PROMPT, remote=mode) as tracer:
        values = list().save()
        for i in range(3):  # `i` is not saved
            values.append(lm.transformer.h[i].output[:, -1].clone())
    assert len(values) == 3 and all(v.shape == (1, 128) for v in values)
    assert isinstance(tracer, interlace.tracing.tracer.Tracer)
    with pytest.raises(NotSavedError, match="`i` was assigned in the trace"):
        range(i)


def test_an_import_in_the_body_does_not_hide_the_callers_module(tiny_mlp):
    """Module-level code (a notebook cell) that imports inside a trace keeps its module."""
    import linecache

    model = interlace.NNsight(tiny_mlp)
    src = (
        "import math\n"
        "with model.trace(x):\n"
        "    import math\n"
        "    scaled = (model.layer1.output * math.pi).save()\n"
        "after = math.pi\n"
    )
    filename = "<interlace-test-import-in-body>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    try:
        ns = {"model": model, "x": torch.ones(1, 5)}
        exec(compile(src, filename, "exec"), ns)
    finally:
        linecache.cache.pop(filename, None)
    assert ns["after"] == 3.141592653589793
    torch.testing.assert_close(ns["scaled"], tiny_mlp.layer1(torch.ones(1, 5)) * 3.141592653589793)


def test_a_name_one_trace_left_unsaved_has_no_value_in_the_next(feat_gpt2, mode, raises_in_mode):
    lm = feat_gpt2
    with lm.trace(PROMPT, remote=mode):
        for layer in range(2):  # `layer` is not saved
            pass
        hidden = lm.transformer.h[0].output  # nor is `hidden`
    # A later trace that assigns the name again is unaffected (nothing is sent for it)...
    with lm.trace(PROMPT, remote=mode):
        norms = list().save()
        for layer in range(2):
            norms.append(lm.transformer.h[layer].output.norm())
    assert len(norms) == 2 and norms[0] != norms[1]
    # ...and one that reads it first finds no value, as Python would say in every mode.
    with raises_in_mode(NameError, match="hidden"):
        with lm.trace(PROMPT, remote=mode):
            again = (hidden * 2).save()
