"""`remote='local', dry_run=True`: the remote path on fake tensors, for a model whose weights
were never loaded.

The model under test is GPT-2 small's architecture (12 layers x 768, vocabulary 50257) built
from its config alone: its directory holds a config, a tokenizer and a weight file that is not
a weight file, so any attempt to load the weights fails loudly. Expected shapes come from the
config and the tokenizer (independent of the code under test), and the shape rule itself is
checked against a real run of the tiny GPT-2, which has weights.
"""

from __future__ import annotations

import shutil
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import interlace
from interlace.backends.dry_run import DryRunBackend, DryRunWarning, FakeTensorValue, FakeValueError
from interlace.contract.policy import Policy
from interlace.errors import OutOfOrderError, RemoteException
from interlace.contract.options import TraceOptionError
from interlace.contract.problems import RemoteValidationError

# Each dry run warns with its account (checked in the first test); the rest need not show it.
pytestmark = pytest.mark.filterwarnings("ignore::interlace.backends.dry_run.DryRunWarning")

PROMPT = "The Eiffel Tower is in the city of"
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


@pytest.fixture(scope="module")
def small_dir(tiny_gpt2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2 small's config and the tiny model's tokenizer; the weight file is garbage."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2-small-meta")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gpt2_path / name, path / name)
    GPT2Config(**GPT2_SMALL).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"these are not the weights")
    return path


@pytest.fixture(scope="module")
def small(small_dir: Path) -> interlace.LanguageModel:
    return interlace.LanguageModel(str(small_dir))


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    return interlace.LanguageModel(str(tiny_gpt2_path))


def _tokens(model: interlace.LanguageModel, text: str) -> int:
    return len(model.tokenizer(text)["input_ids"])


def _weights_never_loaded(model: interlace.LanguageModel) -> None:
    assert not model.dispatched
    assert all(p.is_meta for p in model._module.parameters())


def test_a_correct_trace_passes_with_the_shapes_and_dtypes_of_the_architecture(small):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with small.trace(PROMPT, remote="local", dry_run=True) as tracer:
            hidden = small.transformer.h[5].output.save()
            logits = small.lm_head.output.save()
            width = interlace.save(small.lm_head.output.shape[-1])
    n = _tokens(small, PROMPT)
    assert isinstance(hidden, FakeTensorValue) and isinstance(logits, FakeTensorValue)
    assert (hidden.shape, hidden.dtype) == (torch.Size([1, n, 768]), torch.float32)
    assert (logits.shape, logits.dtype) == (torch.Size([1, n, 50257]), torch.float32)
    assert width == 50257  # plain data (a shape) is real
    _weights_never_loaded(small)
    # It says so plainly, and lists the saves with their sizes.
    [note] = [str(w.message) for w in caught if w.category is DryRunWarning]
    assert "VALUES ARE FAKE" in note
    assert "hidden" in note and "(1, %d, 768)" % n in note and "logits" in note
    report = tracer.backend.last_report
    assert [s.name for s in report.saves] == ["hidden", "logits", "width"]
    assert report.saves[1].nbytes >= n * 50257 * 4
    assert report.result_bytes >= (n * 768 + n * 50257) * 4


def test_the_shapes_are_those_of_a_real_run_of_the_same_architecture(tiny):
    # The tiny GPT-2 has real weights: a real simulated run is the truth for the shape rule.
    with tiny.trace([PROMPT, "Hi"], remote="local", dry_run=True):
        fake_attn = tiny.transformer.h[0].attn.output[0].save()
        fake_hidden = tiny.transformer.h[1].output.save()
        fake_logits = tiny.output.logits.save()
    assert not tiny.dispatched  # the dry run did not load them
    with tiny.trace([PROMPT, "Hi"], remote="local"):
        attn = tiny.transformer.h[0].attn.output[0].save()
        hidden = tiny.transformer.h[1].output.save()
        logits = tiny.output.logits.save()
    for fake, real in ((fake_hidden, hidden), (fake_attn, attn), (fake_logits, logits)):
        assert (fake.shape, fake.dtype) == (real.shape, real.dtype)


def test_generate_runs_the_steps_asked_for(small, tiny):
    n = _tokens(small, PROMPT)
    with small.generate(PROMPT, max_new_tokens=3, remote="local", dry_run=True) as tracer:
        steps = interlace.list().save()
        for _ in tracer.iter[:]:
            steps.append(small.lm_head.output)
        tokens = small.generator.output.save()
    assert tokens.shape == torch.Size([1, n + 3]) and tokens.dtype == torch.int64
    assert [s.shape[-1] for s in steps] == [50257] * 3
    _weights_never_loaded(small)
    # The per-step shapes are those of a real generation of the same architecture.
    shapes = {}
    for mode in ({"dry_run": True}, {}):
        with tiny.generate(PROMPT, max_new_tokens=3, do_sample=False, remote="local", **mode) as tracer:
            seen = interlace.list().save()
            for _ in tracer.iter[:]:
                seen.append(tiny.lm_head.output)
        shapes[bool(mode)] = [tuple(s.shape) for s in seen]
    assert shapes[True] == shapes[False]


