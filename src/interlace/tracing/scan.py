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
Operations that need real numbers (`.item()`, `.tolist()`, printing values, branching on
tensor values) fail under scan with PyTorch's data-dependent error.
"""

from __future__ import annotations

from typing import Any

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
            with fake_mode():
                super().execute(ns)
        finally:
            if previous is _MISSING:
                d.pop("_before_run", None)
            else:
                d["_before_run"] = previous


_MISSING = object()


def _no_dispatch() -> None:
    return None
