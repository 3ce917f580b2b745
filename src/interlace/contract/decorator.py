"""`@interlace.remote`: mark a function or class for remote use, checked at decoration time."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar, overload

from .policy import DEFAULT_POLICY
from .problems import Problem, RemoteValidationError, first_line
from .code.encode import CodeEncoder
from .code.origin import REMOTE_ATTR, REMOTE_MODULE

__all__ = ["remote"]

T = TypeVar("T")


@overload
def remote(obj: T) -> T: ...
@overload
def remote(*, version: str | None = None, library: str | None = None) -> Callable[[T], T]: ...


def remote(obj: Any = None, *, version: str | None = None, library: str | None = None) -> Any:
    """Decorate a function or class that trace bodies use remotely.

    Checks now, not at submit time: the source is readable, it imports only modules the
    server provides, it uses no files, network, processes, `eval`/`exec`/`open`/`__import__`,
    the module-level values it reads can travel (JSON-able values, tensors, arrays, the model
    and its modules), and its base classes can be sent. Raises RemoteValidationError listing
    every problem, naming the decorated function or class.
    """

    def decorate(target: Any) -> Any:
        # Mark first so the check treats it (and recursion into itself) as decorated.
        setattr(target, REMOTE_ATTR, {"version": version, "library": library})
        if getattr(target, "__module__", None) == REMOTE_MODULE:
            # Rebuilt from shipped source on the server (e.g. a decorated helper defined
            # inside a shipped function): the request was checked on receipt, and there is
            # no source file here to check again.
            return target
        from .values.encode import ValueEncoder

        code = CodeEncoder(DEFAULT_POLICY)
        try:
            code.encode(target, ValueEncoder(extension=code))
        except TypeError as e:
            delattr(target, REMOTE_ATTR)
            filename, lineno = _location(target)
            raise RemoteValidationError(
                [Problem(category="unserializable-variable", message=first_line(e), filename=filename, lineno=lineno)],
                subject=_subject(target),
            ) from None
        if code.problems:
            delattr(target, REMOTE_ATTR)
            raise RemoteValidationError(code.problems, subject=_subject(target))
        return target

    if obj is not None:
        return decorate(obj)
    return decorate


def _subject(target: Any) -> str:
    name = getattr(target, "__name__", None) or type(target).__name__
    return f"`{name}`"


def _location(target: Any) -> tuple[str, int]:
    try:
        return inspect.getsourcefile(target) or "<unknown>", inspect.getsourcelines(target)[1]
    except (OSError, TypeError):
        return "<unknown>", 0
