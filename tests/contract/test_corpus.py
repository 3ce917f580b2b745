"""The one-contract invariant over a corpus: remote='local' agrees with local runs on values,
and every failing trace raises its documented category at the user's line."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import interlace
from interlace.backends import outbound
from interlace.contract.policy import Policy

import corpus_cases as corpus


@pytest.fixture(scope="module")
def model(tiny_gpt2_path):
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_corpus_size():
    assert len(corpus.PASSING) + len(corpus.FAILING) >= 40
    assert len(corpus.FAILING) >= 15
    assert len({c for _, c in corpus.FAILING}) == len(corpus.FAILING), "one failing trace per category"


@pytest.mark.parametrize("case", corpus.PASSING, ids=lambda f: f.__name__)
def test_simulation_matches_local(model, case):
    local = case(model, False)
    simulated = case(model, "local")
    assert local.keys() == simulated.keys()
    for name in local:
        assert _equal(local[name], simulated[name]), name


def test_corpus_edits_match_raw_hooks(model):
    """The corpus compares modes with each other; its edits are also checked against a raw
    forward hook doing the same edit, so a mode that agreed with a wrong engine would fail."""
    def edit(module, args, output):
        return output * torch.linspace(0.2, 1.0, output.shape[1])[:, None]

    def zero_last(module, args, output):
        output = output.clone()
        output[:, -1] = 0
        return output

    ids = model.tokenizer(corpus.PROMPT, return_tensors="pt")
    for case, block, hook, name in ((corpus.p_inplace_edit, 1, edit, "logits"), (corpus.p_enum, 0, zero_last, "out")):
        handle = model._module.transformer.h[block].register_forward_hook(hook)
        try:
            with torch.no_grad():
                expected = model._module(**ids).logits
        finally:
            handle.remove()
        for mode in (False, "local"):
            assert torch.allclose(case(model, mode)[name], expected, atol=1e-5), (case.__name__, mode)


def _marker_line(case):
    lines, start = inspect.getsourcelines(case)
    for offset, line in enumerate(lines):
        if "# <- ERR" in line:
            return start + offset
    return None


@pytest.mark.parametrize("case,category", corpus.FAILING, ids=lambda x: getattr(x, "__name__", x))
def test_failing_trace_reports_category_and_line(model, case, category, monkeypatch):
    if category == "payload-too-large":
        monkeypatch.setattr(outbound, "policy_for_simulation", lambda: Policy(max_upload_bytes=1_000_000))
        from interlace.backends import simulation

        monkeypatch.setattr(simulation, "policy_for_simulation", lambda: Policy(max_upload_bytes=1_000_000))
    line = _marker_line(case)
    filename = inspect.getsourcefile(case)
    with pytest.raises((interlace.RemoteValidationError, interlace.RemoteException)) as info:
        case(model, "local")
    error = info.value
    if isinstance(error, interlace.RemoteValidationError):
        matching = [p for p in error.problems if p.category == category]
        assert matching, f"expected {category}, got {error.categories}: {error}"
        if line is not None:
            assert any(p.lineno == line and p.filename == filename for p in matching), str(error)
        assert all(p.fix or p.category == "class-base-not-allowed" for p in matching)
    else:
        assert error.category == category, str(error)
        if line is not None:
            assert f'File "{filename}", line {line}' in str(error)
        else:
            assert "thing" in str(error)


def test_forgotten_save_fails_the_same_way(model):
    def run(mode):
        with model.trace(corpus.PROMPT, remote=mode):
            hidden = model.transformer.h[0].output
        return hidden.shape  # not saved: using it says so (an UnboundLocalError)

    for mode in (False, "local"):
        with pytest.raises(UnboundLocalError, match="`hidden` was assigned in the trace at .* but not saved"):
            run(mode)


def test_simulation_executes_a_copy(model):
    outer = []
    with pytest.warns(UserWarning, match="`outer.append\\(...\\)` changes `outer`, which was made before this remote block"):
        with model.trace(corpus.PROMPT, remote="local"):
            outer.append(1)
            h = model.transformer.h[0].output.save()
    assert outer == [], "the simulated body must run on decoded copies, as on a server"


def test_verbose_output_and_payload_access(model, capsys):
    backend = interlace.backends.LocalSimulationBackend(model, verbose=True)
    probe = corpus.Probe(1)
    with model.trace(corpus.PROMPT, backend=backend):
        r = probe.read(model.transformer.h[0].output).save()
    out = capsys.readouterr().out
    assert re.search(r"\[LocalSimulation\] Serialized payload: \d+ bytes", out)
    assert "[LocalSimulation] Variables: ['probe']" in out
    assert "[LocalSimulation] Remote objects: ['Probe']" in out
    assert "[LocalSimulation] Model refs: ['model']" in out
    assert backend.last_payload_size == len(backend.get_last_payload()) > 0
    assert b"pickle" not in backend.get_last_payload()


def test_max_upload_warning(model):
    big = torch.randn(300_000)
    with pytest.warns(UserWarning, match=r"max_upload_mb=0.5"):
        with model.trace(corpus.PROMPT, remote="local", max_upload_mb=0.5):
            h = (model.transformer.h[0].output + big[:128]).save()
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        with model.trace(corpus.PROMPT, remote="local", max_upload_mb=0):
            h = (model.transformer.h[0].output + big[:128]).save()


def test_remote_options_need_remote(model):
    with pytest.raises(TypeError, match="remote='local'"):
        with model.trace(corpus.PROMPT, verbose=True):
            pass


def test_remote_decorator_rejects_at_decoration():
    with pytest.raises(interlace.RemoteValidationError) as info:

        @interlace.remote
        def reads_file(path):
            return open(path).read()

    assert info.value.categories == ["file-io"]


def test_in_place_weight_edits_fail_like_on_a_server(model):
    """Remote jobs may not change the hosted model; the simulation fails the same way."""
    original = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    try:
        with pytest.raises(interlace.RemoteException) as info:
            with model.trace(corpus.PROMPT, remote="local"):
                with torch.no_grad():  # (with grad on, PyTorch itself refuses the in-place edit)
                    model.transformer.h[0].mlp.c_fc.weight[:] = 0
                h = model.transformer.h[0].output.save()
        assert info.value.category == "model-modified"
        assert "transformer.h.0.mlp.c_fc.weight" in str(info.value)
    finally:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight.copy_(original)


def test_registering_hooks_is_refused_and_hooks_never_leak(model):
    with pytest.raises(interlace.RemoteValidationError) as info:
        with model.trace(corpus.PROMPT, remote="local"):
            handle = model.transformer.h[0].register_forward_hook(lambda *a: None)
            h = model.transformer.h[0].output.save()
    assert "forbidden-attribute" in info.value.categories
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model._module.modules())


def test_a_hook_smuggled_past_the_validator_is_refused_at_run_time(model):
    # (The runtime guard refuses the name built from strings; the job leaves no hook.)
    name = "register_" + "forward_hook"
    with pytest.raises(interlace.RemoteException) as info:
        with model.trace(corpus.PROMPT, remote="local"):
            getattr(model.transformer.h[1], name)(lambda module, args, out: out)
            h = model.transformer.h[0].output.save()
    assert "register_forward_hook" in str(info.value)
    assert not any(m._forward_hooks for m in model._module.modules())


def test_edited_models_are_refused_the_same_way_everywhere(model):
    with model.edit() as edited:
        model.transformer.h[0].output[:] = 0
    with pytest.raises(interlace.RemoteValidationError) as info:
        with edited.trace(corpus.PROMPT, remote="local"):
            h = edited.transformer.h[0].output.save()
    assert info.value.categories == ["invalid-request"]
    assert "model.edit()" in str(info.value)
