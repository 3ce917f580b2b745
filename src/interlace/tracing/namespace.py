"""The one builder of the namespace a captured body runs in.

Capture rewrites bodies to call helpers by reserved names (`.save()` -> `__interlace_save__`,
`with loss.backward():` -> `__interlace_backward__`, a bare `model.all()` -> a loop over
`__interlace_all__(model)`). Every place that runs a body (a local
trace, an invoke inside a helper function, an edit, the server's executor and so the
simulation) builds its namespace here, so a helper added to capture's rewrites is available
everywhere at once instead of being missed by one runner (a remote `loss.backward()` once
failed with `NameError: __interlace_backward__` because the executor listed the helpers itself).
"""

from __future__ import annotations

import builtins
import types
from typing import Any, Final

from ..errors import TracingError
from .backward import BACKWARD_HELPER, backward_helper
from .capture import SAVE_HELPER, Block
from .frames import NAMESPACE_MARKER
from .local_block import ALL_HELPER
from .saving import save_in_body
from .placeholder import Placeholder

__all__ = ["BODY_HELPERS", "MISSING", "MSG_BARE_ALL", "FrameNames", "body_namespace", "every_step", "new_namespace"]

MSG_BARE_ALL: Final = (
    "`{name}.all()` on a line of its own runs the rest of the body at every step, so `{name}` must be "
    "the model or the tracer, not {what}:\n\n"
    "    with model.generate(prompt, max_new_tokens=5) as tracer:\n"
    "        model.all()   # or tracer.all()\n"
    "        tokens.append(model.lm_head.output.argmax(-1))"
)


def every_step(owner: Any, name: str = "model") -> Any:
    """The steps of a bare `model.all()` / `tracer.all()` statement's loop (capture's
    `local_block.rewrite_bare_all`; `name` is the owner's name in the source): `owner.all()`,
    which must be a step loop (the tracer's, or the model's: `NNsight.all()`)."""
    try:
        loop = owner.all()
    except AttributeError:  # (an envoy of a submodule has no `all`)
        loop = None
    if type(getattr(loop, "steps", None)) is not list:
        raise TracingError(MSG_BARE_ALL.format(name=name, what=f"a {type(owner).__name__}"))
    return loop


#: What the names that capture's rewrites call are bound to, in every body's namespace.
BODY_HELPERS: dict[str, Any] = {
    SAVE_HELPER: save_in_body,
    BACKWARD_HELPER: backward_helper,
    ALL_HELPER: every_step,
}

MISSING = object()

_BASE: dict[str, Any] = {"__builtins__": builtins.__dict__, NAMESPACE_MARKER: True, **BODY_HELPERS}


def body_namespace(*, builtins_dict: dict[str, Any] | None = None, name: str = "__main__") -> dict[str, Any]:
    """An empty body namespace: the marker, the rewrite helpers, builtins and `__name__`.

    The server's executor passes its restricted builtins; local runs get the real ones.
    """
    ns = _BASE.copy()
    if builtins_dict is not None:
        ns["__builtins__"] = builtins_dict
    ns["__name__"] = name
    return ns


def new_namespace(block: Block, frame: types.FrameType | None = None) -> dict[str, Any]:
    """A fresh namespace for a body: the names it reads, taken from `frame` (its locals, then
    its globals) when given. Every local trace makes one, so the lookups are written out."""
    ns = _BASE.copy()
    if frame is None:
        ns["__name__"] = "__main__"
        return ns
    f_globals = frame.f_globals
    ns["__name__"] = f_globals.get("__name__", "__main__")
    if block.guarded:  # a block inside shipped code: its (restricted) builtins, never the real ones
        ns["__builtins__"] = f_globals.get("__builtins__", {})
    f_locals = frame.f_locals
    missing = MISSING
    for name in block.loaded_names:
        value = f_locals.get(name, missing)
        if value is missing:
            value = f_globals.get(name, missing)
        if value is not missing and not isinstance(value, Placeholder):  # (no value: `unsaved.py`)
            ns[name] = value
    return ns


class FrameNames:
    """A name lookup over the caller's frame: a name's value in its locals, then its globals,
    or `MISSING` (also for a name an earlier trace assigned but did not save: `unsaved.py`).

    What a captured trace carries as its `lookup`. Reading the frame only when asked keeps a
    local trace, whose namespace `new_namespace` builds from the frame in one pass, from
    paying for it."""

    __slots__ = ("frame",)

    def __init__(self, frame: types.FrameType) -> None:
        self.frame = frame

    def __call__(self, name: str) -> Any:
        frame = self.frame
        value = frame.f_locals.get(name, MISSING)
        if value is MISSING:
            value = frame.f_globals.get(name, MISSING)
        return MISSING if isinstance(value, Placeholder) else value
