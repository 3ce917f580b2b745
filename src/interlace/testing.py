"""TEST ONLY: a fake `JobRunner` and a server-in-a-subprocess harness, so server and client
tests need no model and no engine.

`interlace serve` uses it only when the environment variable INTERLACE_TEST_FAKE_RUNNER=1 is
set (see `interlace.cli`); never enable that on a real server.

Payload: JSON {"model_key": str, "sleep": float, "hold": path, "echo": any, "fail": str,
"log": [str], "result_bytes": int, "random_bytes": int}. "hold" makes the job wait until that
file exists (a gate the test opens with `Gate.open()`), so tests order events by state, never by
wall-clock margins that a loaded machine can overrun. Result: zstd-compressed JSON {"echo": ..., "pad": "x" * result_bytes}.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import zstandard

from .execution.errors import BadRequest, JobFailed


@dataclass
class FakeJob:
    model_key: str
    spec: dict[str, Any] = field(default_factory=dict)


class FakeRunner:
    def __init__(self, models: list[str] | None = None) -> None:
        self._models = list(models or ["fake"])

    def prepare(self, payload: bytes) -> FakeJob:
        try:
            spec = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"The payload is not a valid fake-runner payload (JSON): {exc}.", 400) from None
        if not isinstance(spec, dict):
            raise BadRequest("The payload must be a JSON object.", 400)
        problems = []
        if not isinstance(spec.get("model_key"), str):
            problems.append({"category": "schema", "message": "model_key must be a string",
                             "fix": 'add "model_key": "fake"'})
        if not isinstance(spec.get("sleep", 0), (int, float)):
            problems.append({"category": "schema", "message": "sleep must be a number", "fix": '"sleep": 0.1'})
        if problems:
            raise BadRequest(f"The payload has {len(problems)} problem(s).", 422, problems)
        if spec["model_key"] not in self._models:
            raise BadRequest(f"Model {spec['model_key']!r} is not hosted here (hosted: {self._models}).", 404)
        return FakeJob(spec["model_key"], spec)

    def run(self, job: FakeJob, log: Callable[[str], None]) -> bytes:
        spec = job.spec
        for line in spec.get("log", []):
            log(str(line))
        if spec.get("sleep"):
            time.sleep(float(spec["sleep"]))
        if spec.get("hold"):
            _wait_for_file(Path(spec["hold"]))
        if spec.get("fail"):
            raise JobFailed(f"Traceback (most recent call last):\n  File \"<trace>\", line 1\n{spec['fail']}",
                            category="user")
        body = {"echo": spec.get("echo"), "pad": "x" * int(spec.get("result_bytes", 0))}
        if spec.get("random_bytes"):  # incompressible, for download-size tests
            body["random"] = base64.b64encode(os.urandom(int(spec["random_bytes"]))).decode()
        return zstandard.ZstdCompressor(level=1).compress(json.dumps(body).encode())

    def model_keys(self) -> list[str]:
        return list(self._models)

    def policy(self) -> dict[str, Any]:
        return {"runner": "fake", "note": "test-only runner"}


HOLD_LIMIT_S = 300.0  # a forgotten gate fails the job instead of hanging the suite


def _wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise JobFailed(f"the test gate {path} was never opened", category="user")
        time.sleep(0.01)


class Gate:
    """A file the fake runner waits on (`fake_payload(hold=gate.path)`): jobs stay RUNNING until
    the test calls `open()`, across processes and server restarts."""

    def __init__(self, directory: Path | str, name: str = "gate") -> None:
        self.path = str(Path(directory) / name)

    def open(self) -> None:
        Path(self.path).touch()


def decode_fake_result(data: bytes) -> dict[str, Any]:
    return json.loads(zstandard.ZstdDecompressor().decompress(data))


def fake_payload(model_key: str = "fake", **spec: Any) -> bytes:
    return json.dumps({"model_key": model_key, **spec}).encode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A real `interlace serve` in a subprocess with the fake runner, for tests and benches."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        models: list[str] | None = None,
        args: list[str] | None = None,
        fake: bool = True,
        port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.models = models
        self.args = list(args or [])
        self.fake = fake
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        # Generous: on a loaded machine (a second test run beside this one) importing torch
        # and loading two models took over 30 s; the wait ends as soon as the server answers.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "interlace.cli", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), *self.args]
        for model in self.models or []:
            cmd += ["--model", model]
        env = dict(os.environ)
        env.pop("INTERLACE_TEST_FAKE_RUNNER", None)
        if self.fake:
            env["INTERLACE_TEST_FAKE_RUNNER"] = "1"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v1/info", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def create_key(self, name: str | None = None) -> str:
        from .server.auth import KeyStore
        from .server.db import Database

        db = Database(self.data_dir / "interlace.db")
        try:
            return KeyStore(db).create(name)[0]
        finally:
            db.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadedServer:
    """A real uvicorn server on a free loopback port, in a thread of this process (fake runner).

    Starts in a fraction of a second (no interpreter start-up), for tests that need HTTP but
    not a process to kill; use `ServerProcess` for crash tests.
    """

    def __init__(self, data_dir: Path | str, *, models: list[str] | None = None, **settings: Any) -> None:
        import uvicorn

        from .server.app import create_app
        from .server.settings import ServerSettings

        self.port = free_port()
        self.settings = ServerSettings(data_dir=Path(data_dir), port=self.port, **settings)
        self.app = create_app(self.settings, FakeRunner(models))
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                ws="websockets-sansio")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="interlace-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("threaded test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def create_key(self, name: str | None = None) -> str:
        return self.app.state.service.keys.create(name)[0]

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
