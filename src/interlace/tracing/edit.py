"""`model.edit()`: default interventions applied to every later trace.

```python
with model.edit() as edited:                 # a copy; `model` itself is unchanged
    model.transformer.h[0].output[:] = 0
with edited.trace(prompt):                   # runs with the edit
    ...
with model.edit(inplace=True):               # edits `model` itself
    ...
model.clear_edits()
edited.export_edits("edits.safetensors")     # no pickle: source text + tensors
other.import_edits("edits.safetensors")
```

An edit's body is not run at the `with`; it is kept with the values of the names it reads
and runs, as an empty invoke that sees the whole batch, before the invokes of every later
trace (and generation) of the edited envoy. A non-inplace edit returns a shallow copy that
shares the modules (and the loaded weights) with the original but has its own edit list.

Export format: a safetensors file. Its tensors are the tensor values the edit bodies read;
its metadata holds JSON with each body's source text, original filename and line, and how
to rebuild every other name it reads (the model or one of its modules by path, numbers,
strings, lists, dtypes, importable modules such as `torch`). Importing runs that source, so
import only files you trust, as you would any Python code; nothing is unpickled.
"""

from __future__ import annotations

import importlib
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TracingError
from .capture import Block, block_from_source
from .mediator import Mediator
from .namespace import new_namespace
from .tracer import Tracer

if TYPE_CHECKING:
    from .host import Host

__all__ = ["Edit", "EditingTracer", "edit_mediators", "export_edits", "import_edits", "shallow_copy"]

FORMAT = "interlace-edits"
VERSION = 1
_METADATA_KEY = "interlace_edits"


@dataclass
class Edit:
    block: Block
    namespace: dict[str, Any]


class EditingTracer(Tracer):
    """`with model.edit(inplace=False) as edited:` records its body as a default intervention."""

    kind = "edit"

    def __init__(self, model: "Host", inplace: bool = False) -> None:
        super().__init__(model)
        self.target = model if inplace else shallow_copy(model)

    def _describe(self) -> str:
        return "model.edit()"

    def __enter__(self) -> Any:  # type: ignore[override]
        super().__enter__()
        return self.target

    def _run_backend(self) -> dict[str, Any]:
        ns = self.namespace_from_caller()
        assert self.block is not None
        if self.block.as_name:
            ns[self.block.as_name] = self.target
        if not self.block.is_empty:
            self.target.__dict__["_default_edits"].append(Edit(self.block, ns))
        return {self.block.as_name: self.target} if self.block.as_name else {}


def edit_mediators(model: "Host", ns: dict[str, Any]) -> list[Mediator]:
    """One whole-batch mediator per recorded edit, each with a fresh copy of its namespace."""
    edits = model.__dict__.get("_default_edits") or []
    return [Mediator(e.block.code, dict(e.namespace), None, 0, label=f"edit {i}") for i, e in enumerate(edits)]


# -- shallow copies ---------------------------------------------------------------------------

_OWN_KEYS = ("_default_edits", "_active", "_before_run", "_begin_run", "_end_run", "_edit_origin")


def shallow_copy(model: "Host") -> "Host":
    """A root envoy sharing `model`'s modules and child envoys, with its own list of edits."""
    copy = object.__new__(type(model))
    d = copy.__dict__
    d.update({k: v for k, v in model.__dict__.items() if k not in _OWN_KEYS})
    d["_default_edits"] = list(model.__dict__.get("_default_edits") or [])
    d["_active"] = None
    d["_edit_origin"] = model

    def before_run() -> None:
        # Load through the original (LanguageModel dispatches there), then share the result.
        model._before_run()
        d.update({k: v for k, v in model.__dict__.items() if k not in _OWN_KEYS})

    def begin_run(interleaver: Any) -> None:
        # The copy runs the original's modules: mark the original busy too, so code that
        # looks for the model's running interleaver (`.source` ops) finds it either way.
        type(copy)._begin_run(copy, interleaver)
        if model.__dict__.get("_active") is None:
            model.__dict__["_active"] = interleaver

    def end_run(interleaver: Any) -> None:
        type(copy)._end_run(copy, interleaver)
        if model.__dict__.get("_active") is interleaver:
            model.__dict__["_active"] = None

    d["_before_run"] = before_run
    d["_begin_run"] = begin_run
    d["_end_run"] = end_run
    return copy


