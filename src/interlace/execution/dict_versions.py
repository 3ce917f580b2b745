"""A cheap fingerprint of a dict, for the integrity guard (`integrity.py`).

CPython 3.11-3.13 keep a version counter in every dict (PEP 509's `ma_version_tag`, right after
the object header and `ma_used`) that moves at every change of the dict: an entry added,
replaced by another object or deleted, a clear. An unmoved counter means the same entries, so
the guard compares in full only the dicts whose counter moved: it reads a few hundred counters
where it compared thousands of entries (`torch`'s namespace alone has 1,500) twice a job.

The counter is read through ctypes at the dict's address; the layout and the behaviour are
tested once at import, on a plain dict, an OrderedDict, an instance's and a class's dict. Where
that fails (another Python) `tag_cell` gives None and the guard compares every dict in full.
"""

from __future__ import annotations

import ctypes
import gc
import operator
import sys
import types
from collections import OrderedDict
from typing import Any

__all__ = ["TAGS", "raw_dict", "tag_cell", "tag_value"]

_WORD = ctypes.sizeof(ctypes.c_void_p)
_TAG_OFFSET = 3 * _WORD  # ob_refcnt, ob_type, ma_used, then ma_version_tag

#: Reads a cell's counter (`map(tag_value, cells)` reads many in one C loop).
tag_value = operator.attrgetter("value")


def raw_dict(live: Any) -> Any:
    """The dict under a namespace (a class's mappingproxy holds one), or None."""
    if type(live) is types.MappingProxyType:
        inner = gc.get_referents(live)
        live = inner[0] if len(inner) == 1 else None
    return live if isinstance(live, dict) else None


def tag_cell(live: Any) -> Any:
    """A ctypes view of the version counter of `live`'s dict (None: compare it in full). The
    caller keeps `live` alive as long as the cell (the cell holds only its address)."""
    d = raw_dict(live)
    return None if d is None or not TAGS else ctypes.c_uint64.from_address(id(d) + _TAG_OFFSET)


def _works() -> bool:
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return False
    try:
        class Probe:
            pass

        probe = Probe()
        probe.a = 1
        cases = [
            ({"a": 1}, dict.__setitem__, dict.__delitem__),
            (OrderedDict(a=1), OrderedDict.__setitem__, OrderedDict.__delitem__),
            (probe.__dict__, lambda d, k, v: setattr(probe, k, v), lambda d, k: delattr(probe, k)),
            (vars(Probe), lambda d, k, v: setattr(Probe, k, v), lambda d, k: delattr(Probe, k)),
        ]
        for live, put, drop in cases:
            d = raw_dict(live)
            if d is None or ctypes.c_ssize_t.from_address(id(d) + _TAG_OFFSET - _WORD).value != len(d):
                return False  # not the layout assumed
            cell = ctypes.c_uint64.from_address(id(d) + _TAG_OFFSET)
            # (an equal value that is another object must move it too: the guard compares by identity)
            for change in (lambda: put(d, "a", float("2.5")), lambda: put(d, "a", float("2.5")),
                           lambda: put(d, "b", 3), lambda: drop(d, "b")):
                before = cell.value
                change()
                if cell.value == before:
                    return False
        return True
    except Exception:  # noqa: BLE001 - any doubt: compare in full
        return False


TAGS = _works()