def test_generate_without_max_new_tokens_is_refused_with_the_fix(small):
    with pytest.raises(interlace.errors.InterlaceError, match=r"max_new_tokens=5, remote='local', dry_run=True"):
        with small.generate(PROMPT, remote="local", dry_run=True):
            tokens = small.generator.output.save()  # noqa: F841


def test_out_of_order_access_fails_at_the_users_line(small):
    line = sys._getframe().f_lineno + 4
    with pytest.raises(OutOfOrderError) as caught:
        with small.trace(PROMPT, remote="local", dry_run=True):
            late = small.transformer.h[5].output.save()  # noqa: F841
            early = small.transformer.h[2].output.save()  # noqa: F841
    assert f'{__file__}", line {line}' in str(caught.value)
    _weights_never_loaded(small)


def _body_with_a_lock(model, **mode):
    lock = threading.Lock()
    with model.trace(PROMPT, **mode):
        hidden = model.transformer.h[0].output.save()  # noqa: F841
        held = lock  # noqa: F841


def _body_saving_a_module(model, **mode):
    with model.trace(PROMPT, **mode):
        block = model.transformer.h[0].save()  # noqa: F841


@pytest.mark.parametrize("body, error", [(_body_with_a_lock, RemoteValidationError), (_body_saving_a_module, RemoteException)])
def test_what_cannot_be_sent_fails_as_remote_local_fails_it(small, tiny, body, error):
    # The same body, run by remote='local' on a model with weights, is the truth.
    with pytest.raises(error) as expected:
        body(tiny, remote="local")
    with pytest.raises(error) as caught:
        body(small, remote="local", dry_run=True)
    assert str(caught.value) == str(expected.value)
    assert getattr(caught.value, "category", None) == getattr(expected.value, "category", None)


def test_a_result_over_the_policys_limit_is_reported(small):
    n = _tokens(small, PROMPT)
    limit = 5 * n * 50257 * 4  # logits of four prompts fit; eight do not
    backend = DryRunBackend(small, policy=Policy(max_result_bytes=limit))
    with small.trace([PROMPT] * 4, backend=backend):
        logits = small.lm_head.output.save()
    assert logits.shape == torch.Size([4, n, 50257])
    with pytest.raises(RemoteException, match=r"estimated from the saved values' shapes and dtypes\), over the server's"):
        with small.trace([PROMPT] * 8, backend=DryRunBackend(small, policy=Policy(max_result_bytes=limit))):
            logits = small.lm_head.output.save()


def test_a_body_that_needs_values_is_told_so_at_its_line(small):
    line = sys._getframe().f_lineno + 4
    with pytest.raises(RemoteException) as caught:
        with small.trace(PROMPT, remote="local", dry_run=True):
            top = small.lm_head.output[0, -1].argmax().item()
            if top > 3:
                found = small.lm_head.output.save()  # noqa: F841
    text = str(caught.value)
    assert f'{__file__}", line {line}' in text and "This is a dry run" in text


@pytest.mark.parametrize("remote", [False, True])
def test_dry_run_is_refused_outside_remote_local_with_the_fix(small, remote):
    with pytest.raises(TraceOptionError, match=r"`model.trace\(x, remote='local', dry_run=True\)`"):
        with small.trace(PROMPT, remote=remote, dry_run=True):
            logits = small.lm_head.output.save()  # noqa: F841


def test_fake_values_refuse_what_needs_values(small):
    with small.trace(PROMPT, remote="local", dry_run=True):
        logits = small.lm_head.output.save()
        weight = small.lm_head.weight.save()
    assert "fake" in repr(logits) and "values not computed" in repr(logits) and "50257" in repr(logits)
    assert weight.shape == torch.Size([50257, 768])  # a saved weight: its shape, not its (absent) data
    for use in (lambda: logits.mean(), lambda: float(logits), lambda: logits[0], lambda: logits + 1,
                lambda: logits.numpy()):
        with pytest.raises(FakeValueError, match="`logits` is a fake value from a dry run"):
            use()
    _weights_never_loaded(small)


def test_sent_tensors_and_sessions_run_as_in_the_simulation(small):
    steer = torch.ones(768)  # a CPU tensor the user sends mixes with the activations, as in remote='local'
    with small.session(remote="local", dry_run=True):
        with small.trace(PROMPT):
            kept = small.transformer.h[3].output
        with small.trace("Hello"):
            small.transformer.h[3].output[:, -1] = kept[:, -1] + steer
            logits = small.lm_head.output.save()
    assert logits.shape == torch.Size([1, _tokens(small, "Hello"), 50257])
    _weights_never_loaded(small)


def test_the_run_is_recorded_as_a_dry_run(small):
    from interlace.backends.history_store import store

    marker = "dry_run_history_marker"
    with small.trace(PROMPT, remote="local", dry_run=True):
        dry_run_history_marker = small.lm_head.output.save()  # noqa: F841
    [record] = store.select("WHERE source LIKE ?", (f"%{marker}%",))
    assert record.dry_run and record.mode == "local" and record.status == "COMPLETED"