# -- export / import ----------------------------------------------------------------------------


def export_edits(model: "Host", path: str | Path) -> Path:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, edit in enumerate(model.__dict__.get("_default_edits") or []):
        names = {}
        for name in edit.block.loaded_names + ((edit.block.as_name,) if edit.block.as_name else ()):
            if name in edit.namespace:
                names[name] = _encode(edit.namespace[name], f"{i}/{name}", tensors, name)
        records.append(
            {
                "source": edit.block.source,
                "filename": edit.block.filename,
                "first_lineno": edit.block.first_lineno,
                "names": names,
            }
        )
    meta = json.dumps({"format": FORMAT, "version": VERSION, "edits": records})
    path = Path(path)
    save_file(tensors, str(path), metadata={_METADATA_KEY: meta})
    return path


def import_edits(model: "Host", path: str | Path) -> int:
    """Append the edits stored in `path` to `model`'s edits; returns how many."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(_METADATA_KEY)
        if meta is None:
            raise TracingError(f"{path} is not an Interlace edits file (write one with `model.export_edits(path)`).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    data = json.loads(meta)
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise TracingError(f"{path} holds edits in an unknown format ({data.get('format')} v{data.get('version')}).")
    edits = model.__dict__["_default_edits"]
    for record in data["edits"]:
        filename = f"{record['filename']} (imported edit)"
        block = block_from_source(record["source"], filename, int(record["first_lineno"]))
        ns = new_namespace(block)
        for name, node in record["names"].items():
            ns[name] = _decode(node, model, tensors)
        edits.append(Edit(block, ns))
    return len(data["edits"])


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor], name: str) -> Any:
    from .envoy import Envoy

    if value is None or isinstance(value, (bool, int, float, str)):
        return {"kind": "json", "value": value}
    if isinstance(value, Envoy):
        if value.path == "model":
            return {"kind": "model"}
        return {"kind": "envoy", "path": value.path}
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"kind": "tensor", "key": key}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "name": str(value).replace("torch.", "")}
    if isinstance(value, types.ModuleType):
        return {"kind": "module", "name": value.__name__}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", tensors, name) for i, v in enumerate(value)]
        return {"kind": "list" if isinstance(value, list) else "tuple", "items": items}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"kind": "dict", "items": {k: _encode(v, f"{key}/{k}", tensors, name) for k, v in value.items()}}
    raise TracingError(
        f"The edit reads `{name}`, a {type(value).__name__}, which cannot be exported (edits are "
        "stored as source text plus tensors, numbers, strings, lists, dicts, dtypes and modules "
        "such as torch; functions and other objects would need pickle). Define it inside the "
        "edit body, or pass its data as a tensor:\n\n"
        "    scale = torch.tensor(2.0)\n    with model.edit() as edited:\n        model.layer.output[:] *= scale"
    )


def _decode(node: dict[str, Any], model: "Host", tensors: dict[str, torch.Tensor]) -> Any:
    kind = node["kind"]
    if kind == "json":
        return node["value"]
    if kind == "model":
        return model
    if kind == "envoy":
        path = node["path"]
        return model.get(path[len("model.") :] if path.startswith("model.") else path)
    if kind == "tensor":
        return tensors[node["key"]]
    if kind == "dtype":
        dtype = getattr(torch, node["name"], None)
        if not isinstance(dtype, torch.dtype):
            raise TracingError(f"Unknown dtype {node['name']!r} in the edits file.")
        return dtype
    if kind == "module":
        return importlib.import_module(node["name"])
    if kind == "list":
        return [_decode(n, model, tensors) for n in node["items"]]
    if kind == "tuple":
        return tuple(_decode(n, model, tensors) for n in node["items"])
    if kind == "dict":
        return {k: _decode(n, model, tensors) for k, n in node["items"].items()}
    raise TracingError(f"Unknown value kind {kind!r} in the edits file.")
