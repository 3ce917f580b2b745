"""Exceptions users see. Each message names the problem and shows the fix.

Every exception that reaches a user is an `InterlaceError`, so `except interlace.InterlaceError:`
catches whatever Interlace raises, in every mode. Where Python has a matching built-in, the
class is one too (shown in brackets), so the `except ValueError:` a user would write for plain
Python (or for nnsight) keeps working::

    InterlaceError
    ├── TracingError [ValueError]                a trace used in a way that cannot work
    │   ├── SourceNotFoundError                  the `with` block's source cannot be read
    │   ├── NotSavedError [UnboundLocalError]    a name used after the block, never saved
    │   ├── MockError                            tracing/mock.py: a `mocks=` entry that cannot apply
    │   ├── HostedModelError                     models/hosted.py: a model known only by its key
    │   └── LocalBlockError                      backends/local_runner.py: a local block that could not run or send
    ├── MissedProviderError                      a module value that was never delivered
    │   ├── OutOfOrderError                      asked for after its module ran
    │   └── ModuleNotCalledError                 the forward never called the module
    ├── TraceOptionError [TypeError]             contract/options.py: a keyword this mode refuses
    ├── RemoteValidationError                    contract/problems.py: the request breaks the policy
    ├── UnsupportedValueError [TypeError]        contract/errors.py: a value the wire cannot carry
    ├── RemoteProtocolError                      contract/errors.py: what client and server exchange
    │   └── WireFormatError                      bytes that do not follow the wire format
    ├── RemoteRequestError                       the server refused a request (HTTP 4xx/5xx)
    ├── RemoteException                          a job failed on the server (`tb_string`)
    │   └── Remote<Name> [<Name>]                ... and its code raised <Name> (IndexError, ...)
    ├── ServerUnreachableError [ConnectionError] no server answers at the configured host
    ├── WaitTimeout [TimeoutError]               `wait(timeout=)` ran out; the job goes on
    ├── JobHistoryError [LookupError]            backends/history.py: an unknown job id, an impossible rerun
    ├── FakeValueError [RuntimeError]            backends/dry_run.py: a dry run's fake value asked for data
    └── ResultNotReadyError [RuntimeError]       backends/pending.py: a `blocking=False` value used early

    Warning
    └── UserWarning
        ├── GenerationEndedWarning               generation stopped before a step the body awaited
        ├── DryRunWarning                        backends/dry_run.py: what a dry run would save (values fake)
        └── LocalBlockUnserved                   backends/follow.py: a job waits for a local block this client cannot run

Classes live here unless they need a layer above this one (a `Problem`, a placeholder): those
are defined where the data is, and listed above with their module. Exceptions that never leave
Interlace (the server's `ApiError`, `execution.errors.BadRequest`/`JobFailed`, which become
HTTP answers and job states) are not part of this tree.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
import warnings
from functools import lru_cache
from typing import Any, Iterator

__all__ = [
    "InterlaceError",
    "MissedProviderError",
    "OutOfOrderError",
    "ModuleNotCalledError",
    "SourceNotFoundError",
    "NotSavedError",
    "TracingError",
    "RemoteException",
    "RemoteRequestError",
    "ServerUnreachableError",
    "WaitTimeout",
    "GenerationEndedWarning",
]


class InterlaceError(Exception):
    """Base class of Interlace's own errors."""


class TracingError(InterlaceError, ValueError):
    """A trace was used in a way that cannot work (the message says how to fix it). A
    `ValueError` too, which is what nnsight raises for these (an invoke inside an invoke, a
    negative step, a module read outside a running trace), so `except ValueError:` works."""


class MissedProviderError(InterlaceError):
    """A requested module value was not (or can no longer be) delivered."""


class OutOfOrderError(MissedProviderError):
    """A module value was requested after the module had already run in this forward."""


class ModuleNotCalledError(MissedProviderError):
    """The forward ended without ever calling the requested module."""


class SourceNotFoundError(TracingError):
    """The source of a `with` block could not be read, so it cannot be traced."""


class NotSavedError(TracingError, UnboundLocalError):
    """A name the trace body assigned, used after the block, but never saved (so it has no
    value outside the trace). An `UnboundLocalError` too, which is what Python would raise."""


# -- a job on a server ---------------------------------------------------------------------------


