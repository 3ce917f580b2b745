"""`@interlace.remote` and `from interlace.remote import remote` (nnsight's spelling).

Design note: a package attribute and a submodule cannot share the name `interlace.remote`
(importing the submodule rebinds the attribute), so this module's class is made callable and
forwards to the decorator (`contract/decorator.py`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .contract.decorator import remote

__all__ = ["remote"]


class _DecoratorModule(types.ModuleType):
    def __call__(self, obj: Any = None, *, version: str | None = None, library: str | None = None) -> Any:
        return remote(obj, version=version, library=library)


sys.modules[__name__].__class__ = _DecoratorModule
