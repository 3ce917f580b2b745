"""`model.scan(...)`: shapes and dtypes from fake tensors, without compute or loaded weights."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import interlace
from feature_truth import PROMPT_A, PROMPT_B, n_tokens, raw_forward


class Recording(torch.nn.Module):
    """Records whether each forward saw real data."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(5, 7)
        self.real_calls = 0
        self.fake_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, FakeTensor):
            self.fake_calls += 1
        else:
            self.real_calls += 1
        return self.inner(x).relu()


def test_scan_on_meta_language_model_does_not_dispatch(tiny_gpt2_path, et_prompt):
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    assert not model.dispatched
    n = len(model.tokenizer(et_prompt)["input_ids"])
    with model.scan(et_prompt):
        hidden = model.transformer.h[0].output.save()
        attn_dtype = model.transformer.h[1].attn.output[0].dtype
        attn_dtype.save()
        logits_shape = model.lm_head.output.shape.save()
    assert not model.dispatched
    assert tuple(hidden.shape) == (1, n, 128)
    assert tuple(logits_shape) == (1, n, 512)
    assert attn_dtype == torch.float32


def test_trace_after_a_scan_of_token_ids_runs_on_the_loaded_weights(tiny_gpt2_path):
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with model.scan(ids):  # inputs placed for the meta model
        shape = model.lm_head.output.shape.save()
    with model.trace(ids):  # loads the weights: inputs now go where they live
        logits = model.lm_head.output.save()
    assert tuple(shape) == tuple(logits.shape) == (1, 4, 512)
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()


def test_scan_with_invokes_and_edits_shapes(tiny_gpt2_path, feat_gpt2):
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    with model.scan() as tracer:
        with tracer.invoke([PROMPT_A, PROMPT_B]):
            model.transformer.h[0].output[:] *= 0.5  # edits run on fakes too
            hidden = model.transformer.h[1].output.save()
        with tracer.invoke("Hello"):
            shape = model.lm_head.output.shape.save()
    assert not model.dispatched
    width = max(n_tokens(feat_gpt2, p) for p in (PROMPT_A, PROMPT_B, "Hello"))  # padded batch
    assert tuple(hidden.shape) == (2, width, 128) and hidden.dtype == torch.float32
    assert tuple(shape) == (1, width, 512)
    assert tuple(raw_forward(feat_gpt2, [PROMPT_A, PROMPT_B, "Hello"]).shape) == (3, width, 512)


def test_scan_gives_the_same_shapes_in_every_mode(tiny_gpt2_path, feat_gpt2, mode):
    """A scan runs here whatever `remote=` says (fake tensors need neither weights nor a
    server), on a meta model as a user of a hosted model has it."""
    model = interlace.LanguageModel(str(tiny_gpt2_path))
    with model.scan(PROMPT_B, remote=mode):
        hidden = model.transformer.h[2].output.save()
        logits_shape = model.lm_head.output.shape.save()
    assert not model.dispatched
    assert tuple(hidden.shape) == (1, n_tokens(feat_gpt2, PROMPT_B), 128)
    assert tuple(logits_shape) == tuple(raw_forward(feat_gpt2, PROMPT_B).shape)


def test_scan_of_a_plain_module_takes_remote_too(mode):
    net = torch.nn.Sequential(Recording(), torch.nn.Linear(7, 3))
    model = interlace.NNsight(net)
    with model.scan(torch.rand(4, 5), remote=mode):
        out = model[1].output.save()
    assert tuple(out.shape) == (4, 3) and net[0].real_calls == 0


def test_scan_inside_a_session_in_every_mode(feat_gpt2, mode):
    """In a session the scan runs where the session runs (on the server remotely); its shapes
    feed the next trace there without being saved."""
    with feat_gpt2.session(remote=mode):
        with feat_gpt2.scan(PROMPT_A):
            width = feat_gpt2.transformer.h[0].output.shape[-1]
        with feat_gpt2.trace(PROMPT_A):
            feat_gpt2.transformer.h[0].output[:] += torch.ones(width) * 0.1
            logits = feat_gpt2.lm_head.output.save()
    shift = (feat_gpt2._module.transformer.h[0], lambda m, a, o: o + 0.1)
    torch.testing.assert_close(logits, raw_forward(feat_gpt2, PROMPT_A, shift), rtol=0, atol=1e-5)


def test_scan_runs_no_real_compute():
    net = torch.nn.Sequential(Recording(), torch.nn.Linear(7, 3))
    model = interlace.NNsight(net)
    with model.scan(torch.rand(4, 5)):
        mid = model[0].output.save()
        out = model[1].output.save()
    assert isinstance(out, FakeTensor) and tuple(out.shape) == (4, 3)
    assert tuple(mid.shape) == (4, 7)
    assert net[0].fake_calls == 1 and net[0].real_calls == 0
    # An ordinary trace afterwards computes for real.
    with model.trace(torch.rand(4, 5)):
        real = model.output.save()
    assert not isinstance(real, FakeTensor) and net[0].real_calls == 1
