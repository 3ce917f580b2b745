"""What differs between two recorded runs (`interlace.jobs.diff`): source, inputs, results,
status, sizes. Inputs are compared from the recorded request bytes (the tensors by value),
results from the recorded result bytes (kept when `CONFIG.APP.HISTORY_RESULTS` was on)."""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from ..contract.policy import DEFAULT_POLICY
from ..contract.request import TraceRequest, decode_request
from ..contract.result import decode_result
from .history_store import JobRecord

__all__ = ["JobDiff", "MSG_NO_RESULTS", "diff_records", "replay_policy"]

MSG_NO_RESULTS: Final = (
    "results were not recorded for {ids}, so their saved values cannot be compared; record them "
    "from now on with `interlace.CONFIG.APP.HISTORY_RESULTS = True`"
)


def replay_policy() -> Any:
    """The limits recorded request bytes are read back under: a request the client once
    encoded is trusted to be its own, so only the size caps are lifted (2 GiB)."""
    return DEFAULT_POLICY.model_copy(update={"max_upload_bytes": 2**31})


@dataclass(frozen=True)
class JobDiff:
    """The differences between runs `a` and `b`; empty fields mean "the same". `bool(diff)`
    is True when anything differs."""

    a: str
    b: str
    #: A unified diff of the two bodies' source, or "" when they match.
    source: str = ""
    #: Input (`args[0]`, `kwargs.max_new_tokens`, `variables.scale`, `model_key`, ...) -> what differs.
    inputs: dict[str, str] = field(default_factory=dict)
    #: Saved name -> what differs (tensors: shape, dtype or their largest absolute difference).
    values: dict[str, str] = field(default_factory=dict)
    #: Why values were not compared ("" when they were).
    values_note: str = ""
    #: (a's status, b's status) when they differ, else None.
    status: tuple[str, str] | None = None
    #: "payload_size" / "result_size" -> (a's, b's) when they differ.
    sizes: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.source or self.inputs or self.values or self.status or self.sizes)

    def __str__(self) -> str:
        lines = [f"diff {self.a} {self.b}"]
        if self.status:
            lines.append(f"status: {self.status[0]} -> {self.status[1]}")
        for name, (x, y) in self.sizes.items():
            lines.append(f"{name}: {x} -> {y}")
        for name, what in self.inputs.items():
            lines.append(f"input {name}: {what}")
        for name, what in self.values.items():
            lines.append(f"value {name}: {what}")
        if self.values_note:
            lines.append(f"values not compared: {self.values_note}")
        if self.source:
            lines.append("source:")
            lines.append(self.source.rstrip("\n"))
        if len(lines) == 1:
            lines.append("no differences")
        return "\n".join(lines)


def diff_records(a: JobRecord, b: JobRecord) -> JobDiff:
    """Compare two records read with their bytes (`jobs.show`)."""
    source = "".join(difflib.unified_diff(
        a.source.splitlines(keepends=True), b.source.splitlines(keepends=True),
        fromfile=f"{a.id[:12]} {a.filename}:{a.lineno}", tofile=f"{b.id[:12]} {b.filename}:{b.lineno}",
    )) if a.source != b.source else ""
    sizes = {name: (getattr(a, name), getattr(b, name)) for name in ("payload_size", "result_size")
             if getattr(a, name) != getattr(b, name)}
    status = (a.status, b.status) if a.status != b.status else None
    inputs = _input_differences(a, b)
    missing = [r.id[:12] for r in (a, b) if r.result is None and r.status == "COMPLETED"]
    values: dict[str, str] = {}
    note = ""
    if missing:
        note = MSG_NO_RESULTS.format(ids=" and ".join(missing))
    elif a.result is not None and b.result is not None:
        values = _value_differences(_decoded(a.result), _decoded(b.result))
    return JobDiff(a.id, b.id, source, inputs, values, note, status, sizes)


def _decoded(result: bytes) -> dict[str, Any]:
    with warnings.catch_warnings():  # the job's warnings were shown when it ran
        warnings.simplefilter("ignore")
        return decode_result(result)


def _request(record: JobRecord) -> tuple[TraceRequest | None, dict[str, Any]]:
    if record.payload is None:
        return None, {}
    return decode_request(record.payload, replay_policy())


