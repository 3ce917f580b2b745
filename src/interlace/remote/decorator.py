"""`@interlace.remote`: mark a function or class for remote use, checked at decoration time."""

from __future__ import annotations

from typing import Any, Callable, TypeVar, overload

from .policy import DEFAULT_POLICY
from .problems import RemoteValidationError
from .source import REMOTE_ATTR, CodeEncoder

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
    the module-level values it reads can travel (JSON-able values, tensors, arrays), and its
    base classes can be sent. Raises RemoteValidationError listing every problem.
    """

    def decorate(target: Any) -> Any:
        # Mark first so the check treats it (and recursion into itself) as decorated.
        setattr(target, REMOTE_ATTR, {"version": version, "library": library})
        from .values import ValueEncoder

        code = CodeEncoder(DEFAULT_POLICY)
        try:
            code.encode(target, ValueEncoder(extension=code))
        except TypeError as e:
            delattr(target, REMOTE_ATTR)
            raise RemoteValidationError([{"category": "unserializable-variable", "message": str(e).splitlines()[0]}]) from None
        if code.problems:
            delattr(target, REMOTE_ATTR)
            raise RemoteValidationError(code.problems)
        return target

    if obj is not None:
        return decorate(obj)
    return decorate
