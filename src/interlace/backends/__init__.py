"""Backends: the one seam where local runs, the local simulation and the server differ."""

from __future__ import annotations

from typing import Any

from .local import LocalBackend
from .remote import RemoteBackend, RemoteJob, attach
from .simulation import LocalSimulationBackend

__all__ = ["LocalBackend", "LocalSimulationBackend", "RemoteBackend", "RemoteJob", "attach", "select_backend"]

_SIMULATION_OPTIONS = ("verbose", "strict_remote", "max_upload_mb")
_REMOTE_OPTIONS = ("blocking", "callback", "host", "api_key", "strict_remote", "verbose")
#: Every option only remote runs take; a local trace without any of these needs no checks.
REMOTE_ONLY_OPTIONS = frozenset(_SIMULATION_OPTIONS) | frozenset(_REMOTE_OPTIONS)


def select_backend(model: Any, remote: bool | str, kwargs: dict[str, Any]) -> Any:
    """The backend for `model.trace(..., remote=...)`; pops the options it consumes."""
    from ..server.executor import executing_remotely

    if executing_remotely():  # a trace inside a shipped session runs on the hosted model
        for name in set(_SIMULATION_OPTIONS) | set(_REMOTE_OPTIONS):
            kwargs.pop(name, None)
        return LocalBackend()
    if remote == "local":
        options = {k: kwargs.pop(k) for k in _SIMULATION_OPTIONS if k in kwargs}
        return LocalSimulationBackend(model, **options)
    if remote is True:
        options = {k: kwargs.pop(k) for k in _REMOTE_OPTIONS if k in kwargs}
        return RemoteBackend(model, **options)
    if remote is False or remote is None:
        stray = sorted(set(kwargs) & (set(_SIMULATION_OPTIONS) | set(_REMOTE_OPTIONS)))
        if stray:
            raise TypeError(
                f"{', '.join(stray)} only apply to remote runs; pass remote='local' (simulation) or "
                f"remote=True (server), e.g. `model.trace(x, remote='local', {stray[0]}=...)`."
            )
        return LocalBackend()
    raise ValueError(f"remote must be False, True or 'local', not {remote!r}.")