def _input_differences(a: JobRecord, b: JobRecord) -> dict[str, str]:
    (ra, ta), (rb, tb) = _request(a), _request(b)
    if ra is None or rb is None:
        return {}
    found: dict[str, str] = {}
    if ra.model_key != rb.model_key:
        found["model_key"] = f"{ra.model_key!r} -> {rb.model_key!r}"
    if ra.kind != rb.kind:
        found["kind"] = f"{ra.kind} -> {rb.kind}"
    groups = [("args", dict(enumerate(ra.args)), dict(enumerate(rb.args))),
              ("kwargs", ra.kwargs, rb.kwargs), ("variables", ra.variables, rb.variables),
              ("objects", {k: v.model_dump() for k, v in ra.objects.items()},
               {k: v.model_dump() for k, v in rb.objects.items()}),
              ("model_refs", ra.model_refs, rb.model_refs)]
    for group, left, right in groups:
        for name in sorted(set(left) | set(right), key=str):
            label = f"{group}[{name}]" if group == "args" else f"{group}.{name}"
            if name not in left or name not in right:
                found[label] = f"only in {a.id[:12] if name in left else b.id[:12]}"
                continue
            what = _node_difference(left[name], ta, right[name], tb)
            if what:
                found[label] = what
    return found


def _canonical(node: Any, tensors: dict[str, Any], out: list[Any]) -> Any:
    """The node with each tensor reference replaced by its place in `out` (tensor names are
    numbered per request, so two requests name the same input differently)."""
    if isinstance(node, dict):
        if node.get("$t") == "tensor" and node.get("name") in tensors:
            out.append(tensors[node["name"]])
            return {**{k: v for k, v in node.items() if k != "name"}, "tensor": len(out) - 1}
        return {k: _canonical(v, tensors, out) for k, v in node.items()}
    if isinstance(node, list):
        return [_canonical(v, tensors, out) for v in node]
    return node


def _node_difference(left: Any, left_tensors: dict[str, Any], right: Any, right_tensors: dict[str, Any]) -> str:
    lt: list[Any] = []
    rt: list[Any] = []
    lc, rc = _canonical(left, left_tensors, lt), _canonical(right, right_tensors, rt)
    if lc != rc:
        return f"{_short(lc)} -> {_short(rc)}"
    for x, y in zip(lt, rt):
        what = _tensor_difference(torch.as_tensor(x), torch.as_tensor(y))
        if what:
            return what
    return ""


def _short(node: Any, limit: int = 120) -> str:
    text = json.dumps(node, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tensor_difference(x: torch.Tensor, y: torch.Tensor) -> str:
    if x.shape != y.shape:
        return f"shape {tuple(x.shape)} -> {tuple(y.shape)}"
    if x.dtype != y.dtype:
        return f"dtype {x.dtype} -> {y.dtype}"
    if torch.equal(x, y):
        return ""
    if x.is_floating_point() or x.is_complex():
        return f"max abs difference {(x.double() - y.double()).abs().max().item():.6g}"
    return f"{int((x != y).sum())} of {x.numel()} elements differ"


def _value_differences(left: dict[str, Any], right: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in sorted(set(left) | set(right)):
        if name not in left or name not in right:
            found[name] = "only in " + ("a" if name in left else "b")
            continue
        what = _value_difference(left[name], right[name])
        if what:
            found[name] = what
    return found


def _value_difference(x: Any, y: Any) -> str:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return _tensor_difference(x.detach().cpu(), y.detach().cpu())
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and type(x) is type(y):
        if len(x) != len(y):
            return f"length {len(x)} -> {len(y)}"
        for i, (u, v) in enumerate(zip(x, y)):
            what = _value_difference(u, v)
            if what:
                return f"[{i}]: {what}"
        return ""
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            return f"keys {sorted(map(str, x))} -> {sorted(map(str, y))}"
        for key in x:
            what = _value_difference(x[key], y[key])
            if what:
                return f"[{key!r}]: {what}"
        return ""
    try:
        same = bool(x == y)
    except Exception:  # a type whose == is not a bool (numpy arrays, ...)
        same = repr(x) == repr(y)
    return "" if same else f"{_clip(repr(x))} -> {_clip(repr(y))}"


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
