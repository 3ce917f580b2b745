"""Fixtures for hybrid execution (`with interlace.local():` inside remote traces).

The truth is always a separately loaded transformers copy run under raw hooks (RawLM), or a
plain `generate` on it; never Interlace itself. `limits_server` is a second real server whose
local-block limits are short (BLOCK_LIMIT_S per block, GRACE_S without a client: the grace is
the shorter, so a job nobody follows fails as the client's absence, not as a slow block), for
the failure cases that need a limit to run out; every other server test uses the session's `real_server`
through the `mode` fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import interlace
from raw_truth import RawLM  # tests/raw_truth.py
from server_flavor import serve_args  # tests/server_flavor.py: embedded, or on Ray
from streaming_helpers import BLOCK_LIMIT_S, GRACE_S


@pytest.fixture(scope="session")
def gpt2(tiny_gpt2_path: Path) -> interlace.LanguageModel:
    """The tiny GPT-2 by path: the key both test servers host it under."""
    return interlace.LanguageModel(str(tiny_gpt2_path))


@pytest.fixture(scope="session")
def raw_gpt2(tiny_gpt2_path: Path) -> RawLM:
    return RawLM(tiny_gpt2_path)


@pytest.fixture(scope="session")
def limits_server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_path: Path):
    """A real server (real runner, worker process) with short local-block limits."""
    from interlace.testing import ServerProcess

    proc = ServerProcess(tmp_path_factory.mktemp("limits-server"), models=[str(tiny_gpt2_path)], fake=False,
                         args=serve_args("--local-block-timeout", str(BLOCK_LIMIT_S), "--local-grace", str(GRACE_S)))
    proc.start(timeout=180)
    try:
        proc.key = proc.create_key("streaming-limits")
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def on_limits_server(limits_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point the client's `remote=True` at `limits_server` (quiet status display)."""
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", limits_server.url)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", limits_server.key)
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
    return limits_server
