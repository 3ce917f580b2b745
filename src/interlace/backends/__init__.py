"""Backends: the one seam where local runs, the local simulation and the server differ."""

from __future__ import annotations

from typing import Any

from .local import LocalBackend

__all__ = ["LocalBackend", "select_backend"]


def select_backend(model: Any, remote: bool | str, kwargs: dict[str, Any]) -> Any:
    """The backend for `model.trace(..., remote=...)`; pops the options it consumes."""
    if remote is False or remote is None:
        return LocalBackend()
    raise ValueError(f"remote={remote!r} is not supported yet; use remote=False.")
