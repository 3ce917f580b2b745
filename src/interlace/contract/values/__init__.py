"""The value codec: Python values as typed JSON nodes plus named tensors. `grammar.py` holds
what both directions share, `encode.py` writes nodes and `decode.py`, the half that reads
untrusted input, reads them."""

from .decode import ValueDecoder
from .encode import ClassRegistry, ValueEncoder
from .grammar import DEFAULT_MAX_DEPTH, Extension, Node

__all__ = ["DEFAULT_MAX_DEPTH", "ClassRegistry", "Extension", "Node", "ValueDecoder", "ValueEncoder"]
