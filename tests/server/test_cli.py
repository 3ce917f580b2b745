"""The `interlace` command (keys, jobs, serve's safety checks)."""

from __future__ import annotations

from interlace import cli
from interlace.server.auth import KeyStore
from interlace.server.db import Database
from interlace.server.service import JobService
from interlace.server.settings import ServerSettings
from interlace.testing import FakeRunner, fake_payload


def test_keys_create_list_revoke(tmp_path, capsys):
    data = str(tmp_path)
    assert cli.main(["keys", "create", "--name", "alice", "--data-dir", data]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("il_") and "shown only once" in err and "INTERLACE_API_KEY" in err
    keys = KeyStore(Database(tmp_path / "interlace.db"))
    user = keys.verify(key)
    assert user.name == "alice"

    assert cli.main(["keys", "list", "--data-dir", data]) == 0
    listing = capsys.readouterr().out
    assert user.key_id in listing and "alice" in listing and "active" in listing and key not in listing

    assert cli.main(["keys", "revoke", user.key_id, "--data-dir", data]) == 0
    assert keys.verify(key) is None
    assert cli.main(["keys", "revoke", user.key_id, "--data-dir", data]) == 1
    assert "no active key" in capsys.readouterr().err


def test_jobs_lists_everyone(tmp_path, capsys):
    service = JobService(ServerSettings(data_dir=tmp_path), FakeRunner())
    for name in ("alice", "bob"):
        user = service.keys.verify(service.keys.create(name)[0])
        service.accept(user, fake_payload(), callback=None, client_version=None)
    assert cli.main(["jobs", "list", "--server-data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "bob" in out and out.count("QUEUED") == 2 and "fake" in out


def test_serve_refuses_public_address_without_insecure(tmp_path, capsys):
    # Jobs in a thread of the server: layer 3 is missing, so a public address is refused.
    assert cli.main(["serve", "--host", "0.0.0.0", "--isolation", "thread", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--insecure" in err and "127.0.0.1" in err and "layer 3" in err and "missing: process" in err


def test_serve_refuses_public_address_when_the_host_lacks_a_sandbox_layer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_sandbox_layers", lambda isolation: {
        "process": True, "namespaces": False, "seccomp": True, "rlimits": True})
    assert cli.main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing: namespaces" in err and "apt-get install bubblewrap python3-seccomp" in err
