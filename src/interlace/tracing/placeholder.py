"""A name bound to no value yet: every use raises an error that says why and what to write.

After a trace, a name can be in the caller's scope without a value: assigned in the body but
not saved (`unsaved.NotSaved`), or saved by a job that was not waited for
(`backends.pending.NotWaited`). Leaving it unbound gives a bare `NameError` at some later line,
or silently keeps an older value of the same name; a placeholder fails at the first use with
the subclass's message instead. Its `repr` says the same without raising, so a notebook or a
debugger can still show it, and a later trace treats it as no value (`namespace.FrameNames`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Placeholder"]


class Placeholder:
    """Subclasses set `error` (the exception class) and write `_message()` and `__repr__`."""

    __slots__ = ()
    error: type[Exception] = Exception

    def _message(self) -> str:
        raise NotImplementedError

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise self.error(self._message()) from None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr.startswith("_repr_") or attr.startswith("_ipython"):
            # Tools probe optional protocols with hasattr (IPython's display, copy): let them
            # see an object without them, and fail at the real use.
            raise AttributeError(attr)
        self._refuse()

    def __setattr__(self, attr: str, value: Any) -> None:
        self._refuse()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # `torch.allclose(h, x)` and friends: find the placeholder among the arguments.
        for value in list(args) + list((kwargs or {}).values()):
            if isinstance(value, Placeholder):
                value._refuse()
        return NotImplemented


# Every other use raises the same message (str() and format() too: printing a placeholder as
# if it were the value would hide the problem).
for _op in (
    "__str__", "__format__", "__bool__", "__len__", "__iter__", "__contains__", "__getitem__",
    "__setitem__", "__delitem__", "__call__", "__hash__", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
    "__matmul__", "__rmatmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__",
    "__mod__", "__rmod__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__invert__",
    "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__int__", "__float__",
    "__index__", "__complex__", "__round__", "__array__", "__enter__", "__exit__", "__iadd__",
    "__isub__", "__imul__", "__itruediv__", "__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__",
):
    setattr(Placeholder, _op, Placeholder._refuse)
del _op
