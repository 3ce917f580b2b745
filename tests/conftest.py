"""Shared fixtures: deterministic tiny models built offline (see interlace.models.demo).

Set INTERLACE_TEST_MODELS_DIR to build the models there once and reuse them across runs;
otherwise they are built (in about a second) under pytest's temp dir each session.
"""

from __future__ import annotations

import os

# Before transformers is imported anywhere: model hubs are unreachable, so fail fast
# instead of waiting on network timeouts if something tries to download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so CI cannot pass once and fail the
# next on a newly drawn case; `HYPOTHESIS_PROFILE=explore` draws fresh ones when hunting.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

import pytest  # noqa: E402
import torch  # noqa: E402

from interlace.models.demo import build_tiny_gpt2, build_tiny_llama, build_tiny_mlp  # noqa: E402

ET_PROMPT = "The Eiffel Tower is in the city of"
MSG_PROMPT = "Madison Square Garden is located in the city of"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny models live: INTERLACE_TEST_MODELS_DIR (cached) or a session temp dir."""
    cached = os.environ.get("INTERLACE_TEST_MODELS_DIR")
    if cached:
        path = Path(cached).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_gpt2_path(models_dir: Path) -> Path:
    """A GPT-2 (4 layers x 128, vocab 512) with its tokenizer, loadable by path."""
    return build_tiny_gpt2(models_dir / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama_path(models_dir: Path) -> Path:
    """A Llama (2 layers x 64, grouped-query attention) with its tokenizer, loadable by path."""
    return build_tiny_llama(models_dir / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2_sdpa_path(tiny_gpt2_path: Path) -> Path:
    """The tiny GPT-2 (same weights) whose attention calls `scaled_dot_product_attention`
    (config.json says sdpa, so every mode's copy of it, the server's too, uses it)."""
    import json
    import shutil
    import uuid

    from interlace.models.demo import MARKER_FILE

    path = tiny_gpt2_path.parent / "tiny-gpt2-sdpa"
    marker = (tiny_gpt2_path / MARKER_FILE).read_text(encoding="utf-8")
    if not (path / MARKER_FILE).exists() or (path / MARKER_FILE).read_text(encoding="utf-8") != marker:
        shutil.rmtree(path, ignore_errors=True)  # (a copy of an older build)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"  # parallel runs may share the dir
        shutil.copytree(tiny_gpt2_path, tmp)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config["attn_implementation"] = "sdpa"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            tmp.rename(path)
        except OSError:  # another run made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _history_in_temp_dir(tmp_path_factory: pytest.TempPathFactory):
    """The local job history (every remote and simulated run records itself) goes to a
    session temp dir, never the user's real `~/.local/share/interlace`. Tests of the history
    itself point it at a dir of their own (`tests/backends/test_history.py`)."""
    previous = os.environ.get("INTERLACE_DATA_DIR")
    os.environ["INTERLACE_DATA_DIR"] = str(tmp_path_factory.mktemp("interlace-data"))
    yield
    if previous is None:
        os.environ.pop("INTERLACE_DATA_DIR", None)
    else:
        os.environ["INTERLACE_DATA_DIR"] = previous


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight parallel jobs for cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_mlp() -> torch.nn.Sequential:
    """A fresh layer1 -> act -> layer2 MLP per test, since tests may modify it."""
    return build_tiny_mlp()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    """A (1, 5) input for ``tiny_mlp``."""
    torch.manual_seed(0)
    return torch.rand(1, 5)


@pytest.fixture
def et_prompt() -> str:
    return ET_PROMPT


@pytest.fixture
def msg_prompt() -> str:
    return MSG_PROMPT


# --- The three modes -------------------------------------------------------------------------
# Feature tests take `mode` and run once per mode: locally (False), through the faithful
# simulation ("local"), and against a real `interlace serve` started once per test session
# (True). Each must give the same answer, checked against an independent truth.

MODES = (False, "local", True)
MODE_IDS = {False: "local-run", "local": "simulated", True: "server"}


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_path: Path, tiny_llama_path: Path,
                tiny_gpt2_sdpa_path: Path):
    """One real server (real runner, no fakes) hosting the tiny GPT-2 (eager and sdpa) and Llama, by path."""
    from interlace.testing import ServerProcess
    from server_flavor import serve_args  # tests/server_flavor.py: embedded, or on Ray

    proc = ServerProcess(tmp_path_factory.mktemp("real-server"),
                         models=[str(tiny_gpt2_path), str(tiny_llama_path), str(tiny_gpt2_sdpa_path)], fake=False,
                         args=serve_args())
    # Waits for the server to answer, up to a bound generous enough for a machine busy with
    # other test runs (starting it and loading three models can take over 30 s there).
    proc.start(timeout=180)
    try:
        proc.key = proc.create_key("tests")
        proc.other_key = proc.create_key("tests-other")
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def use_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Point the client at the session's real server (host, key, quiet status display)."""
    import interlace

    server = request.getfixturevalue("real_server")
    monkeypatch.setattr(interlace.CONFIG.API, "HOST", server.url)
    monkeypatch.setattr(interlace.CONFIG.API, "APIKEY", server.key)
    monkeypatch.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
    return server


@pytest.fixture(params=MODES, ids=lambda m: MODE_IDS[m])
def mode(request: pytest.FixtureRequest):
    """`remote=` for the test's traces: False, "local", or True against the real server."""
    if request.param is True:
        request.getfixturevalue("use_server")
    return request.param


@pytest.fixture
def raises_in_mode(mode):
    """`with raises_in_mode(TracingError, match="..."):` the user error a trace raises in this
    mode: the error itself when run here, and remotely either that error or the job's
    RemoteException, whose text must then name the error's type as well as match."""
    import re
    from contextlib import contextmanager

    from interlace import RemoteException

    @contextmanager
    def check(exc_type: type[BaseException], match: str):
        expected = exc_type if mode is False else (exc_type, RemoteException)
        with pytest.raises(expected) as info:
            yield info
        text = str(info.value)
        if not isinstance(info.value, exc_type):
            assert exc_type.__name__ in text, text
        assert re.search(match, text), text

    return check
