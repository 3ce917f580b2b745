"""Test servers for code that talks to Interlace: a fake job runner and two ways to serve it.

Like Starlette's `testclient`, this is a public helper for your tests (and Interlace's own):
it serves the real HTTP app, with the real job store, auth and workers, but the jobs are
run by `FakeRunner`, which needs no model and no engine, so a test can script what a job
does (sleep, log, fail, hold until told, return N bytes) and check what the client sees.

- `ThreadedServer`: the app in a thread of this process; starts in a fraction of a second.
- `ServerProcess`: `interlace serve` in a subprocess, for tests that kill or restart the
  server (`fake=False` serves real models from `models=[...]` instead of the fake runner).
- `FakeRunner`, `fake_payload`, `decode_fake_result`: the job a test submits and its result.
- `Gate`: a file a job waits on, so a test orders events by state, never by timing.

Example (pytest, with its `tmp_path` fixture)::

    import time

    import httpx

    from interlace import __version__
    from interlace.testing import ThreadedServer, decode_fake_result, fake_payload

    def test_a_job_round_trip(tmp_path):
        with ThreadedServer(tmp_path) as server:
            headers = {"X-Interlace-Key": server.create_key("alice"), "X-Interlace-Version": __version__}
            with httpx.Client(base_url=server.url, headers=headers) as http:
                job = http.post("/v1/jobs", content=fake_payload(echo=[1, 2], log=["hi"])).json()
                while http.get(f"/v1/jobs/{job['id']}").json()["status"] != "COMPLETED":
                    time.sleep(0.01)
                result = http.get(f"/v1/jobs/{job['id']}/result").content
        assert decode_fake_result(result)["echo"] == [1, 2]

The fake payload is JSON: {"model_key": str, "sleep": float, "hold": path, "echo": any,
"fail": str, "log": [str], "result_bytes": int, "random_bytes": int, "local": [line or {"line":
int, "values": str}]} (see `FakeRunner`). Its result is zstd-compressed JSON {"echo": ..., "pad":
"x" * result_bytes} (plus "random", base64, with `random_bytes`, and "local", what the client
answered each local block: [{"line", "reads": ["path.kind"], "values": str}]).

`interlace serve` runs the fake runner only when the environment variable
INTERLACE_TEST_FAKE_RUNNER=1 is set (see `interlace.cli`); it serves no model, so never set
that on a real server.
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

from .contract.local_block import CATEGORY_NO_CLIENT, BlockDone, BlockFailed, LocalPeer, ReadRequest
from .contract.problems import Problem
from .execution.errors import BadRequest, JobFailed

__all__ = [
    "HOLD_LIMIT_S",
    "FakeJob",
    "FakeRunner",
    "Gate",
    "ServerProcess",
    "ThreadedServer",
    "decode_fake_result",
    "fake_payload",
    "free_port",
]


@dataclass
class FakeJob:
    """A fake payload accepted by `FakeRunner.prepare`: its model key and the whole spec."""

    model_key: str
    spec: dict[str, Any] = field(default_factory=dict)


class FakeRunner:
    """A job runner (the server's `JobRunner` protocol) that runs scripted jobs, not models.

    It hosts the model keys `models` (default `["fake"]`) and runs payloads made by
    `fake_payload(model_key, **spec)`. `prepare` rejects what a real runner would: bytes that
    are not a JSON object (400), a spec with wrong types (422, with problems) and an unknown
    model key (404). `run` then, in this order: sends each line of `log` as a log line, runs each
    scripted local block of `local` through the job's peer (the values are the text `values`;
    each read of the client is answered `value of <path>.<kind>`; a failed block fails the job
    with the client's text and category), sleeps
    `sleep` seconds, waits for the file `hold` to exist (see `Gate`; at most `HOLD_LIMIT_S`),
    fails with the text `fail` as a user error, else returns the result `decode_fake_result`
    reads: `{"echo": echo, "pad": "x" * result_bytes}`, plus `random_bytes` of incompressible
    data (base64) under "random".
    """

    def __init__(self, models: list[str] | None = None, policy: Any = None) -> None:
        self._models = list(models or ["fake"])
        self._policy = policy  # its limits are the server's (`interlace serve --max-upload-mb`, ...)

    def prepare(self, payload: bytes) -> FakeJob:
        try:
            spec = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"The payload is not a valid fake-runner payload (JSON): {exc}.", 400) from None
        if not isinstance(spec, dict):
            raise BadRequest("The payload must be a JSON object.", 400)
        problems = []
        if not isinstance(spec.get("model_key"), str):
            problems.append(Problem(category="schema", message="model_key must be a string",
                                    fix='add "model_key": "fake"'))
        if not isinstance(spec.get("sleep", 0), (int, float)):
            problems.append(Problem(category="schema", message="sleep must be a number", fix='"sleep": 0.1'))
        if problems:
            raise BadRequest(f"The payload has {len(problems)} problem(s).", 422, problems)
        if spec["model_key"] not in self._models:
            raise BadRequest(f"Model {spec['model_key']!r} is not hosted here (hosted: {self._models}).", 404)
        return FakeJob(spec["model_key"], spec)

    def run(self, job: FakeJob, log: Callable[[str], None], local: LocalPeer | None = None) -> bytes:
        spec = job.spec
        for line in spec.get("log", []):
            log(str(line))
        blocks = [_run_fake_block(local, block) for block in spec.get("local", [])]
        if spec.get("sleep"):
            time.sleep(float(spec["sleep"]))
        if spec.get("hold"):
            _wait_for_file(Path(spec["hold"]))
        if spec.get("fail"):
            raise JobFailed(f"Traceback (most recent call last):\n  File \"<trace>\", line 1\n{spec['fail']}",
                            category="user")
        body = {"echo": spec.get("echo"), "pad": "x" * int(spec.get("result_bytes", 0))}
        if blocks:
            body["local"] = blocks
        if spec.get("random_bytes"):  # incompressible, for download-size tests
            body["random"] = base64.b64encode(os.urandom(int(spec["random_bytes"]))).decode()
        return zstandard.ZstdCompressor(level=1).compress(json.dumps(body).encode())

    def model_keys(self) -> list[str]:
        return list(self._models)

    def policy(self) -> dict[str, Any]:
        from .contract.policy import DEFAULT_POLICY

        return {**(self._policy or DEFAULT_POLICY).to_json(), "runner": "fake", "note": "test-only runner"}


def _run_fake_block(local: LocalPeer | None, block: Any) -> dict[str, Any]:
    """One scripted local block: `start` with the spec's values, answer each read with the text
    `value of <path>.<kind>`, and say what the client sent (or fail the job as it asked)."""
    if isinstance(block, int):
        block = {"line": block}
    line = int(block.get("line", 1))
    if local is None:
        raise JobFailed(f"the fake job reached a local block at line {line} without a peer", category=CATEGORY_NO_CLIENT)
    reads: list[str] = []
    message = local.start(line, str(block.get("values", f"values of line {line}")).encode())
    while isinstance(message, ReadRequest):
        reads.append(f"{message.path}.{message.kind}")
        message = local.reply(f"value of {message.path}.{message.kind}".encode())
    if isinstance(message, BlockFailed):
        raise JobFailed(message.text, category=message.category)
    assert isinstance(message, BlockDone)
    return {"line": line, "reads": reads, "values": message.values.decode("utf-8", "replace")}


#: Seconds a job waits on a `Gate` at most: a gate the test forgets to open fails the job
#: instead of hanging the test run.
HOLD_LIMIT_S = 300.0


def _wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise JobFailed(f"the test gate {path} was never opened", category="user")
        time.sleep(0.01)


class Gate:
    """A file the fake runner waits on: a job submitted with `fake_payload(hold=gate.path)`
    stays RUNNING until the test calls `gate.open()`.

    The gate is a file (`directory/name`), so it holds across processes and server restarts:
    a test can submit, kill the server, restart it and only then let the job finish.
    """

    def __init__(self, directory: Path | str, name: str = "gate") -> None:
        self.path = str(Path(directory) / name)

    def open(self) -> None:
        Path(self.path).touch()


def decode_fake_result(data: bytes) -> dict[str, Any]:
    """The result of a `FakeRunner` job, from the bytes `GET /v1/jobs/{id}/result` returns."""
    return json.loads(zstandard.ZstdDecompressor().decompress(data))


def fake_payload(model_key: str = "fake", **spec: Any) -> bytes:
    """The request body of a `FakeRunner` job (`POST /v1/jobs`); `spec` as `FakeRunner` reads it."""
    return json.dumps({"model_key": model_key, **spec}).encode()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the servers here pick one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A real `interlace serve` in a subprocess, for tests and benches; a context manager.

    With `fake=True` (the default) the server runs `FakeRunner` for the keys `models`
    (default `["fake"]`); with `fake=False` it loads and serves the real models named in
    `models` (hub ids or paths). `args` are more `interlace serve` options (`["--max-upload-mb",
    "1"]`). The data (database, results) and `server.log` live in `data_dir`, so a second
    `ServerProcess` on the same `data_dir` is the same server restarted. `start()` waits until
    the server answers; `stop()` shuts it down, `kill()` crashes it (SIGKILL), `log()` is its
    output so far, and `create_key(name)` makes an API key in its database. `store`: a
    `postgresql://` URL the server keeps its jobs and keys in (`interlace serve --store`), which
    several `ServerProcess`es share as API replicas; `create_key` then writes the key there.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        models: list[str] | None = None,
        args: list[str] | None = None,
        fake: bool = True,
        port: int | None = None,
        store: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store = store
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
        if self.store:
            cmd += ["--store", self.store]
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
        from .server.db import open_database

        db = open_database(self.store, self.data_dir)
        try:
            return KeyStore(db).create(name)[0]
        finally:
            db.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadedServer:
    """The real server app on a free loopback port, in a thread of this process; a context manager.

    Jobs are run by `FakeRunner(models, policy)` (`policy`: a `contract.policy.Policy` whose limits
    the server enforces, default `DEFAULT_POLICY`). Other keyword arguments are `ServerSettings` fields
    (`result_ttl=1`, `result_store=url`, ...). It starts in a fraction of a second (no
    interpreter start-up), for tests that need HTTP but no process to kill; use
    `ServerProcess` for crash and restart tests. `create_key(name)` makes an API key.
    """

    def __init__(self, data_dir: Path | str, *, models: list[str] | None = None, policy: Any = None,
                 **settings: Any) -> None:
        import uvicorn

        from .server.app import create_app
        from .server.settings import ServerSettings

        self.port = free_port()
        self.settings = ServerSettings(data_dir=Path(data_dir), port=self.port, **settings)
        self.app = create_app(self.settings, FakeRunner(models, policy))
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
