"""Model wrappers: `NNsight` for any torch module, `LanguageModel` for Hugging Face causal LMs."""

from .language_model import LanguageModel
from .nnsight import NNsight

__all__ = ["NNsight", "LanguageModel"]
