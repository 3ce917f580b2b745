"""The local backend: run the captured body in this process against the caller's model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..tracing.tracer import Tracer

__all__ = ["LocalBackend"]


class LocalBackend:
    """`remote=False`: no serialization; the body reads the caller's variables directly."""

    def __call__(self, tracer: "Tracer") -> dict[str, Any]:
        ns = tracer.namespace_from_caller()
        try:
            tracer.execute(ns)
        except BaseException as error:
            # Values saved before the failure still reach the caller (see Tracer.__enter__).
            error._interlace_partial = tracer.results(ns)  # type: ignore[attr-defined]
            raise
        return tracer.results(ns)
