"""Fixtures of the red-team suite: one real server for the module, its limits, the truth.

The server runs `interlace serve` on the tiny GPT-2 with a secret only in its environment
(`INTERLACE_SECURITY_SECRET`, and `INTERLACE_API_KEY` holding a credential the server process
has), and with the smallest limits its CLI offers (`LIMITS`, applied by whichever flags
`interlace serve --help` lists, see `limit_args`). The truth is computed once, with raw
PyTorch hooks on a separately loaded copy of the model (transformers alone, no Interlace).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from security_harness import PROMPT, SECRET_ENV, limit_args


@pytest.fixture(scope="module")
def secret() -> str:
    return "ENVSECRET-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def secret_env(secret: str):
    """The secret in this process's environment for the module (local mode reads it here; the
    server's copy of the environment is taken when it starts)."""
    old = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = secret
    yield secret
    if old is None:
        os.environ.pop(SECRET_ENV, None)
    else:
        os.environ[SECRET_ENV] = old


@pytest.fixture(scope="module")
def serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "interlace.cli", "serve", "--help"], capture_output=True,
                          text=True, timeout=120, check=False).stdout


class SecurityServer:
    """The module's server: restartable (same data dir, keys kept) when an attempt kills it."""

    def __init__(self, data_dir: Path, model_path: Path, args: list[str], secret: str) -> None:
        from interlace.testing import ServerProcess

        self.data_dir = data_dir
        self.secret = secret
        self.proc = ServerProcess(data_dir, models=[str(model_path)], fake=False, args=args)
        self.restarts = 0

    def start(self) -> None:
        extra = {SECRET_ENV: self.secret, "INTERLACE_API_KEY": "APIKEY-" + self.secret}
        saved = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        try:
            self.proc.start(timeout=180)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def alive(self) -> bool:
        import httpx

        if self.proc.proc is None or self.proc.proc.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/v1/info", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def restart(self) -> None:
        self.restarts += 1
        self.proc.kill()
        self.proc.port = __import__("interlace.testing", fromlist=["free_port"]).free_port()
        self.start()


@pytest.fixture(scope="module")
def security_server(tmp_path_factory, tiny_gpt2_path, secret_env, serve_help):
    args, missing = limit_args(serve_help)
    server = SecurityServer(tmp_path_factory.mktemp("security-server"), tiny_gpt2_path, args, secret_env)
    server.missing_limits = missing
    server.start()
    server.attacker_key = server.proc.create_key("attacker")
    server.other_key = server.proc.create_key("other-user")
    try:
        yield server
    finally:
        server.proc.stop()


@pytest.fixture(scope="module")
def truth(tiny_gpt2_path):
    """Layer 0's output and the logits of PROMPT, from transformers alone under a plain hook."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gpt2_path))
    seen = {}
    handle = model.transformer.h[0].register_forward_hook(lambda m, a, out: seen.__setitem__("h0", out.clone()))
    with torch.no_grad():
        logits = model(**tokenizer(PROMPT, return_tensors="pt")).logits
    handle.remove()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = [model.config.output_hidden_states, model.config.output_attentions, model.config.n_layer]
    return {"h0": seen["h0"], "logits": logits, "state": state, "cfg": cfg}


@pytest.fixture(scope="module")
def listener():
    """A loopback socket attempts try to connect to (none may)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()
