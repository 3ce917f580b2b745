"""Putting wrappers on module forwards, and the call-order table that lets later runs wrap
only what a body asks for (see the design note in `interleaver.py`).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Sequence

from greenlet import getcurrent

from ..errors import TracingError

if TYPE_CHECKING:
    from .mediator import ModelSide

__all__ = ["ModuleHooks", "OrderTable"]


def _wrapper(idx: int, inner: Callable[..., Any], active: list[Any]) -> Callable[..., Any]:
    """The `forward` put on module `idx` during runs; `inner` is the module's own bound
    forward (from its class, or its instance attribute).

    The common case (nobody waits on this module) is inlined: one call, two counter updates
    and three dict lookups. Calls made from a body's greenlet (`model.lm_head(h)` in a
    logit lens) and calls outside a run go straight through.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        il = active[0]
        if il is None or getcurrent() is not il.main:
            return inner(*args, **kwargs)
        started = il.started
        n = started[idx]
        started[idx] = n + 1
        tap = il.tap  # `events.append` while recording the call order (see Interleaver)
        if tap is not None:
            tap(idx)
        if idx in il.input_waiters:
            return il._call(idx, inner, args, kwargs, n)
        out = inner(*args, **kwargs)
        il.finished[idx] += 1
        tap = il.tap
        if tap is not None:
            tap(~idx)
        if idx in il.output_waiters or idx in il.observers:
            return il._after(idx, n, args, kwargs, out)
        return out

    # `inspect.signature(module.forward)` must see the real parameters: Hugging Face's
    # generate reads it to decide on `logits_to_keep`, `position_ids` and the attention mask.
    forward.__wrapped__ = inner  # type: ignore[attr-defined]
    return forward


def _keep_signature(wrapper: Callable[..., Any]) -> None:
    """Store the wrapped forward's signature on the wrapper (the root's: `generate` reads it
    several times per call, and unwrapping each time costs more than a served value)."""
    try:
        wrapper.__signature__ = inspect.signature(wrapper.__wrapped__)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # no signature to read: inspect unwraps as before
        pass


class ModuleHooks:
    """Forward wrappers for one list of modules, made once and reused by every run.

    `install` points the wrappers at a run's interleaver and puts them in the modules'
    instance dicts; `uninstall` takes them out again, so outside runs the model is untouched.
    Wrappers call a bound method of the class's forward; putting one in place checks the
    module's class and that class's forward are still the ones it was made for (`.source`
    gives a module its own subclass; a patched class gets new wrappers). A module that has
    its own instance `forward` (accelerate hooks, a user patch) gets a wrapper around that
    one, remade only when it changes.
    """

    __slots__ = ("modules", "active", "_dicts", "_types", "_forwards", "_wrappers", "_custom", "_restore", "_installed")

    def __init__(self, modules: Sequence[Any]) -> None:
        self.modules = modules
        self.active: list[Any] = [None]
        self._dicts = [m.__dict__ for m in modules]
        self._types = [type(m) for m in modules]
        self._forwards = [m_type.forward for m_type in self._types]
        self._wrappers: list[Callable[..., Any]] = []
        for i, m in enumerate(modules):
            self._wrappers.append(self._class_wrapper(i, m))
        self._custom: dict[int, tuple[Any, Callable[..., Any]]] = {}
        self._restore: list[tuple[dict[str, Any], Any]] = []
        self._installed: list[int] | None = None  # None: every module (a full run)

    def _class_wrapper(self, idx: int, module: Any) -> Callable[..., Any]:
        cls = type(module)
        self._types[idx] = cls
        self._forwards[idx] = forward = cls.forward
        wrapper = _wrapper(idx, forward.__get__(module, cls), self.active)
        if idx == 0:
            _keep_signature(wrapper)
        return wrapper

    def refresh(self, idx: int) -> None:
        """Re-wrap module `idx` whose class changed during a run (`.source` first used in a
        trace gives the module its own subclass); the new forward is used from its next call."""
        module = self.modules[idx]
        if type(module) is self._types[idx]:
            return
        old = self._wrappers[idx]
        self._wrappers[idx] = self._class_wrapper(idx, module)
        d = self._dicts[idx]
        if self.active[0] is not None and d.get("forward") is old:
            d["forward"] = self._wrappers[idx]

    def install(self, il: "ModelSide", only: "Sequence[int] | None" = None) -> None:
        """Wrap every module, or only those in `only` (a lazy run; `wrap` adds more)."""
        if self.active[0] is not None:
            raise TracingError(
                "These modules are already being traced (a trace of another envoy of the same "
                "model is running). Run the traces one after another."
            )
        if only is None:
            self._installed = None
            for idx in range(len(self._dicts)):
                self._put(idx)
        else:
            self._installed = list(only)
            for idx in only:
                self._put(idx)
        self.active[0] = il

    def wrap(self, idx: int) -> None:
        """Put module `idx`'s wrapper in place (also mid-run: `forward` is looked up per call)."""
        if self._installed is not None:
            self._installed.append(idx)
        self._put(idx)

    def _put(self, idx: int) -> None:
        d = self._dicts[idx]
        wrappers = self._wrappers
        cls = type(self.modules[idx])
        if cls is not self._types[idx] or cls.forward is not self._forwards[idx]:
            wrappers[idx] = self._class_wrapper(idx, self.modules[idx])
        previous = d.get("forward")
        if previous is None:
            d["forward"] = wrappers[idx]
        elif previous is not wrappers[idx]:  # (ours if an earlier run never uninstalled)
            custom = self._custom.get(idx)
            if custom is None or custom[0] is not previous:
                custom = self._custom[idx] = (previous, _wrapper(idx, previous, self.active))
                if idx == 0:
                    _keep_signature(custom[1])
            self._restore.append((d, previous))
            d["forward"] = custom[1]

    def uninstall(self, il: "ModelSide") -> None:
        if self.active[0] is not il:
            return
        self.active[0] = None
        if self._installed is None:
            for d in self._dicts:
                d.pop("forward", None)
        else:
            dicts = self._dicts
            for idx in self._installed:
                dicts[idx].pop("forward", None)
            self._installed = None
        if self._restore:  # instance forwards that were there before the run
            for d, previous in self._restore:
                d["forward"] = previous
            self._restore.clear()


