"""The client side: the backends that send a trace away, and the one place a backend is chosen.

`select_backend` turns `remote=` (and the client options) into a backend: `LocalBackend` (the
engine's own, `tracing/backend.py`), `LocalSimulationBackend` (`simulation.py`), its dry run
on fake tensors `DryRunBackend` (`dry_run.py`) or `RemoteBackend` (`remote.py`). Each takes a `CapturedTrace` and returns the saved values.
"""

from __future__ import annotations

from typing import Any

from ..contract.options import CLIENT_OPTIONS, TraceOptionError, split_client_options
from ..tracing.backend import LocalBackend, forced_local
from .dry_run import DryRunBackend
from .remote import RemoteBackend, RemoteJob, attach
from .mocks import MSG_MOCKS_IN_SHIPPED, MockedBackend, with_mocks
from .simulation import LocalSimulationBackend

__all__ = [
    "DryRunBackend", "LocalBackend", "LocalSimulationBackend", "MockedBackend", "RemoteBackend", "RemoteJob", "TraceOptionError", "attach",
    "REMOTE_ONLY_OPTIONS", "select_backend",
]

#: Every option only remote runs take; a local trace without any of these needs no checks.
REMOTE_ONLY_OPTIONS = frozenset(CLIENT_OPTIONS)


_LOCAL = LocalBackend()


def select_backend(model: Any, remote: bool | str, kwargs: dict[str, Any]) -> Any:
    """The backend for `model.trace(..., remote=...)`; pops the client-side options it
    consumes (`contract/options.py` splits them), leaving the model's options in `kwargs`.

    The one place a backend is chosen. Every trace passes here, so the common case (a local
    trace without client options) is decided first, in a few comparisons."""
    if remote is False and (not kwargs or REMOTE_ONLY_OPTIONS.isdisjoint(kwargs)):
        return _LOCAL  # it keeps no state, so every trace shares one
    if not (remote is False or remote is None or remote is True or remote == "local"):
        raise ValueError(f"remote must be False, True or 'local', not {remote!r}.")
    if forced_local():
        if "mocks" in kwargs:  # its stand-ins cannot run where this trace runs (a server)
            raise TraceOptionError(MSG_MOCKS_IN_SHIPPED)
        # A trace inside a shipped session runs on the hosted model: the session's own
        # options already chose how it runs, so its inner traces' are moot.
        for name in CLIENT_OPTIONS:
            kwargs.pop(name, None)
        return _LOCAL
    options = split_client_options(kwargs, False if remote is None else remote)
    # (`remote=True` refused `mocks=` above: a mocked run never goes to a server.)
    mocks = options.pop("mocks", None)
    if remote == "local":
        # `dry_run=True`: the same path on fake tensors (`dry_run.py`); only this mode takes it.
        dry_run = options.pop("dry_run", False)
        backend = DryRunBackend(model, **options) if dry_run else LocalSimulationBackend(model, **options)
        return backend if mocks is None else with_mocks(model, mocks, backend, load=not dry_run)
    if remote is True:
        return RemoteBackend(model, **options)
    return _LOCAL if mocks is None else with_mocks(model, mocks, _LOCAL)
