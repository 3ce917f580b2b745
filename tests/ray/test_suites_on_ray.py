"""The embedded server's tests, passing unchanged on Ray: one suite, two server flavors.

The real-server suites of streaming and local blocks (tests/streaming: print lines arrive
while the job runs, `with interlace.local():` round trips, local-block time limits and a
vanished client) and of co-batching with limits (tests/cobatch/test_server_cobatch.py: four
users' jobs sharing forwards, a job stopped at its wall-clock limit) start their servers
with `server_flavor.serve_args()`. Run by pytest as usual they test the embedded server;
here they run again with INTERLACE_TEST_SERVER_FLAVOR=ray, every server started with
`--ray auto` (tests/server_flavor.py), in a pytest of their own (a session of their fixtures).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_flavor import FLAVOR_ENV  # tests/server_flavor.py

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (scripts/setup.sh does)")

TESTS = Path(__file__).resolve().parents[1]

#: (suite, pytest -k expression: its tests that use a real server).
SUITES = {
    "streaming-and-local-blocks": (["streaming"], "server or client_never_comes"),
    "cobatching-and-limits": (["cobatch/test_server_cobatch.py"], "cobatching"),
}


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_the_embedded_server_suite_passes_on_ray(suite: str, tmp_path: Path) -> None:
    paths, selection = SUITES[suite]
    env = {**os.environ, FLAVOR_ENV: "ray"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "run"),
           *[str(TESTS / p) for p in paths], "-k", selection]
    done = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
    logs = list((tmp_path / "run").rglob("server.log"))
    assert logs and all("Ray: cluster at" in log.read_text(errors="replace") for log in logs), logs  # on Ray
