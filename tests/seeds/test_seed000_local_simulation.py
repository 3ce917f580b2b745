"""Seed 000, "Local Simulation Backend": its examples as written, in every mode they run in.

Changed from the seed: the package name (nnsight -> interlace), the model (the tiny GPT-2 by
path, 4 layers x 128), sizes that follow from it (768 -> 128, layer 5 -> 2), the simulation
backend's module path (`interlace.backends.simulation`), and `my_custom_lib` (a module made
here that the server does not have). Each example is checked against raw PyTorch hooks on a
separately loaded copy of the model. With transformers 5.x a GPT-2 block returns a tensor, so
the seed's `.output[0]` is batch row 0, in Interlace and in the raw truth alike.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interlace
from interlace import LanguageModel, remote

TOL = 1e-5


@remote
class LayerAnalyzer:
    def __init__(self, layer_idx):
        self.layer_idx = layer_idx

    def analyze(self, hidden):
        return hidden.mean(dim=-1)


@remote
def my_function():
    return 42


@pytest.fixture(params=["local", True], ids=["simulated", "server"])
def remote_mode(request: pytest.FixtureRequest):
    """The two remote modes, for examples about what a server refuses."""
    if request.param is True:
        request.getfixturevalue("use_server")
    return request.param


@pytest.fixture
def my_custom_lib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module this process can import and the server cannot (the seed's `my_custom_lib`)."""
    (tmp_path / "my_custom_lib.py").write_text("def process(x):\n    return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_custom_lib

    yield my_custom_lib
    sys.modules.pop("my_custom_lib", None)


# --- Quick Start ------------------------------------------------------------------------------

def test_quick_start(tiny_gpt2_path, raw_gpt2, mode):
    model = LanguageModel(str(tiny_gpt2_path))

    with model.trace("Hello world", remote=mode):
        hidden = model.transformer.h[0].output[0].save()

    print(hidden.shape)
    _, seen = raw_gpt2.run("Hello world", capture=("transformer.h.0",))
    torch.testing.assert_close(hidden, seen["transformer.h.0"][0], rtol=0, atol=TOL)


# --- Verbose Mode -----------------------------------------------------------------------------

def test_verbose_mode(model, raw_gpt2, mode, capsys):
    if mode is False:  # verbose describes what would be sent: it names the modes it applies to
        with pytest.raises(TypeError, match=r"verbose.*remote='local'"):
            with model.trace("Hello world", remote=mode, verbose=True):
                hidden = model.transformer.h[0].output[0].save()
        return

    with model.trace("Hello world", remote=mode, verbose=True):
        hidden = model.transformer.h[0].output[0].save()

    _, seen = raw_gpt2.run("Hello world", capture=("transformer.h.0",))
    torch.testing.assert_close(hidden, seen["transformer.h.0"][0], rtol=0, atol=TOL)
    if mode == "local":
        out = capsys.readouterr().out
        assert re.search(r"^\[LocalSimulation\] Serialized payload: \d+ bytes$", out, re.M), out
        assert "[LocalSimulation] Model refs: ['model']" in out


def test_verbose_mode_lists_variables_and_remote_objects(model, raw_gpt2, capsys):
    """The seed's listing names the variables, the @remote objects and the model refs sent."""
    scale = 3.0

    @remote
    def helper_fn(x):
        return x * 2

    with model.trace("Hello world", remote="local", verbose=True):
        hidden = helper_fn(model.transformer.h[0].output[0] * scale).save()

    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("[LocalSimulation]")}
    assert "'scale'" in lines["[LocalSimulation] Variables"]
    assert "helper_fn" in lines["[LocalSimulation] Remote objects"]
    assert "'model'" in lines["[LocalSimulation] Model refs"]
    _, seen = raw_gpt2.run("Hello world", capture=("transformer.h.0",))
    torch.testing.assert_close(hidden, seen["transformer.h.0"][0] * 3.0 * 2, rtol=0, atol=1e-4)


# --- Common Errors and Solutions: non-serializable variable -----------------------------------

def test_undecorated_function(model, mode):
    """The seed marks this `# Error!`; as in the PR that wrote the seed, an undecorated function
    with readable source is sent by source unless `strict_remote=True` (next test)."""

    def my_function():  # Not decorated with @remote
        return 42

    with model.trace("test", remote=mode):
        x = my_function()  # Works (sent by source)
        seen = interlace.save(x)

    assert seen == 42


def test_undecorated_function_with_strict_remote(model, remote_mode):
    def my_function():  # Not decorated with @remote
        return 42

    with pytest.raises(interlace.RemoteValidationError, match="my_function") as info:
        with model.trace("test", remote=remote_mode, strict_remote=True):
            x = my_function()  # Error!
    assert "@interlace.remote" in str(info.value)


def test_decorated_function(model, mode):
    # `my_function` is the module-level one, decorated with `@remote`.
    options = {"strict_remote": True} if mode else {}
    with model.trace("test", remote=mode, **options):
        x = my_function()  # Works!
        seen = interlace.save(x)

    assert seen == 42


# --- Non-server-available module --------------------------------------------------------------

def test_module_not_available_on_server(model, remote_mode):
    with pytest.raises(interlace.RemoteValidationError, match="subprocess"):
        with model.trace("test", remote=remote_mode):
            result = subprocess  # Error!


