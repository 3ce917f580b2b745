"""Fixtures for the research workflows: the tiny GPT-2 through Interlace, and a separately
loaded plain copy of it for the hand-written raw-hooks truth (see tests/raw_truth.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

import interlace
from raw_truth import RawLM  # tests/raw_truth.py


@pytest.fixture(scope="session")
def lm(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """The tiny GPT-2 by path (the key the test server hosts it under)."""
    return interlace.LanguageModel(str(tiny_gpt2_path))


@pytest.fixture(scope="session")
def raw(tiny_gpt2_path: Path) -> RawLM:
    return RawLM(tiny_gpt2_path)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not fight parallel jobs for cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
