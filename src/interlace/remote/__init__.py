"""What client and server must agree on: wire format, serialization, policy and validator.

`interlace.remote` is also the decorator for functions and classes used remotely
(`@interlace.remote`, `@remote(version=...)`). Design note: a package attribute and a function
cannot share the name `interlace.remote` (importing a submodule rebinds it), so this module's
class is made callable and forwards to `remote.decorator.remote`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .decorator import remote as _remote_decorator
from .policy import DEFAULT_POLICY, Policy
from .problems import Problem, RemoteValidationError

# `from interlace.remote import remote` (nnsight: `from nnsight.remote import remote`) works too.
remote = _remote_decorator

__all__ = ["Policy", "DEFAULT_POLICY", "Problem", "RemoteValidationError", "remote"]


class _DecoratorModule(types.ModuleType):
    def __call__(self, obj: Any = None, *, version: str | None = None, library: str | None = None) -> Any:
        return _remote_decorator(obj, version=version, library=library)


sys.modules[__name__].__class__ = _DecoratorModule