_AHEAD_LIMIT = 256  # call sites remembered per table; a full memo starts over


class OrderTable:
    """The call order of one forward of a model's root module, recorded in a full run.

    `start[i]`/`end[i]`: positions of module i's start and end among the events of the root's
    first forward (-1: it did not run); `parent[i]`: the module running when i started (-1 for
    the root). `once`: every module ran at most once per root forward and only inside it, so
    a run can wrap only the root (its calls count steps) and the modules bodies ask for: where
    module M is in its current call follows from the root's step and the body's position.
    `valid` turns False when a lazy run's wrapped modules did not start in this order
    (`agrees`, checked after each lazy run).

    `ahead` maps a call site (its bodies' code objects) to the modules its last lazy run
    wrapped: the next run of that site wraps them before the forward starts, which is exact
    (counters from zero) and much cheaper than wrapping each at its request mid-run.
    """

    __slots__ = ("modules", "once", "start", "end", "parent", "valid", "ahead")

    def __init__(self, modules: Sequence[Any], once: bool, start: list[int], end: list[int], parent: list[int]) -> None:
        self.modules = modules
        self.once = once
        self.start = start
        self.end = end
        self.parent = parent
        self.valid = True
        self.ahead: dict[Any, tuple[int, ...]] = {}

    def agrees(self, events: list[int], n_core: int) -> bool:
        """Whether a lazy run's events (starts `i`, ends `~i` of wrapped modules) fit this
        table: every wrapped module started inside a forward of the root, at most once per
        forward, in table order."""
        start = self.start
        inside = False
        last = -1
        for event in events:
            if event > 0:
                if event < n_core:
                    pos = start[event]
                    if not inside or pos <= last:
                        return False
                    last = pos
            elif event == 0:
                if inside:
                    return False  # the root called inside itself
                inside = True
                last = -1
            elif event == -1:  # ~0: the root's forward ended
                inside = False
        return True

    def remember(self, site: Any, wrapped: "set[int]", n_core: int) -> None:
        """Note the modules (below `n_core`, not the root) a lazy run of `site` wrapped."""
        ahead = self.ahead
        if len(ahead) >= _AHEAD_LIMIT:
            ahead.clear()
        ahead[site] = tuple(sorted(i for i in wrapped if 0 < i < n_core))

    @classmethod
    def from_events(cls, modules: Sequence[Any], n_core: int, events: list[int]) -> "OrderTable | None":
        start = [-1] * n_core
        end = [-1] * n_core
        parent = [-1] * n_core
        once = True
        first = True  # inside (or before the end of) the root's first forward
        stack: list[int] = []
        seen: set[int] = set()
        pos = 0
        forwards = 0
        for event in events:
            idx = event if event >= 0 else ~event
            if idx >= n_core:
                continue
            if event >= 0:
                if idx == 0:
                    if stack:
                        once = False  # the root called inside itself
                        break
                    forwards += 1
                    seen = set()
                elif not stack or idx in seen:
                    once = False  # called outside the root's forward, or twice in one
                    break
                seen.add(idx)
                if first:
                    start[idx] = pos
                    parent[idx] = stack[-1] if stack else -1
                    pos += 1
                stack.append(idx)
            else:
                if not stack or stack[-1] != idx:
                    once = False
                    break
                stack.pop()
                if first:
                    end[idx] = pos
                    pos += 1
                    if idx == 0:
                        first = False
        if forwards == 0:
            return None
        return cls(modules, once, start, end, parent)
