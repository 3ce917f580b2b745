"""`model.scan(inputs)`: learn shapes and dtypes without running (or loading) the model.

```python
model = LanguageModel("gpt2")            # meta: no weights loaded
with model.scan("Hello") as tracer:
    shape = model.transformer.h[0].output.shape.save()
```

The body runs beside a forward under `FakeTensorMode`: every tensor is a fake that carries a
shape, dtype and device but no data, and no kernel runs. A `LanguageModel` that has not been
dispatched is not dispatched: its parameters live on the meta device, and the inputs are put
there too. Saved values are fake tensors (read `.shape` / `.dtype`, not the numbers).
There are no numbers: `.item()` gives a symbolic value, and code that needs real data
(`.tolist()`, branching on tensor values) fails or takes an arbitrary path.
"""

from __future__ import annotations

from typing import Any

import torch

from .tracer import InterleavingTracer

__all__ = ["ScanningTracer", "fake_mode"]


def fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(assume_static_by_default=True))


class ScanningTracer(InterleavingTracer):
    """`with model.scan(inputs):` a trace whose forward computes only shapes."""

    kind = "scan"

    def _describe(self) -> str:
        return "model.scan(...)"

    def execute(self, ns: dict[str, Any]) -> None:
        model = self.model
        assert model is not None
        d = model.__dict__
        # The weights are not needed: skip dispatching (LanguageModel loads them there).
        previous = d.get("_before_run", _MISSING)
        d["_before_run"] = _no_dispatch
        try:
            with fake_mode() as mode:
                self._mode = mode
                super().execute(ns)
        finally:
            if previous is _MISSING:
                d.pop("_before_run", None)
            else:
                d["_before_run"] = previous

    def _run(self, mediators: Any, args: tuple, kwargs: dict, batch_size: int) -> None:
        # The forward sees fake inputs, as it would see real ones in a trace.
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._pytree import tree_map

        def fake(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
                return self._mode.from_tensor(value)
            return value

        args, kwargs = tree_map(fake, (args, kwargs))
        # What each module took and gave, readable after the scan (`model.layer.output.shape`
        # outside the block, as in nnsight); the last scan's values replace earlier ones.
        model = self.model
        assert model is not None
        scanned: dict[int, tuple[Any, Any, Any]] = {}

        def record(module: Any, margs: Any, mkwargs: Any, out: Any) -> None:
            scanned[id(module)] = (module, (tuple(margs), dict(mkwargs)), out)

        handles = [m.register_forward_hook(record, with_kwargs=True) for m in model._module.modules()]
        try:
            super()._run(mediators, args, kwargs, batch_size)
        finally:
            for handle in handles:
                handle.remove()
            model.__dict__["_scanned"] = scanned


_MISSING = object()


def _no_dispatch() -> None:
    return None
