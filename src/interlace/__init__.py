"""Interlace: look inside PyTorch models and change what happens there."""

from ._version import __version__
from .errors import (
    InterlaceError,
    MissedProviderError,
    ModuleNotCalledError,
    OutOfOrderError,
    SourceNotFoundError,
    TracingError,
)
from .models import LanguageModel, NNsight
from .tracing.envoy import Envoy
from .tracing.saving import save

__all__ = [
    "__version__",
    "NNsight",
    "LanguageModel",
    "Envoy",
    "save",
    "InterlaceError",
    "MissedProviderError",
    "ModuleNotCalledError",
    "OutOfOrderError",
    "SourceNotFoundError",
    "TracingError",
]