# --- Lambda with non-serializable capture -----------------------------------------------------

def test_lambda_capturing_a_module_the_server_lacks(model, remote_mode, my_custom_lib):
    hidden = torch.ones(2, 3)
    double = lambda x: my_custom_lib.process(x)  # Captures my_custom_lib  # noqa: E731

    with pytest.raises(interlace.RemoteValidationError, match="my_custom_lib"):
        with model.trace("test", remote=remote_mode):
            result = double(hidden)  # Error!


def test_lambda_capturing_a_module_runs_locally(model, my_custom_lib):
    hidden = torch.ones(2, 3)
    double = lambda x: my_custom_lib.process(x)  # noqa: E731

    with model.trace("test"):
        result = double(hidden).save()

    assert torch.equal(result, torch.full((2, 3), 2.0))


def test_remote_function_importing_a_module_the_server_lacks(my_custom_lib):
    """The seed's solution moves the import inside a @remote function. That only works where
    the server has the module; Interlace checks at decoration and names it."""
    with pytest.raises(interlace.RemoteValidationError, match="my_custom_lib"):

        @remote
        def double(x):
            import my_custom_lib  # Import inside function

            return my_custom_lib.process(x)


# --- API Reference: trace() parameters --------------------------------------------------------

def test_max_upload_mb(model, raw_gpt2, mode, recwarn):
    big = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))  # 64 KiB in the payload

    def run(**options):
        with model.trace("test", remote=mode, **options):
            model.transformer.h[0].output[0][:] += big[0]
            hidden = model.transformer.h[0].output[0].save()
        return hidden

    if mode is False:
        with pytest.raises(TypeError, match=r"max_upload_mb.*remote='local'"):
            run(max_upload_mb=0.05)
        return

    with pytest.warns(UserWarning, match="max_upload_mb=0.05"):
        hidden = run(max_upload_mb=0.05)
    recwarn.clear()
    run(max_upload_mb=0)  # 0 disables the warning
    run()  # the default, 10 MB
    assert not [w for w in recwarn if "max_upload_mb" in str(w.message)]

    def edit(module, args, out):
        out[0] += big[0]

    _, seen = raw_gpt2.run("test", capture=("transformer.h.0",), edits={"transformer.h.0": edit})
    torch.testing.assert_close(hidden, seen["transformer.h.0"][0], rtol=0, atol=TOL)


# --- LocalSimulationBackend -------------------------------------------------------------------

def test_local_simulation_backend(model, raw_gpt2, capsys):
    from interlace.backends.simulation import LocalSimulationBackend

    # Create backend directly (usually not needed)
    backend = LocalSimulationBackend(model, verbose=True)
    assert backend.last_payload_size == 0 and backend.get_last_payload() is None

    with model.trace("Hello world", backend=backend):
        hidden = model.transformer.h[0].output[0].save()

    # Access last payload size
    size = backend.last_payload_size  # int: bytes
    # Access last payload (for debugging)
    payload = backend.get_last_payload()  # bytes or None

    assert isinstance(payload, bytes) and size == len(payload) > 0
    assert f"[LocalSimulation] Serialized payload: {size} bytes" in capsys.readouterr().out
    _, seen = raw_gpt2.run("Hello world", capture=("transformer.h.0",))
    torch.testing.assert_close(hidden, seen["transformer.h.0"][0], rtol=0, atol=TOL)


# --- Examples: testing a complex trace --------------------------------------------------------

def test_complex_trace_with_remote_class(tiny_gpt2_path, raw_gpt2, mode):
    model = LanguageModel(str(tiny_gpt2_path))
    analyzer = LayerAnalyzer(2)

    # Test locally before submitting (verbose only applies to remote runs)
    options = {"verbose": True} if mode else {}
    with model.trace("The capital of France", remote=mode, **options):
        hidden = model.transformer.h[analyzer.layer_idx].output[0]
        analysis = analyzer.analyze(hidden).save()

    print(f"Analysis shape: {analysis.shape}")
    _, seen = raw_gpt2.run("The capital of France", capture=("transformer.h.2",))
    torch.testing.assert_close(analysis, seen["transformer.h.2"][0].mean(dim=-1), rtol=0, atol=TOL)


# --- Examples: verifying tensor serialization -------------------------------------------------

def test_tensor_serialization(model, raw_gpt2, mode):
    torch.manual_seed(0)
    replacement = torch.randn(1, 128)

    # Test that the tensor serializes correctly
    with model.trace("test", remote=mode):
        model.transformer.h[0].output[0][:] = replacement
        result = model.transformer.h[0].output[0].save()
        logits = model.lm_head.output.save()  # added: the edit reaches the rest of the model

    print(f"Tensor serialized and restored correctly: {result.shape}")
    assert torch.equal(result, replacement.expand_as(result))

    def edit(module, args, out):
        out[0][:] = replacement

    raw_logits, _ = raw_gpt2.run("test", edits={"transformer.h.0": edit})
    torch.testing.assert_close(logits, raw_logits, rtol=0, atol=TOL)
    clean, _ = raw_gpt2.run("test")
    assert not torch.allclose(logits, clean, atol=1e-3)
