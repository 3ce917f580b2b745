"""The engine: run a `with` body beside a model's forward, in this process.

Layers above (`backends/`, `execution/`, `models/`, `contract/`) import the engine from here
or from its modules; the engine imports nothing above it (only `errors` and `config`). The
model it runs beside is a `Host` (`host.py`); how a trace reaches a run is a `Backend`
(`backend.py`). A map of the files is in `README.md`.
"""

from __future__ import annotations

from .backend import Backend, CapturedTrace, LocalBackend, TraceOutcome, forced_local, running_shipped_body
from .cache import Cache, CacheEntry
from .cache_entries import NOT_CACHED
from .capture import Block, block_from_source
from .edit import EditingTracer, edit_mediators, export_edits, import_edits
from .envoy import Envoy, OperationEnvoy, SourceEnvoy, mount_clashes, source_envoy
from .frames import user_location
from .host import EnvoyLike, Host
from .interleaver import Interleaver, ModuleHooks, OrderTable
from .local_block import LOCAL_HELPER, LOCAL_ONLY_ATTR, List, LocalBlockCode, is_local_only, local, trace
from .mediator import INPUT, OUTPUT, Mediator, current_mediator
from .mock import Mock, MockError, mocks_applied, resolve_mocks
from .namespace import MISSING, body_namespace
from .outer_names import first_uses, free_names
from .placeholder import Placeholder
from .saving import pop_registry, push_registry, save
from .scan import ScanningTracer
from .source import source_paths
from .tracer import Barrier, InterleavingTracer, Invoker, Session, Tracer
from .unsaved import NotSaved
from .with_detection import enters_with

__all__ = [
    # contexts
    "Tracer", "InterleavingTracer", "Invoker", "Session", "Barrier", "EditingTracer", "ScanningTracer",
    # what a body reads and saves
    "Envoy", "SourceEnvoy", "OperationEnvoy", "Cache", "CacheEntry", "NOT_CACHED", "save", "Placeholder", "NotSaved",
    # the seams: the model it runs beside, and how a trace reaches a run
    "Host", "EnvoyLike", "Backend", "CapturedTrace", "LocalBackend", "TraceOutcome",
    "forced_local", "running_shipped_body",
    # mocks= (for backends/): stand-ins in place of modules for a run
    "Mock", "MockError", "mocks_applied", "resolve_mocks",
    # running bodies (for models/)
    "Interleaver", "Mediator", "ModuleHooks", "OrderTable", "current_mediator", "INPUT", "OUTPUT",
    "mount_clashes", "edit_mediators", "export_edits", "import_edits", "enters_with",
    # shipping bodies (for backends/, execution/)
    "Block", "block_from_source", "body_namespace", "MISSING", "push_registry", "pop_registry",
    "source_envoy", "source_paths", "first_uses", "free_names", "user_location",
    # hybrid bodies: `with interlace.local():` blocks (their code stays on the client)
    "LocalBlockCode", "LOCAL_HELPER", "LOCAL_ONLY_ATTR", "List", "is_local_only", "local", "trace",
]
