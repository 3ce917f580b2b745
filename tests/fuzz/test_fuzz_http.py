"""Schema-driven fuzzing of the HTTP API: schemathesis reads the served OpenAPI document and sends
generated requests (with a valid key, and without) to a real server; no answer may be a 5xx and
none may take longer than 10 s. Against the fake runner (every route, fast) and against a real
model (the payload route decodes and validates what it is sent).

`INTERLACE_FUZZ_HTTP_EXAMPLES` sets the examples per operation (default 40).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from interlace._version import __version__
from interlace.contract.policy import Policy
from interlace.testing import ServerProcess, ThreadedServer

EXAMPLES = os.environ.get("INTERLACE_FUZZ_HTTP_EXAMPLES", "40")
SCHEMATHESIS = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))

pytestmark = pytest.mark.skipif(not Path(SCHEMATHESIS).exists(),
                                reason="schemathesis is not installed (pip install -e '.[test]')")


def _fuzz(url: str, key: str, cwd: Path, extra: list[str] = ()) -> None:
    result = subprocess.run(
        [SCHEMATHESIS, "run", f"{url}/openapi.json",
         "-H", f"X-Interlace-Key: {key}", "-H", f"X-Interlace-Version: {__version__}",
         "--checks", "not_a_server_error", "--max-response-time", "10", "--request-timeout", "20",
         "-n", EXAMPLES, "--seed", os.environ.get("INTERLACE_FUZZ_SEED", "16"), "--warnings", "off", "-w", "1",
         *extra],
        capture_output=True, text=True, timeout=900, cwd=cwd,  # (its example database goes there)
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout


def test_every_route_of_the_api(tmp_path):
    # Limits high enough that the fuzzer's own request rate is not what it tests (test_limits.py does).
    with ThreadedServer(tmp_path / "data", policy=Policy(requests_per_minute=10**6, max_queued_per_key=10**6)) as server:
        _fuzz(server.url, server.create_key("fuzz"), tmp_path)


def test_the_payload_route_of_a_real_model_server(tmp_path, tiny_gpt2_path):
    args = ["--requests-per-minute", "1000000", "--max-queued-per-key", "1000000", "--max-upload-mb", "1"]
    with ServerProcess(tmp_path / "data", models=[str(tiny_gpt2_path)], fake=False, args=args) as server:
        _fuzz(server.url, server.create_key("fuzz"), tmp_path, ["--include-method", "POST"])
        log = server.log()
    assert "Traceback" not in log, log[-4000:]
