"""Shipping code: user functions and classes travel as source (`encode.py`) and are rebuilt
under the server's policy (`decode.py`); `origin.py` names where shipped code lives."""

from .decode import CodeDecoder, restricted_builtins
from .encode import CodeEncoder
from .origin import is_remote_decorated, original_filename, remote_filename

__all__ = ["CodeDecoder", "CodeEncoder", "is_remote_decorated", "original_filename", "remote_filename", "restricted_builtins"]
