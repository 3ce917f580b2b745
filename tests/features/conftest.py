"""Fixtures for the feature tests (generation, gradients, cache, scan, edit, sessions, source)."""

from __future__ import annotations

from pathlib import Path

import pytest

import interlace


@pytest.fixture(scope="session")
def feat_gpt2(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """A dispatched tiny GPT-2 shared by the feature tests (traces never change it for good)."""
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight parallel jobs for cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
