"""Seed 001, the `remote` API page: a hosted model known only by its server key.

Its example, as written with the package name and the key changed (the test server hosts the
tiny GPT-2 under its path), runs with `remote=True`: the client has no weights, so the values
must come from the server's copy. Checked against raw hooks on a separately loaded copy.
"""

from __future__ import annotations

import pytest
import torch

import interlace

TOL = 1e-5


def test_module_docstring_example(use_server, tiny_gpt2_path, raw_gpt2):
    from interlace import NNsight

    model = NNsight(model_key=str(tiny_gpt2_path))
    with model.trace("Hello", remote=True):
        hidden = model.transformer.h[0].output.save()
    print(hidden.shape)

    _, seen = raw_gpt2.run("Hello", capture=("transformer.h.0",))
    torch.testing.assert_close(hidden, seen["transformer.h.0"], rtol=0, atol=TOL)
    # Built from the server's description: nothing was loaded (or downloaded) here.
    assert all(p.device.type == "meta" for p in model._module.parameters())


@pytest.mark.parametrize("remote", [False, "local"], ids=["local-run", "simulated"])
def test_hosted_model_runs_only_on_the_server(use_server, tiny_gpt2_path, remote):
    """Without weights here, a local run or a dry run cannot happen: the error says so and
    shows the fix (`remote=True`)."""
    from interlace import NNsight

    model = NNsight(model_key=str(tiny_gpt2_path))
    with pytest.raises(interlace.InterlaceError, match=r"remote=True") as info:
        with model.trace("Hello", remote=remote):
            hidden = model.transformer.h[0].output.save()
    assert "no weights" in str(info.value)


def test_remote_backend_with_model_key(use_server, tiny_gpt2_path, raw_gpt2):
    """`RemoteBackend(model_key, ...)` as the page documents it, passed as a trace's backend."""
    from interlace import LanguageModel
    from interlace.backends import RemoteBackend

    key = str(tiny_gpt2_path)
    model = LanguageModel(key)
    backend = RemoteBackend(model_key=key)
    assert backend.model_key == key and backend.blocking is True

    with model.trace("Hello", backend=backend):
        hidden = model.transformer.h[0].output.save()

    assert isinstance(backend.job_id, str) and backend.job_id  # set after submission
    _, seen = raw_gpt2.run("Hello", capture=("transformer.h.0",))
    torch.testing.assert_close(hidden, seen["transformer.h.0"], rtol=0, atol=TOL)
