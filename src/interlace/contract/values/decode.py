"""Decoding JSON nodes back into Python values (what both directions share is in `grammar.py`).

Kept apart from encoding because the decoder is the half that reads untrusted input: every
node is checked against the grammar, and anything wrong raises `WireFormatError` naming the
path.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import math
import sys
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import RemoteProtocolError, WireFormatError
from ...tracing.cache_entries import Cache, CacheEntry

from .grammar import (
    DEFAULT_MAX_DEPTH,
    DEVICE_RE,
    Extension,
    INT_RE,
    MAX_INT_DIGITS,
    NAN_BITS,
    NAN_RE,
    NP_DTYPE_RE,
    NP_KINDS,
    Node,
    SPECIAL_FLOATS,
    TORCH_DTYPES,
    format_path,
    is_hf_output_class,
)

__all__ = ["ValueDecoder"]


# ---------------------------------------------------------------------------- decoding

# tag -> (required fields, optional fields), "$t" excluded.
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    tag: (frozenset(req.split()), frozenset(opt.split()))
    for tag, req, opt in [
        ("int", "v", ""),
        ("float", "v", ""),
        ("tuple", "items", ""),
        ("list", "items", ""),
        ("set", "items", ""),
        ("frozenset", "items", ""),
        ("dict", "items", ""),
        ("odict", "items", ""),
        ("bytes", "b64", ""),
        ("bytearray", "b64", ""),
        ("complex", "re im", ""),
        ("slice", "start stop step", ""),
        ("range", "start stop step", ""),
        ("ellipsis", "", ""),
        ("tensor", "name", "grad"),
        ("ndarray", "name dtype shape", ""),
        ("npscalar", "dtype b64", ""),
        ("dtype", "name", ""),
        ("device", "v", ""),
        ("size", "items", ""),
        ("dataclass", "cls fields", ""),
        ("enum", "cls value", ""),
        ("cache", "items root_aliases name_aliases", ""),
        ("cacheentry", "", "output inputs"),
        ("hfoutput", "module name fields", ""),
        ("kvcache", "layers", ""),
    ]
}


class ValueDecoder:
    """Turns JSON nodes back into Python values; strict, raises only ``WireFormatError``.

    ``tensors`` is the message's tensor table (``Message.tensors``). A name used by several
    nodes decodes to the same object. Values are taken from the table as they are (no copy).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor | np.ndarray],
        extension: Extension | None = None,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self.tensors = tensors
        self.extension = extension
        self.max_depth = max_depth
        self._decoded: dict[tuple[str, str], Any] = {}
        self._segments: list[tuple[str, Any]] = []
        self._root = "value"
        self._depth = 0

    def decode(self, node: Node, *, path: str | None = None) -> Any:
        """Decode ``node``; ``path`` names the root (top level) or the segment to append
        (from inside an extension), for error messages."""
        if self._depth == 0:
            self._root = path or "value"
            self._segments = []
            try:
                return self._decode(node)
            except RemoteProtocolError:
                raise
            except RecursionError:
                raise self._error("nodes are nested too deeply") from None
            except Exception as exc:  # last line of defence for untrusted input
                raise self._error(f"malformed node ({type(exc).__name__}: {exc})") from exc
            finally:
                self._depth = 0
        n_segments, depth = len(self._segments), self._depth
        self._segments.append(("raw", path or ""))
        try:
            return self._decode(node)
        finally:
            del self._segments[n_segments:]
            self._depth = depth

    @property
    def path(self) -> str:
        """Where in the nodes the decoder is now, e.g. ``value['args'][0]``."""
        return format_path(self._root, self._segments)

    def _error(self, message: str) -> WireFormatError:
        return WireFormatError(f"bad value node at {self.path}: {message}")

    # Recursion goes _decode -> per-tag method -> _decode: two frames per level (see the
    # encoder).

    def _decode(self, node: Node) -> Any:
        cls = type(node)
        if node is None or cls is bool or cls is str or cls is int:
            return node
        if cls is float:
            if not math.isfinite(node):
                raise self._error(f"bare float {node!r} is not JSON; non-finite floats are tagged")
            return node
        if cls is list:
            raise self._error("a bare JSON array is not a node; lists are {'$t': 'list', 'items': [...]}")
        if cls is not dict:
            raise self._error(f"{cls.__name__} is not a JSON node")
        if self._depth >= self.max_depth:
            raise self._error(f"nodes are nested more than {self.max_depth} levels deep")
        self._depth += 1
        try:
            if "$t" not in node:
                return self._plain_dict(node)
            tag = node["$t"]
            if type(tag) is not str:
                raise self._error(f"tag {tag!r} is not a string")
            if tag.startswith("x:"):
                return self._extension(node)
            spec = _FIELDS.get(tag)
            if spec is None:
                raise self._error(f"unknown tag {tag!r}; the sender runs a different Interlace version")
            required, optional = spec
            keys = node.keys() - {"$t"}
            if not required <= keys or not keys <= required | optional:
                raise self._error(
                    f"tag {tag!r} needs fields {sorted(required)}"
                    + (f" (optional {sorted(optional)})" if optional else "")
                    + f", got {sorted(keys)}"
                )
            return _DECODERS[tag](self, node)
        finally:
            self._depth -= 1

    def _plain_dict(self, node: dict[str, Any]) -> dict[str, Any]:
        out = {}
        segments = self._segments
        for key, value in node.items():
            if type(key) is not str:
                raise self._error(f"object key {key!r} is not a string")
            if key.startswith("$"):
                raise self._error(f"object key {key!r} starts with '$'; such dicts use the 'dict' tag")
            segments.append(("[]", key))
            out[key] = self._decode(value)
            segments.pop()
        return out

    def _seq(self, node: dict[str, Any]) -> Any:
        tag = node["$t"]
        items = self._expect(node["items"], list, "'items'")
        segments = self._segments
        out = []
        if tag in ("set", "frozenset"):
            segments.append(("raw", "<set element>"))
            for item in items:
                out.append(self._hashable(self._decode(item), "set element"))
            segments.pop()
            return set(out) if tag == "set" else frozenset(out)
        for i, item in enumerate(items):
            segments.append(("[]", i))
            out.append(self._decode(item))
            segments.pop()
        return out if tag == "list" else tuple(out)

    def _pairs(self, node: dict[str, Any]) -> dict[Any, Any]:
        pairs = self._expect(node["items"], list, "'items'")
        segments = self._segments
        out: dict[Any, Any] = OrderedDict() if node["$t"] == "odict" else {}
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise self._error("dict items must be [key, value] pairs")
            segments.append(("raw", "<key>"))
            key = self._hashable(self._decode(pair[0]), "dict key")
            segments[-1] = ("[]", key)
            out[key] = self._decode(pair[1])
            segments.pop()
        return out

    def _parts(self, node: dict[str, Any]) -> slice | range:
        parts = []
        for field in ("start", "stop", "step"):
            self._segments.append(("raw", f".{field}"))
            parts.append(self._decode(node[field]))
            self._segments.pop()
        if node["$t"] == "slice":
            return slice(*parts)
        if not all(type(p) is int for p in parts):
            raise self._error(f"range start, stop and step must be ints, got {parts!r}")
        if parts[2] == 0:
            raise self._error("range step must not be zero")
        return range(*parts)

    def _complex(self, node: dict[str, Any]) -> complex:
        parts = []
        for field in ("re", "im"):
            self._segments.append(("raw", f".{field}"))
            parts.append(self._expect(self._decode(node[field]), float, f"'{field}'"))
            self._segments.pop()
        return complex(*parts)

    def _extension(self, node: dict[str, Any]) -> Any:
        if self.extension is None:
            raise self._error(f"tag {node['$t']!r} needs an extension, and this decoder has none")
        try:
            return self.extension.decode(node, self)
        except RemoteProtocolError:
            raise
        except Exception as exc:
            raise self._error(f"the extension failed on tag {node['$t']!r}: {type(exc).__name__}: {exc}") from exc

    # helpers used by the per-tag decoders

    def _expect(self, value: Any, kind: type, what: str) -> Any:
        if type(value) is not kind:
            raise self._error(f"{what} must be {kind.__name__}, got {type(value).__name__}")
        return value

    def _hashable(self, value: Any, what: str) -> Any:
        try:
            hash(value)
        except TypeError:
            raise self._error(f"{what} of type {type(value).__name__} is not hashable") from None
        return value

    def _b64(self, node: dict[str, Any]) -> bytes:
        text = self._expect(node["b64"], str, "'b64'")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise self._error(f"'b64' is not valid base64 ({exc})") from None

    def _big_int(self, node: dict[str, Any]) -> int:
        text = self._expect(node["v"], str, "'v'")
        if len(text) > MAX_INT_DIGITS or not INT_RE.fullmatch(text):
            raise self._error(f"'v' must be a decimal integer of at most {MAX_INT_DIGITS} digits")
        return int(text)

    def _special_float(self, node: dict[str, Any]) -> float:
        text = node["v"]
        if type(text) is str and NAN_RE.fullmatch(text):
            value = NAN_BITS.unpack(bytes.fromhex(text[4:]))[0]
            if not math.isnan(value):
                raise self._error(f"float 'v' {text!r} is not a NaN bit pattern")
            return value
        if type(text) is not str or text not in SPECIAL_FLOATS:
            raise self._error(
                f"float 'v' must be one of {sorted(SPECIAL_FLOATS)} or 'nan:<16 hex digits>', got {text!r}"
            )
        return SPECIAL_FLOATS[text]

    def _table(self, name: Any) -> torch.Tensor | np.ndarray:
        if type(name) is not str or name not in self.tensors:
            raise self._error(f"tensor {name!r} is not in the message's tensors")
        return self.tensors[name]

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        grad = node.get("grad", False)
        if grad is not True and grad is not False:
            raise self._error(f"'grad' must be true or false, got {grad!r}")
        tensor = self._table(node["name"])
        key = ("tensor", node["name"])
        if key in self._decoded:
            return self._decoded[key]
        if not isinstance(tensor, torch.Tensor):
            raise self._error(f"tensor {node['name']!r} is not a torch tensor")
        if grad:
            if not (tensor.is_floating_point() or tensor.is_complex()):
                raise self._error(f"tensor {node['name']!r} of dtype {tensor.dtype} cannot require grad")
            tensor.requires_grad_(True)
        self._decoded[key] = tensor
        return tensor

    def _np_dtype(self, text: Any) -> np.dtype:
        # np.dtype() parses many spellings, including object dtypes that would turn raw bytes
        # into pointers; only plain data dtypes in numpy's own canonical form get through.
        if type(text) is not str or not NP_DTYPE_RE.fullmatch(text):
            raise self._error(f"numpy dtype {text!r} is not allowed")
        try:
            dtype = np.dtype(text)
        except (TypeError, ValueError) as exc:
            raise self._error(f"numpy dtype {text!r} is invalid ({exc})") from None
        if dtype.kind not in NP_KINDS or dtype.hasobject or dtype.itemsize == 0:
            raise self._error(f"numpy dtype {text!r} is not allowed")
        return dtype

    def _ndarray(self, node: dict[str, Any]) -> np.ndarray:
        dtype = self._np_dtype(node["dtype"])
        shape = tuple(self._expect(node["shape"], list, "'shape'"))
        if not all(type(d) is int and d >= 0 for d in shape):
            raise self._error(f"'shape' must be non-negative ints, got {list(shape)!r}")
        stored = self._table(node["name"])
        raw = stored.numpy() if isinstance(stored, torch.Tensor) and stored.dtype is torch.uint8 else stored
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
            raise self._error(f"array {node['name']!r} must be stored as 1-D uint8 bytes")
        if raw.nbytes != math.prod(shape) * dtype.itemsize:
            raise self._error(f"array {node['name']!r}: {raw.nbytes} bytes do not match shape {list(shape)} of {dtype}")
        key = ("ndarray", node["name"])
        cached = self._decoded.get(key)
        if cached is not None and cached.dtype == dtype and cached.shape == shape:
            return cached
        array = raw.view(dtype).reshape(shape) if raw.nbytes else np.empty(shape, dtype=dtype)
        self._decoded[key] = array
        return array

    def _npscalar(self, node: dict[str, Any]) -> np.generic:
        dtype = self._np_dtype(node["dtype"])
        data = self._b64(node)
        if len(data) != dtype.itemsize:
            raise self._error(f"numpy scalar of dtype {dtype} needs {dtype.itemsize} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype)[0]

    def _class(self, node: dict[str, Any], base: type | None) -> type:
        self._segments.append(("raw", ".__class__"))
        cls = self._decode(node["cls"])
        self._segments.pop()
        if base is None:
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise self._error(f"'cls' must decode to a dataclass class, got {cls!r}")
        elif not (isinstance(cls, type) and issubclass(cls, base)):
            raise self._error(f"'cls' must decode to an Enum class, got {cls!r}")
        return cls

    def _dataclass(self, node: dict[str, Any]) -> Any:
        cls = self._class(node, None)
        fields = self._expect(node["fields"], dict, "'fields'")
        names = [f.name for f in dataclasses.fields(cls)]
        if set(fields) != set(names):
            raise self._error(f"dataclass {cls.__qualname__} has fields {sorted(names)}, got {sorted(fields)}")
        try:
            # Like pickle: rebuild the state without running __init__/__post_init__.
            obj = object.__new__(cls)
        except TypeError as exc:
            raise self._error(f"cannot create {cls.__qualname__} ({exc})") from None
        for name in names:
            self._segments.append(("raw", f".{name}"))
            object.__setattr__(obj, name, self._decode(fields[name]))
            self._segments.pop()
        return obj

    def _enum(self, node: dict[str, Any]) -> enum.Enum:
        cls = self._class(node, enum.Enum)
        self._segments.append(("raw", ".value"))
        value = self._decode(node["value"])
        self._segments.pop()
        try:
            return cls(value)
        except (ValueError, TypeError) as exc:
            raise self._error(f"{value!r} is not a member of {cls.__qualname__} ({exc})") from None

    def _cache(self, node: dict[str, Any]) -> Cache:
        pairs = self._expect(node["items"], list, "'items'")
        tables = []
        for field in ("root_aliases", "name_aliases"):
            table = self._expect(node[field], dict, f"'{field}'")
            if not all(type(k) is str and type(v) is str for k, v in table.items()):
                raise self._error(f"'{field}' must map alias strings to path strings")
            tables.append(table)
        cache = Cache(root_aliases=tables[0], name_aliases=tables[1])
        segments = self._segments
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                raise self._error("cache items must be [path string, entry] pairs")
            path = pair[0]
            if dict.__contains__(cache, path):
                raise self._error(f"cache path {path!r} appears twice")
            segments.append(("[]", path))
            entry = self._decode(pair[1])
            if not (type(entry) is CacheEntry or (type(entry) is list and all(type(e) is CacheEntry for e in entry))):
                raise self._error(f"a cache item must be a cacheentry or a list of them, got {type(entry).__name__}")
            segments.pop()
            dict.__setitem__(cache, path, entry)
        return cache

    def _cache_entry(self, node: dict[str, Any]) -> CacheEntry:
        entry = CacheEntry()
        if "output" in node:
            self._segments.append(("raw", ".output"))
            entry._output = self._decode(node["output"])
            self._segments.pop()
        if "inputs" in node:
            self._segments.append(("raw", ".inputs"))
            inputs = self._decode(node["inputs"])
            if not (type(inputs) is tuple and len(inputs) == 2 and type(inputs[0]) is tuple and type(inputs[1]) is dict):
                raise self._error("a cache entry's 'inputs' must be a (tuple, dict) pair")
            self._segments.pop()
            entry._inputs = inputs
        return entry

    def _hf_output(self, node: dict[str, Any]) -> Any:
        module_name, name = node["module"], node["name"]
        # Only a class of a transformers module this process has imported already: decoding
        # never imports anything, and never names a class outside transformers.
        module = sys.modules.get(module_name) if type(module_name) is str and module_name.startswith("transformers.") else None
        cls = getattr(module, name, None) if module is not None and type(name) is str and name.isidentifier() else None
        if not is_hf_output_class(cls) or cls.__module__ != module_name:
            raise self._error(f"{module_name!r}.{name!r} is not a transformers ModelOutput class loaded here")
        fields = self._expect(node["fields"], dict, "'fields'")
        known = {f.name for f in dataclasses.fields(cls)}
        if not set(fields) <= known:
            raise self._error(f"{cls.__qualname__} has no fields {sorted(set(fields) - known)}")
        values = {}
        for field, item in fields.items():
            self._segments.append(("raw", f".{field}"))
            values[field] = self._decode(item)
            self._segments.pop()
        return cls(**values)

    def _kv_cache(self, node: dict[str, Any]) -> Any:
        # transformers' own DynamicCache, from the module this process has imported already.
        module = sys.modules.get("transformers.cache_utils")
        cls = getattr(module, "DynamicCache", None)
        if not isinstance(cls, type):
            raise self._error("a DynamicCache needs transformers, which is not loaded here")
        layers = self._expect(node["layers"], list, "'layers'")
        cache = cls()
        for i, pair in enumerate(layers):
            self._segments.append(("raw", f".layers[{i}]"))
            pair = self._expect(pair, list, "a [keys, values] pair")
            if len(pair) != 2:
                raise self._error("a cache layer must be a [keys, values] pair")
            keys, values = self._decode(pair[0]), self._decode(pair[1])
            if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
                raise self._error("a cache layer's keys and values must be tensors")
            cache.update(keys, values, i)
            self._segments.pop()
        return cache

    def _dtype(self, node: dict[str, Any]) -> torch.dtype:
        name = node["name"]
        if type(name) is not str or name not in TORCH_DTYPES:
            raise self._error(f"{name!r} is not a torch dtype here")
        return TORCH_DTYPES[name]

    def _device(self, node: dict[str, Any]) -> torch.device:
        text = node["v"]
        if type(text) is not str or not DEVICE_RE.fullmatch(text):
            raise self._error(f"{text!r} is not a device string like 'cpu' or 'cuda:0'")
        try:
            return torch.device(text)
        except (RuntimeError, ValueError) as exc:
            raise self._error(f"{text!r} is not a valid torch device ({exc})") from None

    def _size(self, node: dict[str, Any]) -> torch.Size:
        items = self._expect(node["items"], list, "'items'")
        if not all(type(d) is int and -(2**63) <= d < 2**63 for d in items):
            raise self._error(f"torch.Size items must be 64-bit ints, got {items!r}")
        return torch.Size(items)


_DECODERS: dict[str, Any] = {
    "int": ValueDecoder._big_int,
    "float": ValueDecoder._special_float,
    "tuple": ValueDecoder._seq,
    "list": ValueDecoder._seq,
    "set": ValueDecoder._seq,
    "frozenset": ValueDecoder._seq,
    "dict": ValueDecoder._pairs,
    "odict": ValueDecoder._pairs,
    "bytes": ValueDecoder._b64,
    "bytearray": lambda d, n: bytearray(d._b64(n)),
    "complex": ValueDecoder._complex,
    "slice": ValueDecoder._parts,
    "range": ValueDecoder._parts,
    "ellipsis": lambda d, n: ...,
    "tensor": ValueDecoder._tensor,
    "ndarray": ValueDecoder._ndarray,
    "npscalar": ValueDecoder._npscalar,
    "dtype": ValueDecoder._dtype,
    "device": ValueDecoder._device,
    "size": ValueDecoder._size,
    "dataclass": ValueDecoder._dataclass,
    "enum": ValueDecoder._enum,
    "cache": ValueDecoder._cache,
    "cacheentry": ValueDecoder._cache_entry,
    "hfoutput": ValueDecoder._hf_output,
    "kvcache": ValueDecoder._kv_cache,
}
