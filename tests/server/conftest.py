"""One server process shared by the API and bad-input tests (starting one costs seconds)."""

from __future__ import annotations

import pytest

from interlace.testing import ServerProcess

UPLOAD_LIMIT_MB = 0.01  # about 10 KiB: oversize uploads are cheap to test


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("server"), models=["fake", "other"],
                         args=["--max-upload-mb", str(UPLOAD_LIMIT_MB)])
    with proc:
        proc.alice = proc.create_key("alice")
        proc.bob = proc.create_key("bob")
        yield proc
