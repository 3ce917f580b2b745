"""Fixtures for the feature tests (generation, gradients, cache, scan, edit, sessions, source)."""

from __future__ import annotations

from pathlib import Path

import pytest

import interlace


@pytest.fixture(scope="session")
def feat_gpt2(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """A dispatched tiny GPT-2 shared by the feature tests (traces never change it for good)."""
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)

