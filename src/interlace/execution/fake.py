"""Running a job on fake tensors: shapes and dtypes, no weights and no computation (dry runs).

A dry run (`backends/dry_run.py`, `remote='local', dry_run=True`) runs a request through the
server's own path, `run.execute_request`, inside `fake_run(model)`. Three things differ from a
real job, and only these:

- the body and the model's forward run under `FakeTensorMode` (`tracing.scan.fake_mode`, the
  mode `model.scan()` uses): every tensor carries a shape, a dtype and a device but no data,
  and no kernel runs. `run.py` enters it around the body alone (`body_mode()`), so decoding
  the request and the integrity guard's checks before and after see real tensors;
- a model whose weights were never loaded (its parameters on the meta device) is not loaded:
  its `_before_run` (where `LanguageModel` dispatches) is skipped for the run, and the
  integrity guard takes its baseline without reading weights (`fake_run_active()`,
  `integrity.guard_for`). Its meta parameters stand for CPU tensors, and a device of `meta`
  asked for while the body runs (`LanguageModel` puts inputs on its first parameter's
  device) is the CPU too, so a dry run behaves like `remote='local'` on a CPU machine: a
  tensor the user sends mixes with the model's activations as it would there;
- a generation's stop check reads a value (`bool(unfinished.max() == 0)` in Hugging Face's
  loop) that fake tensors do not have: it reads "not finished" until the model has been
  called `steps` times (the request's `max_new_tokens`), then "finished", which is the
  longest generation the request allows (no token is known to be an end-of-text one).

Any other read of a tensor's value (`.item()`, `.tolist()`, `if t.any():`) has no answer: it
fails with torch's data-dependent error, which the dry-run backend turns into a message.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..tracing.scan import fake_mode

__all__ = ["DATA_DEPENDENT_ERRORS", "FakeRun", "body_mode", "fake_run", "fake_run_active"]

#: The names of torch's errors for code that needs a tensor's values, which fake tensors lack
#: (a JobFailed's category is the error's class name).
DATA_DEPENDENT_ERRORS = frozenset({
    "GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException",
    "UnsupportedFakeTensorException", "PendingUnbackedSymbolNotFound",
})

_CPU = torch.device("cpu")
_ACTIVE: ContextVar["FakeRun | None"] = ContextVar("interlace_fake_run", default=None)


class FakeRun:
    """One dry run's fake-tensor mode, and the fakes that stand for the model's meta weights.

    `forward_calls` counts calls of the model's root module while the body runs (a
    generation's steps); `stop_after` is the step count at which a generation's stop check
    reads "finished" (None: a trace, where no such read is answered)."""

    def __init__(self, model: Any, stop_after: int | None = None) -> None:
        self.model = model
        self.mode = fake_mode()
        self.stop_after = stop_after
        self.forward_calls = 0
        module = model._module
        # The converter remembers each meta weight's fake (weakly: `_kept` holds them for the
        # run), so every op that reads a weight gets the same CPU fake for it.
        self._kept = [self._cpu_fake(t) for t in (*module.parameters(), *module.buffers()) if t.is_meta]

    def _cpu_fake(self, t: torch.Tensor) -> Any:
        # Made on a meta tensor of its own: a fake marks its meta storage as fake, and the
        # weight's own storage must stay as it was (the integrity guard reads its address).
        own = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
        converter = self.mode.fake_tensor_converter
        fake = converter.from_meta_and_device(self.mode, own, _CPU)
        converter.set_tensor_memo(t, fake)
        return fake

    def fake_of(self, t: torch.Tensor) -> Any:
        """The CPU fake that stood for meta weight `t` in the run (a saved weight is `t` itself)."""
        converter = self.mode.fake_tensor_converter
        found = converter._get_memo(t)  # noqa: SLF001 - torch's converter has no public lookup
        return found if found is not None else self._cpu_fake(t)

    @property
    def meta_weights(self) -> bool:
        """Whether the model's weights were never loaded (they live on the meta device)."""
        return bool(self._kept)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The modes the body runs under (`body_mode()` enters them for `run.py`)."""
        module = self.model._module
        handle = module.register_forward_pre_hook(self._count)
        try:
            with self.mode, _MetaAsCpu():
                # (A dispatch mode costs every op a Python call: only a generation needs it.)
                with _StopCheckReads(self) if self.stop_after is not None else contextlib.nullcontext():
                    yield
        finally:
            handle.remove()

    def _count(self, module: Any, args: Any) -> None:
        self.forward_calls += 1


@contextlib.contextmanager
def fake_run(model: Any, *, stop_after: int | None = None) -> Iterator[FakeRun]:
    """Jobs run inside this beside `model` run on fake tensors (see the module docstring)."""
    run = FakeRun(model, stop_after)
    d = model.__dict__
    previous = d.get("_before_run", _MISSING)
    # The weights are not needed: skip dispatching (as `model.scan()` does), so a lazy
    # LanguageModel never reads its weight files.
    d["_before_run"] = _no_dispatch
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)
        if previous is _MISSING:
            d.pop("_before_run", None)
        else:
            d["_before_run"] = previous


def fake_run_active() -> bool:
    """Whether a job is being run on fake tensors now (the integrity guard reads no weights then)."""
    return _ACTIVE.get() is not None


def body_mode() -> contextlib.AbstractContextManager[None]:
    """What `run.py` runs a job's body under: the dry run's fake-tensor modes, or nothing."""
    run = _ACTIVE.get()
    return contextlib.nullcontext() if run is None else run.entered()


def _no_dispatch() -> None:
    return None


_MISSING = object()


def _cpu_for_meta(value: Any) -> Any:
    if isinstance(value, torch.device):
        return _CPU if value.type == "meta" else value
    if value == "meta" and isinstance(value, str):
        return "cpu"
    return value


class _MetaAsCpu(TorchFunctionMode):
    """A device of `meta` asked for by name is the CPU (the meta weights' fakes live there)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        args, kwargs = tree_map(_cpu_for_meta, (args, kwargs or {}))
        return func(*args, **kwargs)


class _StopCheckReads(TorchDispatchMode):
    """Answers `bool(tensor)` during a generation (the stop check): see the module docstring.

    Only boolean reads are answered, and only when the run has a step count; any other read
    goes on to the fake mode below, which has no value to give."""

    def __init__(self, run: FakeRun) -> None:
        super().__init__()
        self.run = run

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if (func is torch.ops.aten._local_scalar_dense.default and self.run.stop_after is not None
                and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.bool):
            return self.run.forward_calls >= self.run.stop_after
        return func(*args, **kwargs)
