"""Fixtures for the seeds' examples: the tiny models by path, and a plain transformers copy of
each to compute the expected values with raw PyTorch hooks (independent of Interlace)."""

from __future__ import annotations

from pathlib import Path

import pytest

import interlace
from raw_truth import RawLM  # tests/raw_truth.py


@pytest.fixture(scope="session")
def raw_gpt2(tiny_gpt2_path: Path) -> RawLM:
    return RawLM(tiny_gpt2_path)


@pytest.fixture(scope="session")
def model(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """`model = LanguageModel("gpt2")` in the seeds: the tiny GPT-2, by path (as the server hosts it)."""
    return interlace.LanguageModel(str(tiny_gpt2_path))


@pytest.fixture(scope="session")
def raw_llama(tiny_llama_path: Path) -> RawLM:
    return RawLM(tiny_llama_path)
