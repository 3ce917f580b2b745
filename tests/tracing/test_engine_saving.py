"""Only saved values reach the caller's scope; `.save()` and `interlace.save()` on any value."""

from __future__ import annotations

import linecache
from typing import Any

import pytest
import torch

import interlace
from interlace.tracing.unsaved import NotSaved
from engine_helpers import line_of


def test_only_saved_names_appear_in_function_scope(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(tiny_input):
        unsaved = mlp_model.layer1.output  # the unsaved line
        out = mlp_model.layer2.output.save()
    assert torch.equal(out, tiny_mlp(tiny_input))
    # An UnboundLocalError, as Python would raise, that says what to write instead.
    line = line_of(__file__, "# the unsaved line")
    with pytest.raises(UnboundLocalError, match=f"`unsaved` was assigned in the trace at {__file__}:{line} but not saved") as info:
        unsaved + 1
    assert "unsaved = mlp_model.layer1.output.save()" in str(info.value)
    assert isinstance(info.value, interlace.NotSavedError)


def test_unsaved_rebinding_does_not_silently_keep_the_previous_value(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    hidden = "before"
    with mlp_model.trace(tiny_input):
        hidden = mlp_model.layer1.output  # noqa: F841 - rebinding inside the body
        out = mlp_model.layer2.output.save()
    # Keeping "before" would hide the forgotten save; using the name says so instead.
    with pytest.raises(interlace.NotSavedError, match="`hidden` was assigned in the trace"):
        hidden == "before"  # noqa: B015
    assert isinstance(out, torch.Tensor)


def test_interlace_save_any_object_and_method_save(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(tiny_input):
        shapes = interlace.save([])
        shapes.append(tuple(mlp_model.layer1.output.shape))
        stats = dict(mean=mlp_model.layer2.output.mean()).save()
        label = "layer2".save()
        out = mlp_model.layer2.output.save()
        not_saved = [1, 2]
    assert shapes == [(1, 10)]
    assert torch.equal(stats["mean"], tiny_mlp(tiny_input).mean())
    assert label == "layer2"
    assert torch.equal(out, tiny_mlp(tiny_input))
    with pytest.raises(UnboundLocalError, match="not_saved = \\[1, 2\\].save\\(\\)"):
        len(not_saved)


def test_save_keeps_a_reference_and_clone_keeps_a_snapshot(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(tiny_input):
        ref = mlp_model.layer1.output.save()
        snap = mlp_model.layer1.output.clone().save()
        mlp_model.layer1.output[:] = 0
    assert torch.count_nonzero(ref) == 0
    assert torch.count_nonzero(snap) > 0


def test_save_outside_a_trace_is_a_no_op() -> None:
    value = [1]
    assert interlace.save(value) is value


def test_values_saved_before_an_error_survive(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    with pytest.raises(ZeroDivisionError):
        with mlp_model.trace(tiny_input):
            early = mlp_model.layer1.output.save()
            1 / 0
    assert early.shape == (1, 10)


def test_saved_names_inside_closure_cells(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    """A saved name that a nested function closes over (a cell variable) is bound too."""
    with mlp_model.trace(tiny_input):
        out = mlp_model.layer2.output.save()
    read = lambda: out  # noqa: E731 - makes `out` a cell variable
    assert torch.equal(read(), tiny_mlp(tiny_input))


def test_only_saved_names_at_module_level(mlp_model: interlace.NNsight, tiny_input: torch.Tensor) -> None:
    """Module-level code (a script, or a notebook cell) gets saved names and no others."""
    src = (
        "with model.trace(x):\n"
        "    unsaved = model.layer1.output\n"
        "    kept = model.layer2.output.save()\n"
    )
    filename = "<interlace-test-module-level>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    try:
        ns: dict[str, Any] = {"model": mlp_model, "x": tiny_input}
        exec(compile(src, filename, "exec"), ns)
    finally:
        linecache.cache.pop(filename, None)
    assert "kept" in ns and torch.equal(ns["kept"], mlp_model._module(tiny_input))
    assert not any(k.startswith("__interlace") for k in ns)
    with pytest.raises(NameError, match=f"`unsaved` was assigned in the trace at {filename}:2 but not saved"):
        eval("unsaved.shape", ns)


def test_session_values_flow_between_traces_but_only_saved_leave(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with mlp_model.session():
        with mlp_model.trace(tiny_input):
            h = mlp_model.layer1.output.clone()
        with mlp_model.trace(tiny_input):
            mlp_model.layer1.output = h * 0
            out = mlp_model.output.save()
    with torch.no_grad():
        expected = tiny_mlp.layer2(tiny_mlp.act(torch.zeros(1, 10)))
    assert torch.equal(out, expected)
    with pytest.raises(UnboundLocalError, match="`h` was assigned in the trace"):
        h.shape  # noqa: B018


GLOBAL_FROM_BODY: Any = None


def test_global_statement_in_body_binds_the_module_global(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    with mlp_model.trace(tiny_input):
        global GLOBAL_FROM_BODY
        GLOBAL_FROM_BODY = mlp_model.output.save()
    assert torch.equal(GLOBAL_FROM_BODY, tiny_mlp(tiny_input))
    assert torch.equal(globals()["GLOBAL_FROM_BODY"], tiny_mlp(tiny_input))


def test_nonlocal_statement_in_body_binds_the_enclosing_variable(mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor) -> None:
    result = None

    def inner() -> None:
        nonlocal result
        with mlp_model.trace(tiny_input):
            result = mlp_model.output.save()

    inner()
    assert result is not None and torch.equal(result, tiny_mlp(tiny_input))


def _unsaved_ref_after(model: interlace.NNsight, x: torch.Tensor, how: str) -> Any:
    import weakref

    if how == "normal":
        with model.trace(x):
            t = torch.zeros(1000)
            ref = interlace.save(weakref.ref(t))
            model.output.save()
    elif how == "stop":
        with model.trace(x) as tracer:
            t = torch.zeros(1000)
            ref = interlace.save(weakref.ref(t))
            model.layer1.output
            tracer.stop()
    else:
        try:
            with model.trace(x):
                t = torch.zeros(1000)
                ref = interlace.save(weakref.ref(t))
                1 / 0
        except ZeroDivisionError:
            pass
    return ref


@pytest.mark.parametrize("how", ["normal", "stop", "error"])
def test_unsaved_values_are_freed_after_the_trace(mlp_model: interlace.NNsight, tiny_input: torch.Tensor, how: str) -> None:
    """Nothing the engine keeps between runs (pooled greenlets, wrappers) pins a body's values."""
    import gc

    for _ in range(2):  # the second run reuses what the first left behind
        ref = _unsaved_ref_after(mlp_model, tiny_input, how)
        gc.collect()
        assert ref() is None


@pytest.mark.parametrize("mode", [False, "local"])
def test_unsaved_names_sharing_an_interned_value_do_not_leak(mode, tiny_mlp, tiny_input):
    model = interlace.NNsight(tiny_mlp)

    def run():
        with model.trace(tiny_input, remote=mode):
            n = interlace.save(3)
            k = 3  # the same int object as n, but never saved
            none_saved = interlace.save(None)
            flag = None
            h = model.layer1.output.save()
        bound = locals()
        return {name for name in ("n", "k", "none_saved", "flag", "h") if not isinstance(bound[name], NotSaved)}

    assert run() == {"n", "none_saved", "h"}


def _set_on_object(name: str, value: Any) -> None:
    """Put (or, with None, remove) an attribute on `object` itself, as nnsight's C extension
    mounts `save` on every object; CPython's type cache is told the type changed."""
    import ctypes
    import gc

    attrs = gc.get_referents(object.__dict__)[0]
    if value is None:
        attrs.pop(name, None)
    else:
        attrs[name] = value
    ctypes.pythonapi.PyType_Modified(ctypes.py_object(object))


def test_save_works_beside_a_library_that_mounts_save_on_every_object(
    mlp_model: interlace.NNsight, tiny_mlp: torch.nn.Sequential, tiny_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nnsight puts `save` on `object`. Imported before Interlace, it used to hide tensors'
    `.save()` from Interlace (and every object's `.save()` in a body then called nnsight's);
    imported after, Interlace's tensor `.save()` swallowed nnsight's. Interlace now marks
    values in its own traces and leaves `.save()` to the other library outside them."""
    from interlace.tracing import saving

    theirs: list[object] = []

    def foreign_save(value: Any) -> Any:
        theirs.append(value)
        return value

    monkeypatch.delattr(torch.Tensor, "save")  # as if the other library came first
    _set_on_object("save", foreign_save)
    try:
        saving.mount_tensor_save()
        assert torch.Tensor.save is saving._tensor_save  # mounted despite `object.save`
        with mlp_model.trace(tiny_input):
            out = mlp_model.layer2.output.save()
        with mlp_model.trace(tiny_input):
            pair = [1, 2].save()  # (a body on a greenlet)
            hidden = mlp_model.layer1.output.save()
        assert torch.equal(out, tiny_mlp(tiny_input)) and pair == [1, 2]
        assert torch.equal(hidden, tiny_mlp[0](tiny_input))
        assert theirs == []  # nothing went to the other library inside the trace
        outside = torch.ones(2)
        assert outside.save() is outside and theirs == [outside]  # theirs outside our traces
    finally:
        _set_on_object("save", None)
    assert not hasattr(object, "save")
