"""Fixtures for the engine tests: dispatched tiny models shared per session and a call counter.
Helpers live in engine_helpers.py.

The shared models are never changed by a trace (edits last one run), so tests may share them;
tests that need a fresh model (meta loading, renames) build their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import interlace
from engine_helpers import CallCounter


@pytest.fixture(scope="session")
def gpt2(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    return interlace.LanguageModel(str(tiny_gpt2_path), dispatch=True)


@pytest.fixture(scope="session")
def llama(tiny_llama_path: Path) -> interlace.LanguageModel:
    return interlace.LanguageModel(str(tiny_llama_path), dispatch=True)


@pytest.fixture
def mlp_model(tiny_mlp: torch.nn.Sequential) -> interlace.NNsight:
    return interlace.NNsight(tiny_mlp)


@pytest.fixture
def counter() -> Iterator[Callable[[torch.nn.Module], CallCounter]]:
    made: list[CallCounter] = []

    def make(module: torch.nn.Module) -> CallCounter:
        c = CallCounter(module)
        made.append(c)
        return c

    yield make
    for c in made:
        c.remove()


@pytest.fixture
def greenlet_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every body on a greenlet, as bodies that are not inline statements do
    (`reads.inline_plan` finds none), for tests of the machinery inline bodies bypass."""
    monkeypatch.setattr("interlace.tracing.tracer.inline_plan", lambda *args: None)
