"""`remote='local', dry_run=True`: the whole remote path on fake tensors, for a model without weights.

```python
model = interlace.LanguageModel("org/too-big-for-this-machine")   # meta: no weights loaded
with model.trace("Hello", remote="local", dry_run=True):
    hidden = model.model.layers[10].output.save()
hidden        # <fake: shape (1, 2, 8192) dtype torch.bfloat16, values not computed>
```

What runs is what `remote='local'` runs (`simulation.py`), step for step: the request is
built, encoded and checked on the client (`outbound.encode_for_remote`: every value's
serialization, the policy, imports), received as a server receives it
(`execution.receive.prepare_payload`), and run by the server's own `execution.run.execute_request`
(its namespace, guards and integrity checks), with one difference: the body and the model's
forward run on fake tensors (`execution/fake.py`), so shapes, dtypes and the order of module
access are checked and nothing is computed. The weights are never loaded. The saved values are
then checked as the result encoder checks them (`contract.result`: what can be sent back) and
their size is estimated from their shapes and dtypes against the policy's `max_result_bytes`.

Each saved name is bound to a `FakeValue` (`FakeTensorValue` for a tensor) that has a shape and a
dtype and refuses anything that needs values (`FakeValueError`). A `DryRunWarning` says plainly
that the values are fake and lists the saves with their sizes; `tracer.backend.last_report`
holds the same as a `DryRunReport`.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from ..contract.errors import UnsupportedValueError
from ..contract.policy import Policy
from ..contract.result import UnsendableResult
from ..contract.values.encode import ValueEncoder
from ..contract.values.grammar import is_hf_output_class
from ..errors import InterlaceError, RemoteException, collecting_warnings
from ..execution.errors import JobFailed
from ..execution.fake import DATA_DEPENDENT_ERRORS, FakeRun, fake_run
from ..execution.run import execute_request
from ..tracing.backend import CapturedTrace
from .history_store import JobRun
from .simulation import receive_as_server
from .outbound import encode_for_remote, model_key_of, policy_for_simulation, warn_if_large

__all__ = [
    "DryRunBackend", "DryRunReport", "DryRunWarning", "FakeObjectValue", "FakeScalarValue", "FakeTensorValue",
    "FakeValue", "FakeValueError", "MSG_FAKE_VALUE", "MSG_NEEDS_VALUES", "MSG_NO_LOCAL_BLOCKS",
    "MSG_GENERATE_STEPS", "MSG_NO_ISOLATE", "SavedSummary",
]

#: A fake value was asked for what only real values have. {name}, {what}, {description}.
MSG_FAKE_VALUE: Final = (
    "`{name}` is a fake value from a dry run: it has {description} but no values, so {what} cannot be "
    "computed. Run the trace for real to get values:\n\n"
    "    with model.trace(x, remote=True):   # or remote='local' on a model with weights\n"
    "        {name} = ...save()"
)

#: Appended to the traceback of a body that needs a tensor's values (torch's data-dependent errors).
MSG_NEEDS_VALUES: Final = (
    "\n\nThis is a dry run: tensors have shapes and dtypes but no values, and the line above needs "
    "values (`.item()`, `.tolist()`, a tensor in an `if` or `while`). Check that part with a real run "
    "(`remote='local'` on a small model of the same family), or keep it out of the dry run, e.g. "
    "compute the number after the trace:\n\n"
    "    with model.trace(x, remote='local', dry_run=True):\n"
    "        logits = model.lm_head.output.save()\n"
    "    # (and only on real results:) top = logits[0, -1].argmax().item()"
)

#: A body with `with interlace.local():` blocks (they need the values to run on).
MSG_NO_LOCAL_BLOCKS: Final = (
    "A dry run cannot run the `with interlace.local():` block at line {line}: the block runs on "
    "this machine with the values the server sends it, and a dry run has none. Check the body "
    "without the block, or run it for real with `remote='local'` on a model with weights."
)

#: `generate` without `max_new_tokens=` (fake tensors cannot tell when generation would stop).
MSG_GENERATE_STEPS: Final = (
    "A dry run of `generate` needs `max_new_tokens=`: without token values it cannot tell when "
    "generation would stop, so it runs exactly the steps you ask for: "
    "`model.generate(x, max_new_tokens=5, remote='local', dry_run=True)`."
)

#: `isolate=True` loads the model's weights in a worker process: the opposite of a dry run.
MSG_NO_ISOLATE: Final = (
    "`isolate=True` loads the model's weights in a worker process, which a dry run exists to avoid. "
    "Remove one of them: `model.trace(x, remote='local', dry_run=True)`."
)


class FakeValueError(InterlaceError, RuntimeError):
    """A dry run's fake value was used for something that needs real values."""


