"""Fixtures for the research workflows: the tiny GPT-2 through Interlace, and a separately
loaded plain copy of it for the hand-written raw-hooks truth (see tests/raw_truth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import interlace
from raw_truth import RawLM  # tests/raw_truth.py


@pytest.fixture(scope="session")
def lm(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """The tiny GPT-2 by path (the key the test server hosts it under)."""
    return interlace.LanguageModel(str(tiny_gpt2_path))


@pytest.fixture(scope="session")
def raw(tiny_gpt2_path: Path) -> RawLM:
    return RawLM(tiny_gpt2_path)

