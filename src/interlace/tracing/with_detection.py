"""Whether a call's result is about to be entered by a `with` statement.

Design note
-----------
nnsight lets `out = model.generate(ids, max_new_tokens=2)` (no `with` block) call the
method directly and return its output. nnsight finds out by failing to capture a `with`
block; Interlace asks the caller's bytecode instead, before doing anything. In CPython 3.11
a `with EXPR:` statement compiles to EXPR's CALL followed at once by BEFORE_WITH
(BEFORE_ASYNC_WITH for `async with`), so the instruction after the call at the caller's
`f_lasti` tells.

The rule (`enters_with`): a call is "used as a context" when
  1. BEFORE_WITH directly follows it (`with model.generate(x) as tracer:`), or
  2. its result is stored in a name that a later `with NAME` of the same code object enters
     (`tracer = model.generate(x)` ... `with tracer:`), or
  3. the bytecode cannot be read (no caller frame, or no such instruction): keep the tracer.
Anything else (`out = model.generate(x)`, `print(model.generate(x))`, a value returned from
a helper) is a direct call. Results are cached per (code object, f_lasti).
"""

from __future__ import annotations

import dis
import types

__all__ = ["enters_with"]

_WITH_OPS = frozenset({"BEFORE_WITH", "BEFORE_ASYNC_WITH"})
_STORE_OPS = frozenset({"STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF"})
_LOAD_OPS = frozenset({"LOAD_FAST", "LOAD_NAME", "LOAD_GLOBAL", "LOAD_DEREF", "LOAD_CLASSDEREF"})

_cache: dict[tuple[types.CodeType, int], bool] = {}
_CACHE_LIMIT = 4096


def enters_with(frame: types.FrameType | None) -> bool:
    """Whether the call `frame` is making right now has its result entered by a `with`
    (see the module's rule). `frame` is the caller's frame."""
    if frame is None:
        return True
    code, lasti = frame.f_code, frame.f_lasti
    key = (code, lasti)
    hit = _cache.get(key)
    if hit is None:
        hit = _scan(code, lasti)
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        _cache[key] = hit
    return hit


def _scan(code: types.CodeType, lasti: int) -> bool:
    instructions = list(dis.get_instructions(code))  # CACHE entries are hidden
    after = next((i for i, ins in enumerate(instructions) if ins.offset > lasti), None)
    if after is None:
        return True
    nxt = instructions[after]
    if nxt.opname in _WITH_OPS:
        return True
    if nxt.opname in _STORE_OPS:
        name = nxt.argval
        for prev, ins in zip(instructions, instructions[1:]):
            if ins.opname in _WITH_OPS and prev.opname in _LOAD_OPS and prev.argval == name:
                return True
        return False
    return False
