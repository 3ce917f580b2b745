"""Interlace: look inside PyTorch models and change what happens there.

Run a traced block here (`remote=False`), in a faithful in-process simulation of a server
(`remote="local"`), or on an Interlace server (`remote=True`).
"""

from ._version import __version__
from .backends.history import JobHistory as _JobHistory
from .backends.pending import ResultNotReadyError
from .backends.remote import RemoteJob, attach
from .config import CONFIG
from .errors import (
    GenerationEndedWarning,
    InterlaceError,
    MissedProviderError,
    ModuleNotCalledError,
    NotSavedError,
    OutOfOrderError,
    RemoteException,
    RemoteRequestError,
    ServerUnreachableError,
    SourceNotFoundError,
    TracingError,
    WaitTimeout,
)
from .models import LanguageModel, NNsight
from . import remote  # callable: @interlace.remote (see remote.py)
from .contract.options import TraceOptionError
from .contract.problems import RemoteValidationError
from .tracing.cache import Cache, CacheEntry
from .tracing.envoy import Envoy
from .tracing.local_block import List as _List, local, trace
from .tracing.saving import save

__all__ = [
    "__version__",
    "CONFIG",
    "jobs",
    "NNsight",
    "LanguageModel",
    "Envoy",
    "Cache",
    "CacheEntry",
    "save",
    "local",
    "trace",
    "remote",
    "attach",
    "RemoteJob",
    "GenerationEndedWarning",
    "InterlaceError",
    "MissedProviderError",
    "ModuleNotCalledError",
    "NotSavedError",
    "OutOfOrderError",
    "RemoteException",
    "RemoteRequestError",
    "RemoteValidationError",
    "ResultNotReadyError",
    "ServerUnreachableError",
    "SourceNotFoundError",
    "TraceOptionError",
    "TracingError",
    "WaitTimeout",
]


def _load_for_rerun(spec: dict) -> object:
    """Load a recorded job's model from its files, as a worker process does (`jobs.rerun`)."""
    from .models.worker import load_model

    return load_model(spec)


#: The local job history: `jobs.list()`, `jobs.show(id)`, `jobs.rerun(id, remote=...)`,
#: `jobs.diff(a, b)`, `jobs.prune(...)` (`backends/history.py`).
jobs = _JobHistory(load_model=_load_for_rerun)


def __getattr__(name: str) -> object:
    # `interlace.list()` (a list whose `append` returns it, as in nnsight) is reached by name
    # only: listed in `__all__`, `from interlace import *` would shadow the built-in `list`.
    if name == "list":
        return _List
    raise AttributeError(f"module 'interlace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"list"})