class DryRunWarning(UserWarning):
    """A dry run's account: the values are fake, and the saves it would return."""


class FakeValue:
    """A saved value of a dry run: what it would be, without its data."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def describe(self) -> str:
        raise NotImplementedError

    def _refuse(self, what: str) -> FakeValueError:
        return FakeValueError(MSG_FAKE_VALUE.format(name=self.name, what=what, description=self.describe()))

    def __repr__(self) -> str:
        return f"<fake: {self.describe()}, values not computed>"

    def __setattr__(self, name: str, value: Any) -> None:
        raise self._refuse(f"`.{name} = ...`")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # protocols Python probes for (copy, pickle, numpy)
        raise self._refuse(f"`.{name}`")

    def __getitem__(self, key: Any) -> Any:
        raise self._refuse("indexing")

    def __iter__(self) -> Any:
        raise self._refuse("iterating")

    def __bool__(self) -> bool:
        raise self._refuse("its truth value")

    def __float__(self) -> float:
        raise self._refuse("`float(...)`")

    def __int__(self) -> int:
        raise self._refuse("`int(...)`")

    def __index__(self) -> int:
        raise self._refuse("an index")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a numpy array")

    def __eq__(self, other: object) -> bool:
        raise self._refuse("a comparison")

    __hash__ = object.__hash__

    def _arith(self, *args: Any) -> Any:
        raise self._refuse("arithmetic")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _arith
    __matmul__ = __rmatmul__ = __neg__ = __lt__ = __le__ = __gt__ = __ge__ = __ne__ = _arith  # type: ignore[assignment]


class FakeTensorValue(FakeValue):
    """A saved tensor of a dry run: its shape and dtype (what the server's tensor would have)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, name: str, shape: torch.Size, dtype: torch.dtype) -> None:
        super().__init__(name)
        object.__setattr__(self, "shape", torch.Size(shape))
        object.__setattr__(self, "dtype", dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """The bytes of its data: what it adds to the result."""
        return self.numel() * self.element_size()

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def describe(self) -> str:
        return f"shape {tuple(self.shape)} dtype {self.dtype}"


class FakeScalarValue(FakeValue):
    """A number the body read from a tensor (`.item()`): its type, not its value."""

    __slots__ = ("type",)

    def __init__(self, name: str, kind: type) -> None:
        super().__init__(name)
        object.__setattr__(self, "type", kind)

    def describe(self) -> str:
        return f"a {self.type.__name__} read from a tensor"


class FakeObjectValue(FakeValue):
    """Any other saved value that holds tensors (a KV cache, a dataclass): its type and tensors."""

    __slots__ = ("type", "tensors")

    def __init__(self, name: str, kind: type, tensors: list[FakeTensorValue]) -> None:
        super().__init__(name)
        object.__setattr__(self, "type", kind)
        object.__setattr__(self, "tensors", tensors)

    def describe(self) -> str:
        return f"a {self.type.__name__} holding {len(self.tensors)} tensor{'s' if len(self.tensors) != 1 else ''}"


@dataclass
class SavedSummary:
    """One saved name of a dry run: what it is and how many bytes it adds to the result."""

    name: str
    description: str
    nbytes: int


@dataclass
class DryRunReport:
    """What a dry run found: the request's size, the saves, the result's estimated size."""

    payload_size: int
    saves: list[SavedSummary] = field(default_factory=list)
    result_bytes: int = 0  # estimated from shapes and dtypes (uncompressed)
    max_result_bytes: int | None = None

    def text(self, where: str) -> str:
        lines = [
            f"Dry run of {where}: the request ({_size(self.payload_size)}) passed every check and the body "
            "ran on fake tensors. VALUES ARE FAKE: shapes and dtypes are right, nothing was computed.",
        ]
        if self.saves:
            width = max(len(s.name) for s in self.saves)
            lines.append("It would return:")
            lines += [f"  {s.name:<{width}}  {s.description:<40}  {_size(s.nbytes)}" for s in self.saves]
        else:
            lines.append("It would return nothing (the body saves no value).")
        limit = f" of the server's {_size(self.max_result_bytes)} limit" if self.max_result_bytes else ""
        lines.append(f"Result: about {_size(self.result_bytes)}{limit}.")
        return "\n".join(lines)


class DryRunBackend:
    """Runs a trace through the simulation's path on fake tensors (see the module docstring).

    `last_report` is the last run's `DryRunReport`; `last_payload_size` / `get_last_payload()`
    are the request's, as on `LocalSimulationBackend`."""

    def __init__(self, model: Any, verbose: bool = False, *, strict_remote: bool = False, max_upload_mb: float = 10.0,
                 policy: Policy | None = None, isolate: bool | None = None) -> None:
        if isolate:
            from ..contract.options import TraceOptionError

            raise TraceOptionError(MSG_NO_ISOLATE)
        self.model = model
        self.verbose = verbose
        self.strict_remote = strict_remote
        self.max_upload_mb = max_upload_mb
        self.policy = policy
        self.last_payload_size = 0
        self.last_report: DryRunReport | None = None
        self._last_payload: bytes | None = None

    def get_last_payload(self) -> bytes | None:
        return self._last_payload

    def __call__(self, trace: CapturedTrace) -> dict[str, Any]:
        block = trace.block
        if block.local_blocks:
            raise InterlaceError(MSG_NO_LOCAL_BLOCKS.format(line=block.local_blocks[0].line))
        stop_after = None
        if trace.kind == "generate":
            stop_after = trace.kwargs.get("max_new_tokens")
            if not isinstance(stop_after, int) or isinstance(stop_after, bool):
                raise InterlaceError(MSG_GENERATE_STEPS)
        policy = self.policy or policy_for_simulation()
        key = model_key_of(self.model, simulation=True)
        payload, built = encode_for_remote(trace, key, policy, strict_remote=self.strict_remote)
        self.last_payload_size = len(payload)
        self._last_payload = payload
        if self.verbose:
            print(f"[DryRun] Serialized payload: {len(payload)} bytes; variables: {sorted(built.request.variables)}")
        warn_if_large(payload, self.max_upload_mb)
        run = JobRun.for_trace("local", trace, key, dry_run=True)
        try:
            values, report = self._run(payload, key, policy, stop_after)
        except BaseException as error:
            run.finish(payload, error=error)
            raise
        run.finish(payload)
        self.last_report = report
        warnings.warn(report.text(f"{block.filename}:{block.first_lineno}"), DryRunWarning, stacklevel=4)
        return values

    def _run(self, payload: bytes, key: str, policy: Policy, stop_after: int | None) -> tuple[dict[str, Any], DryRunReport]:
        # Received as the simulation receives it (`simulation.py`), so refused alike.
        prepared = receive_as_server(payload, policy, {key: self.model})
        with fake_run(self.model, stop_after=stop_after) as fake:
            try:
                with collecting_warnings() as caught:  # the job's warnings, raised here as a result's are
                    values = execute_request(prepared.request, prepared.tensors, self.model, policy=policy, log=_log)
            except JobFailed as failed:
                text = failed.traceback_text
                if failed.category in DATA_DEPENDENT_ERRORS:
                    text += MSG_NEEDS_VALUES
                raise RemoteException(text, category=failed.category) from None
            report = _check_result(values, fake, policy, len(payload))
        for category, message in caught:
            warnings.warn(message, category, stacklevel=2)
        return {name: _fake_value(name, value) for name, value in values.items()}, report


def _log(line: str) -> None:
    print(line, file=sys.stdout)


# -- the result: what would be sent back, and its size --------------------------------------------


class _SymbolicNumbers:
    """The encoder's extension for numbers read from fake tensors (`.item()` gives a SymInt or
    SymFloat): they travel as the int or float a real run reads. Nothing else is taken, so any
    other value fails exactly as the result encoder fails it."""

    def encode(self, value: Any, encoder: ValueEncoder) -> Any:
        kind = _symbolic_type(value)
        return NotImplemented if kind is None else encoder.encode(kind())


def _symbolic_type(value: Any) -> type | None:
    if isinstance(value, torch.SymBool):
        return bool
    if isinstance(value, torch.SymInt):
        return int
    if isinstance(value, torch.SymFloat):
        return float
    return None


def _check_result(values: dict[str, Any], fake: FakeRun, policy: Policy, payload_size: int) -> DryRunReport:
    """Encode the saved values as `contract.result.encode_result` does, minus the tensors' data;
    raise as a real job would for a value that cannot be sent or a result over the limit."""
    encoder = ValueEncoder(extension=_SymbolicNumbers())
    body: dict[str, Any] = {}
    report = DryRunReport(payload_size, max_result_bytes=policy.max_result_bytes)
    for name, value in values.items():
        before = len(encoder.tensors)
        try:
            body[name] = node = encoder.encode(_cpu_fakes(value, fake), path=name)
        except UnsupportedValueError as e:  # as `encode_result` catches it
            raise _unsendable(UnsendableResult(name, str(e).splitlines()[0])) from None
        added = list(encoder.tensors.values())[before:]
        nbytes = sum(_tensor_bytes(t) for t in added) + len(json.dumps(node))
        report.saves.append(SavedSummary(name, _describe(value), nbytes))
    # The message's layout (`wire/encode.py`): a length, the JSON envelope, a safetensors
    # header (about 80 bytes a tensor), the tensors' bytes. Compression is not counted: fake
    # tensors have no bytes to compress, and activations rarely shrink much.
    tensors = list(encoder.tensors.values())
    envelope = len(json.dumps({"format": 1, "kind": "result", "body": {"values": body}}))
    report.result_bytes = 8 + envelope + 16 + 80 * len(tensors) + sum(map(_tensor_bytes, tensors))
    limit = policy.max_result_bytes
    if limit is not None and report.result_bytes > limit:
        raise _unsendable(UnsendableResult(
            ", ".join(values),
            f"the result is about {report.result_bytes / 1e6:.1f} MB (estimated from the saved values' shapes "
            f"and dtypes), over the server's {limit / 1e6:.1f} MB limit; save less (`h[:, -1].save()` rather "
            "than `h.save()`), or ask the operator to raise `interlace serve --max-result-mb`",
        ))
    return report


def _unsendable(error: UnsendableResult) -> RemoteException:
    # What `remote='local'` raises for it: `run_prepared`'s JobFailed, as `simulation.py` raises it.
    return RemoteException(f"UnsendableResult: {error}", category="unserializable-result")


def _cpu_fakes(value: Any, fake: FakeRun) -> Any:
    """A saved weight is the model's meta tensor itself: its CPU fake (the one the run used)."""
    if isinstance(value, torch.Tensor) and value.is_meta and not _is_fake(value):
        return fake.fake_of(value)
    if isinstance(value, list) or type(value) is tuple:
        return (list if isinstance(value, list) else tuple)(_cpu_fakes(v, fake) for v in value)
    if type(value) is dict:
        return {k: _cpu_fakes(v, fake) for k, v in value.items()}
    return value


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def _tensor_bytes(t: Any) -> int:
    return int(t.numel()) * t.element_size() if isinstance(t, torch.Tensor) else int(getattr(t, "nbytes", 0))


# -- what the caller gets --------------------------------------------------------------------------


def _fake_value(name: str, value: Any) -> Any:
    """The value to bind for a saved `value`: tensors become `FakeTensorValue`s (in lists,
    tuples, dicts and model outputs too); numbers read from tensors `FakeScalarValue`s; other
    objects that hold tensors `FakeObjectValue`s; plain data (a shape, a string) stays."""
    if isinstance(value, torch.Tensor):
        return FakeTensorValue(name, value.shape, value.dtype)
    kind = _symbolic_type(value)
    if kind is not None:
        return FakeScalarValue(name, kind)
    if isinstance(value, list) or type(value) is tuple:  # (`interlace.list()` arrives as a list, as on the wire)
        return (list if isinstance(value, list) else tuple)(_fake_value(f"{name}[{i}]", v) for i, v in enumerate(value))
    if type(value) is dict:
        return {k: _fake_value(f"{name}[{k!r}]", v) for k, v in value.items()}
    if is_hf_output_class(type(value)):
        try:
            return type(value)(**{k: _fake_value(f"{name}.{k}", v) for k, v in value.items()})
        except Exception:  # noqa: BLE001 - a model output that will not take them: described instead
            pass
    tensors = _tensors_in(value)
    if tensors:
        return FakeObjectValue(name, type(value), [FakeTensorValue(f"{name}[{i}]", t.shape, t.dtype)
                                                    for i, t in enumerate(tensors)])
    return value


def _tensors_in(value: Any) -> list[torch.Tensor]:
    encoder = ValueEncoder(extension=_SymbolicNumbers())
    try:
        encoder.encode(value)
    except Exception:  # noqa: BLE001 - checked already; only the tensors are wanted here
        return []
    return [t for t in encoder.tensors.values() if isinstance(t, torch.Tensor)]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    kind = _symbolic_type(value)
    if kind is not None:
        return f"{kind.__name__} (read from a tensor)"
    tensors = _tensors_in(value)
    if tensors:
        kind = "list" if isinstance(value, list) else type(value).__name__
        return f"{kind} of {len(tensors)} tensor{'s' if len(tensors) != 1 else ''}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 24 else text[:21] + '...'}"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