class RemoteRequestError(InterlaceError):
    """The server refused a request (4xx/5xx). `problems` lists validation problems (422)."""

    def __init__(self, status_code: int, detail: str, problems: list[dict[str, Any]] | None = None) -> None:
        self.status_code = status_code
        self.detail = detail
        self.problems = problems
        text = f"HTTP {status_code}: {detail}"
        for problem in problems or ():
            where = f"{problem.get('filename')}:{problem.get('lineno')}: " if problem.get("filename") else ""
            fix = f" (fix: {problem['fix']})" if problem.get("fix") else ""
            text += f"\n  - {where}{problem.get('message', problem)}{fix}"
        super().__init__(text)


class ServerUnreachableError(InterlaceError, ConnectionError):
    """No Interlace server answers at the client's host (the message names it and the fix). A
    `ConnectionError` too, which is what `except ConnectionError:` written for it expects."""


class WaitTimeout(InterlaceError, TimeoutError):
    """`Job.wait(timeout=...)` ran out; the job itself goes on."""


class RemoteException(InterlaceError):
    """A job failed on the server; `tb_string` is the server's account (a traceback).

    When the job's code raised a built-in exception or one of Interlace's own (`category` is
    its name), the RemoteException is an instance of that class too, so the `except
    IndexError:` or `except interlace.OutOfOrderError:` written for a local run also catches
    it remotely (nnsight's `remote='local'` raises the original type).
    """

    def __new__(cls, tb_string: str = "", *args: Any, category: str | None = None, **kwargs: Any) -> "RemoteException":
        if cls is RemoteException and category:
            cls = _remote_exception_class(category)
        return super().__new__(cls, tb_string)

    def __init__(self, tb_string: str, *, job_id: str | None = None, category: str | None = None) -> None:
        Exception.__init__(self, tb_string)
        self.tb_string = tb_string
        self.job_id = job_id
        self.category = category

    def __str__(self) -> str:
        return self.tb_string

    def __reduce__(self) -> Any:
        return (_rebuild_remote_exception, (self.tb_string, self.job_id, self.category), self.__dict__)


def _rebuild_remote_exception(tb_string: str, job_id: str | None, category: str | None) -> RemoteException:
    return RemoteException(tb_string, job_id=job_id, category=category)


@lru_cache(maxsize=256)  # categories come from the server: bounded
def _remote_exception_class(category: str) -> type[RemoteException]:
    """RemoteException, also an instance of the exception class `category` names (built-in
    or one of this module's), where that class can be combined with it."""
    original = globals().get(category) if category in __all__ else getattr(builtins, category, None)
    if not (isinstance(original, type) and issubclass(original, Exception)) or issubclass(original, RemoteException):
        return RemoteException
    try:
        combined = type(f"Remote{category}", (RemoteException, original), {"__module__": "interlace"})
        combined("probe")  # classes whose constructor needs more (UnicodeDecodeError) are left out
    except TypeError:
        return RemoteException
    return combined


class GenerationEndedWarning(UserWarning):
    """Generation stopped (e.g. at EOS) before a step the body was waiting for."""


# -- warnings that travel with a job's result -------------------------------------------------
# The engine's warnings (generation ended early, a cache made late, ...) must reach the user in
# every mode. Raised on a server they would land in the server's log, so while a job runs the
# executor collects them here and the result carries them back, where they are raised again
# (`remote.result.decode_result`). A thread-local list, not `warnings.catch_warnings`, which
# swaps process-wide state and would mix up jobs of different models running side by side.

class _Collector(threading.local):
    caught: list[tuple[type[Warning], str]] | None = None


_collector = _Collector()


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """`warnings.warn`, or collected for the client while a job runs remotely."""
    caught = _collector.caught
    if caught is not None:
        caught.append((category, message))
        return
    warnings.warn(message, category, stacklevel=stacklevel + 1)


def swap_warnings(caught: list[tuple[type[Warning], str]] | None) -> list[tuple[type[Warning], str]] | None:
    """Make `caught` the list this thread's `warn(...)` calls go to; returns the previous one.
    Several jobs sharing one forward (`tracing/shared.py`) each collect their own."""
    previous, _collector.caught = _collector.caught, caught
    return previous


@contextlib.contextmanager
def collecting_warnings() -> Iterator[list[tuple[type[Warning], str]]]:
    """Collect `warn(...)` calls of this thread instead of raising them."""
    previous = _collector.caught
    _collector.caught = caught = []
    try:
        yield caught
    finally:
        _collector.caught = previous
