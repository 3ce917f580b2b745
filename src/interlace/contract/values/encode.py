"""Python values <-> JSON nodes (+ a table of tensors), for the wire envelope.

Node grammar. JSON scalars stand for themselves where that is unambiguous: ``None``,
``bool``, ``str``, ints with ``|v| <= 2**53`` (what every JSON reader keeps exact), finite
floats other than ``-0.0``. A dict whose keys are all ``str`` and none starts with ``"$"`` is
a JSON object. Everything else is a tagged object ``{"$t": tag, ...}``:

==============  ===============================================================
tag             fields
==============  ===============================================================
int             ``v``: decimal string (ints beyond 2**53 stay exact)
float           ``v``: ``"nan" | "inf" | "-inf" | "-0.0"`` or ``"nan:<hex bits>"`` for
                other NaNs (sign and payload survive)
tuple, list,    ``items``: [node, ...]
set, frozenset
dict, odict     ``items``: [[key node, value node], ...] (non-str or "$" keys; OrderedDict)
bytes,          ``b64``: base64
bytearray
complex         ``re``, ``im``: float nodes
slice           ``start``, ``stop``, ``step``: nodes
range           ``start``, ``stop``, ``step``: int nodes
ellipsis        (none)
tensor          ``name`` in the tensor table; ``grad``: true if it required grad
ndarray         ``name`` (raw bytes as a 1-D uint8 tensor), ``dtype`` (numpy str such as
                ``"<f4"``, ``"<U3"``, ``"<M8[ns]"``), ``shape``
npscalar        ``dtype``, ``b64``: the scalar's bytes
dtype           ``name``: torch dtype name, e.g. ``"bfloat16"``
device          ``v``: e.g. ``"cuda:0"``
size            ``items``: [int, ...] (torch.Size)
dataclass       ``cls``: node from the extension; ``fields``: {name: node}
cache           ``items``: [[path str, cacheentry node or list node of them], ...];
                ``root_aliases``, ``name_aliases``: {alias: str} (``tracer.cache()``)
cacheentry      optional ``output``: node; optional ``inputs``: node of ``(tuple, dict)``;
                an absent field was not cached
hfoutput        ``module``, ``name``: a Hugging Face ``ModelOutput`` class (a module under
                ``transformers.`` that the receiver has imported already); ``fields``:
                {name: node} for the fields that are set (what models return)
kvcache         ``layers``: [[keys node, values node], ...]: a transformers ``DynamicCache``
                (in every model output: ``output = model.output.save()``), rebuilt as one
enum            ``cls``: node from the extension; ``value``: node of ``member.value``
x:<anything>    owned by the extension
==============  ===============================================================

Design notes:

- Types are matched exactly (``type(v) is int``), so subclasses such as ``IntEnum``,
  namedtuples or ``defaultdict`` never silently lose their type: they go to the extension
  or fail with a clear error.
- The same tensor or array object used several times is stored once and decodes to one
  object, so aliasing between saved values survives. Containers are copied per use; a
  container that contains itself raises ``UnsupportedValueError`` (cycles are almost always
  accidental in trace inputs, and JSON has no references).
- Tensors carry data, dtype, shape and ``requires_grad``; they decode on the CPU, and a view
  decodes as an independent tensor. The decoder hands out the table's tensors as they are.
- The decoder treats nodes as untrusted: unknown tags, extra or missing fields, wrong types,
  missing tensors, excessive depth all raise ``WireFormatError`` naming the path.
  Dataclasses are rebuilt without calling ``__init__`` (as pickle does), so decoding runs no
  user code except what the extension chooses to run.

Extension protocol (kept small; see ``Extension``): the encoder calls
``extension.encode(value, encoder)`` for any value it does not handle natively, including
the *class* of a dataclass instance or enum member, and raises ``UnsupportedValueError``
only if that returns ``NotImplemented``. Extension nodes should use tags starting with
``"x:"``; the decoder hands exactly those to ``extension.decode(node, decoder)``. Extensions
encode and decode nested values with ``encoder.encode(v, path=".attr")`` and
``decoder.decode(node, path=".attr")``, which keep the depth limit, cycle check and error
paths, and may add tensors with ``encoder.add_tensor(t)``.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import math
from collections import OrderedDict
from collections.abc import Mapping
from types import EllipsisType, NotImplementedType
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedValueError, WireFormatError
from ..wire.encode import check_tensor
from ...tracing.cache_entries import NOT_CACHED, Cache, CacheEntry
from ...tracing.local_block import List
from .grammar import Decoding, CANONICAL_NAN, DEFAULT_FIX, DEFAULT_MAX_DEPTH, Extension, MAX_INT_DIGITS, MAX_SAFE_INT, NAN_BITS, NP_KINDS, Node, format_path, is_batch_encoding, is_dynamic_cache, is_hf_output_class

__all__ = [
    "ValueEncoder",
    "ClassRegistry",
]



def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"



def _float_node(value: float) -> Node:
    if math.isfinite(value) and not (value == 0.0 and math.copysign(1.0, value) < 0):
        return value
    if math.isnan(value):
        # NaNs differ in sign and payload (e.g. -nan from negation); keep the bits.
        bits = NAN_BITS.pack(value)
        return {"$t": "float", "v": "nan" if bits == CANONICAL_NAN else f"nan:{bits.hex()}"}
    if math.isinf(value):
        return {"$t": "float", "v": "inf" if value > 0 else "-inf"}
    return {"$t": "float", "v": "-0.0"}


class ValueEncoder:
    """Turns Python values into JSON nodes; tensors and arrays go to ``self.tensors``.

    One encoder per message: several ``encode`` calls share the tensor table, so a tensor
    used in two places of a request is sent once.
    """

    def __init__(self, extension: Extension | None = None, *, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.extension = extension
        self.max_depth = max_depth
        self.tensors: dict[str, torch.Tensor | np.ndarray] = {}
        # id -> (object, node); holding the object keeps its id from being reused.
        self._memo: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._active: set[int] = set()  # containers being encoded, to catch cycles
        self._segments: list[tuple[str, Any]] = []
        self._root = "value"
        self._depth = 0

    # ------------------------------------------------------------------ public API

    def encode(self, value: Any, *, path: str | None = None) -> Node:
        """Encode ``value``. At top level ``path`` names the root in error messages (e.g.
        ``"config"``); from inside an extension it is the segment to append (e.g. ``".w"``)."""
        if self._depth == 0:
            self._root = path or "value"
            self._segments = []
            self._active = set()
            try:
                return self._encode(value)
            except RecursionError:
                raise self._error(value, "it is nested too deeply for Python's recursion limit",
                                  "flatten the structure") from None
            finally:
                self._depth = 0
        # Nested call from an extension, which may catch our error and try something else:
        # leave the state as it was either way.
        n_segments, depth, active = len(self._segments), self._depth, set(self._active)
        self._segments.append(("raw", path or ""))
        try:
            return self._encode(value)
        finally:
            del self._segments[n_segments:]
            self._depth, self._active = depth, active

    def add_tensor(self, tensor: torch.Tensor | np.ndarray) -> str:
        """Put ``tensor`` in the table and return its new name."""
        name = f"t{len(self.tensors)}"
        self.tensors[name] = tensor
        return name

    @property
    def path(self) -> str:
        """Where in the value the encoder is now, e.g. ``config['layers'][2]``."""
        return format_path(self._root, self._segments)

    # ------------------------------------------------------------------ internals
    # Recursion goes _encode -> handler -> _encode: two Python frames per level (no
    # comprehensions or helper calls in between), so the depth limit, not Python's recursion
    # limit, is what users meet. A raised error leaves _segments as they were at the raise,
    # which is what the message needs; the next top-level call resets them.

    def _error(self, value: Any, reason: str, fix: str | None = DEFAULT_FIX) -> UnsupportedValueError:
        # fix=None: the reason already says what to do.
        error = UnsupportedValueError(
            f"cannot send a value of type {_type_name(value)} at {self.path}: {reason}"
            + (f"; {fix}" if fix else "")
        )
        # For callers that build a fix as code (`remote.fixes.value_fix`): the value that
        # failed and where it sits.
        error.value, error.path = value, self.path  # type: ignore[attr-defined]
        return error

    def _encode(self, value: Any) -> Node:
        cls = type(value)
        if value is None or cls is bool or cls is str:
            return value
        if cls is int:
            if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
                return value
            if value.bit_length() > MAX_INT_DIGITS * 3:  # cheap bound before str() refuses
                raise self._error(value, f"the integer has more than {MAX_INT_DIGITS} digits",
                                  "send it as a string or bytes")
            try:
                return {"$t": "int", "v": str(value)}
            except ValueError:
                raise self._error(value, f"the integer has more than {MAX_INT_DIGITS} digits",
                                  "send it as a string or bytes") from None
        if cls is float:
            return _float_node(value)
        if self._depth >= self.max_depth:
            raise self._error(value, f"it is nested more than {self.max_depth} levels deep",
                              "flatten the structure or send it as a tensor")
        self._depth += 1
        try:
            handler = _ENCODERS.get(cls)
            if handler is not None:
                return handler(self, value)
            return self._encode_other(value)
        finally:
            self._depth -= 1

    def _enter(self, value: Any) -> None:
        if id(value) in self._active:
            raise self._error(value, "it contains itself (a reference cycle)",
                              "break the cycle, e.g. send a copy without the back-reference")
        self._active.add(id(value))

    def _seq(self, value: Any) -> Node:
        tag = _SEQ_TAGS[type(value)]
        self._enter(value)
        segments = self._segments
        items = []
        if tag in ("set", "frozenset"):
            segments.append(("raw", "<set element>"))
            for v in value:
                items.append(self._encode(v))
            segments.pop()
        else:
            for i, v in enumerate(value):
                segments.append(("[]", i))
                items.append(self._encode(v))
                segments.pop()
        self._active.discard(id(value))
        return {"$t": tag, "items": items}

    def _dict(self, value: Mapping[Any, Any]) -> Node:
        self._enter(value)
        segments = self._segments
        node: dict[str, Any]
        if type(value) is dict and all(type(k) is str and not k.startswith("$") for k in value):
            node = {}
            for k, v in value.items():
                segments.append(("[]", k))
                node[k] = self._encode(v)
                segments.pop()
        else:
            items = []
            for k, v in value.items():
                segments.append(("key", k))
                key = self._encode(k)
                segments[-1] = ("[]", k)
                items.append([key, self._encode(v)])
                segments.pop()
            node = {"$t": "odict" if type(value) is OrderedDict else "dict", "items": items}
        self._active.discard(id(value))
        return node

    def _parts(self, value: slice | range) -> Node:
        node: dict[str, Any] = {"$t": "slice" if type(value) is slice else "range"}
        for field in ("start", "stop", "step"):
            self._segments.append(("raw", f".{field}"))
            node[field] = self._encode(getattr(value, field))
            self._segments.pop()
        return node

    def _cache(self, value: Cache) -> Node:
        # `tracer.cache()`'s result is data: its entries and the model's alias tables.
        self._enter(value)
        segments = self._segments
        items = []
        for path, entry in value.items():
            if type(path) is not str or not (type(entry) is CacheEntry or (
                    type(entry) is list and all(type(e) is CacheEntry for e in entry))):
                raise self._error(value, f"its item {path!r} is not a module path with cache entries",
                                  "keep only what `tracer.cache()` put in it, or convert it with dict(...)")
            segments.append(("[]", path))
            items.append([path, self._encode(entry)])
            segments.pop()
        self._active.discard(id(value))
        return {"$t": "cache", "items": items,
                "root_aliases": dict(value.root_aliases), "name_aliases": dict(value.name_aliases)}

    def _cache_entry(self, value: CacheEntry) -> Node:
        node: dict[str, Any] = {"$t": "cacheentry"}
        for field in ("output", "inputs"):
            part = getattr(value, "_" + field)
            if part is not NOT_CACHED:
                self._segments.append(("raw", f".{field}"))
                node[field] = self._encode(part)
                self._segments.pop()
        return node

    def _hf_output(self, value: Any) -> Node:
        # What models return (logits, hidden states): the class by name, rebuilt by the
        # receiver from transformers, which it has loaded already; never an import by name.
        cls = type(value)
        self._enter(value)
        fields = {}
        for name, item in value.items():
            self._segments.append(("raw", f".{name}"))
            fields[name] = self._encode(item)
            self._segments.pop()
        self._active.discard(id(value))
        return {"$t": "hfoutput", "module": cls.__module__, "name": cls.__qualname__, "fields": fields}

    def _kv_cache(self, value: Any) -> Node:
        # A model's key/value cache is data (two tensors a layer) inside a class with live
        # methods: sent as the tensors, rebuilt by the receiver from transformers.
        self._enter(value)
        layers = []
        for i, layer in enumerate(value.layers):
            self._segments.append(("raw", f".layers[{i}]"))
            layers.append([self._encode(layer.keys), self._encode(layer.values)])
            self._segments.pop()
        self._active.discard(id(value))
        return {"$t": "kvcache", "layers": layers}

    def _memoized(self, value: Any, make: Any) -> Node:
        hit = self._memo.get(id(value))
        if hit is None:
            hit = (value, make())
            self._memo[id(value)] = hit
        return dict(hit[1])

    def _tensor(self, value: torch.Tensor) -> Node:
        problem = check_tensor(value)
        if problem is not None:
            raise self._error(value, problem, None)

        def make() -> dict[str, Any]:
            node: dict[str, Any] = {"$t": "tensor", "name": self.add_tensor(value)}
            if value.requires_grad:
                node["grad"] = True
            return node

        return self._memoized(value, make)

    def _ndarray(self, value: np.ndarray) -> Node:
        dtype = value.dtype
        if dtype.kind not in NP_KINDS or dtype.hasobject or dtype.itemsize == 0:
            raise self._error(value, f"numpy dtype {dtype} holds objects or structure",
                              "convert it with .astype() to a numeric, bool, str or datetime dtype")

        def make() -> dict[str, Any]:
            # ascontiguousarray turns 0-d into 1-d, so the shape comes from the original.
            raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            return {"$t": "ndarray", "name": self.add_tensor(raw), "dtype": dtype.str, "shape": list(value.shape)}

        return self._memoized(value, make)

    def _npscalar(self, value: np.generic) -> Node:
        dtype = value.dtype
        if dtype.kind not in NP_KINDS or dtype.hasobject or dtype.itemsize == 0:
            raise self._error(value, f"numpy scalar of dtype {dtype} cannot be sent",
                              "convert it with .item() first")
        return {"$t": "npscalar", "dtype": dtype.str, "b64": base64.b64encode(value.tobytes()).decode("ascii")}

    def _class_node(self, instance: Any, what: str) -> Node:
        cls = type(instance)
        node = self.extension.encode(cls, self) if self.extension is not None else NotImplemented
        if node is NotImplemented:
            raise self._error(
                instance,
                f"the {what} class {cls.__module__}.{cls.__qualname__} is not known to the receiver",
                "decorate the class with @interlace.remote, or convert the value to a dict/tuple "
                "before the trace",
            )
        return node

    def _encode_other(self, value: Any) -> Node:
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, np.generic):
            return self._npscalar(value)
        if isinstance(value, enum.Enum):
            cls_node = self._class_node(value, "enum")
            self._segments.append(("raw", ".value"))
            member = self._encode(value.value)
            self._segments.pop()
            return {"$t": "enum", "cls": cls_node, "value": member}
        if is_hf_output_class(type(value)):
            return self._hf_output(value)
        if is_dynamic_cache(value):
            return self._kv_cache(value)
        if is_batch_encoding(type(value)):  # a tokenizer's output travels as its dict of tensors
            return self._dict(dict(value))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls_node = self._class_node(value, "dataclass")
            self._enter(value)
            fields = {}
            for f in dataclasses.fields(value):
                self._segments.append(("raw", f".{f.name}"))
                fields[f.name] = self._encode(getattr(value, f.name))
                self._segments.pop()
            self._active.discard(id(value))
            return {"$t": "dataclass", "cls": cls_node, "fields": fields}
        if self.extension is not None:
            node = self.extension.encode(value, self)
            if node is not NotImplemented:
                return node
        raise self._error(value, "Interlace sends only data (JSON scalars, containers, tensors, "
                          "numpy values, dtypes/devices) and @interlace.remote objects", _fix_for(value))


def _fix_for(value: Any) -> str:
    # The advice must fit the value (an open file is read, a generator listed, a lock left
    # out of the body); `remote.fixes` sorts values into those kinds.
    from ..fixes import value_hint

    return value_hint(value)



def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


# `interlace.list()` (append returns the list) travels as the plain list it is.
_SEQ_TAGS: dict[type, str] = {list: "list", List: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
_ENCODERS: dict[type, Any] = {
    list: ValueEncoder._seq,
    List: ValueEncoder._seq,
    tuple: ValueEncoder._seq,
    set: ValueEncoder._seq,
    frozenset: ValueEncoder._seq,
    dict: ValueEncoder._dict,
    OrderedDict: ValueEncoder._dict,
    slice: ValueEncoder._parts,
    range: ValueEncoder._parts,
    torch.Tensor: ValueEncoder._tensor,
    np.ndarray: ValueEncoder._ndarray,
    bytes: lambda e, v: {"$t": "bytes", "b64": _b64(v)},
    bytearray: lambda e, v: {"$t": "bytearray", "b64": _b64(v)},
    complex: lambda e, v: {"$t": "complex", "re": _float_node(v.real), "im": _float_node(v.imag)},
    EllipsisType: lambda e, v: {"$t": "ellipsis"},
    torch.dtype: lambda e, v: {"$t": "dtype", "name": str(v).removeprefix("torch.")},
    torch.device: lambda e, v: {"$t": "device", "v": str(v)},
    torch.Size: lambda e, v: {"$t": "size", "items": list(v)},
    Cache: ValueEncoder._cache,
    CacheEntry: ValueEncoder._cache_entry,
}


class ClassRegistry:
    """The smallest useful extension: classes known by name on both sides.

    ``ClassRegistry({"pkg.Point": Point})`` sends ``Point`` (for dataclass instances and enum
    members) as ``{"$t": "x:class", "name": "pkg.Point"}`` and resolves only names it holds,
    so a message can never name an arbitrary importable class.
    """

    TAG = "x:class"

    def __init__(self, classes: Mapping[str, type] | None = None) -> None:
        self._by_name: dict[str, type] = dict(classes or {})
        self._by_class: dict[type, str] = {cls: name for name, cls in self._by_name.items()}

    def register(self, cls: type, name: str | None = None) -> type:
        """Register ``cls`` (usable as a decorator); the name defaults to module.qualname."""
        name = name or f"{cls.__module__}.{cls.__qualname__}"
        self._by_name[name] = cls
        self._by_class[cls] = name
        return cls

    def encode(self, value: Any, encoder: ValueEncoder) -> Node | NotImplementedType:
        if isinstance(value, type) and value in self._by_class:
            return {"$t": self.TAG, "name": self._by_class[value]}
        return NotImplemented

    def decode(self, node: dict[str, Any], decoder: Decoding) -> Any:
        name = node.get("name")
        if node.get("$t") != self.TAG or set(node) != {"$t", "name"} or type(name) is not str:
            raise WireFormatError(f"bad value node at {decoder.path}: expected {{'$t': {self.TAG!r}, 'name': str}}")
        cls = self._by_name.get(name)
        if cls is None:
            raise WireFormatError(f"bad value node at {decoder.path}: class {name!r} is not registered here")
        return cls

