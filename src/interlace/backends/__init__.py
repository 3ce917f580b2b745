"""Backends: the one seam where local runs, the local simulation and the server differ."""

from __future__ import annotations

from typing import Any

from ..contract.options import CLIENT_OPTIONS, TraceOptionError, split_client_options
from .local import LocalBackend
from .remote import RemoteBackend, RemoteJob, attach
from .simulation import LocalSimulationBackend

__all__ = [
    "LocalBackend", "LocalSimulationBackend", "RemoteBackend", "RemoteJob", "TraceOptionError", "attach",
    "select_backend",
]

#: Every option only remote runs take; a local trace without any of these needs no checks.
REMOTE_ONLY_OPTIONS = frozenset(CLIENT_OPTIONS)


def select_backend(model: Any, remote: bool | str, kwargs: dict[str, Any]) -> Any:
    """The backend for `model.trace(..., remote=...)`; pops the client-side options it
    consumes (`remote/options.py` splits them), leaving the model's options in `kwargs`."""
    from ..execution.run import executing_remotely

    if not (remote is False or remote is None or remote is True or remote == "local"):
        raise ValueError(f"remote must be False, True or 'local', not {remote!r}.")
    if executing_remotely():
        # A trace inside a shipped session runs on the hosted model: the session's own
        # options already chose how it runs, so its inner traces' are moot.
        for name in CLIENT_OPTIONS:
            kwargs.pop(name, None)
        return LocalBackend()
    options = split_client_options(kwargs, False if remote is None else remote)
    if remote == "local":
        return LocalSimulationBackend(model, **options)
    if remote is True:
        return RemoteBackend(model, **options)
    return LocalBackend()
