"""One server process shared by the API and bad-input tests (starting one costs seconds)."""

from __future__ import annotations

import pytest

from interlace.testing import ServerProcess
from postgres import SKIP_REASON, PostgresServer  # tests/postgres.py

UPLOAD_LIMIT_MB = 0.01  # about 10 KiB: oversize uploads are cheap to test


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("server"), models=["fake", "other"],
                         args=["--max-upload-mb", str(UPLOAD_LIMIT_MB)])
    with proc:
        proc.alice = proc.create_key("alice")
        proc.bob = proc.create_key("bob")
        yield proc


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (tests/postgres.py); skipped, with the reason,
    only where its binaries are not installed."""
    bin_dir = PostgresServer.find()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    server = PostgresServer(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()
