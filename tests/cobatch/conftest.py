"""Fixtures of the co-batching tests: the client's model (encodes jobs), the served model
(runs them, as a server holds it) and the raw transformers model (the truth)."""

from __future__ import annotations

from pathlib import Path

import pytest

import interlace
from cobatch_helpers import RawTruth  # tests/cobatch/cobatch_helpers.py
from interlace.execution.integrity import guard_for


@pytest.fixture(scope="module")
def client(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """The user's copy of the model: builds the payloads."""
    return interlace.LanguageModel(str(tiny_gpt2_path))


@pytest.fixture(scope="module")
def hosted(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """The server's copy, with the baseline a server keeps to undo what a job changed."""
    model = interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)
    guard_for(model, server=True)
    return model


@pytest.fixture(scope="module")
def raw(tiny_gpt2_path: Path) -> RawTruth:
    return RawTruth(tiny_gpt2_path)
