"""Mocks: a stand-in runs in a module's place (its whole subtree's) for the length of a run.

```python
def mlp_stand_in(hidden, *args, **kwargs):       # called as the module is: (args, kwargs)
    return torch.zeros_like(hidden)              # ... and returns what the module returns

with model.trace(prompt, mocks={"transformer.h.0.mlp": mlp_stand_in}):
    out = model.transformer.h[0].mlp.output.save()   # the stand-in's output
    hidden = model.transformer.h[1].output.save()    # computed from it
```

A stand-in is a function or a (small) `torch.nn.Module`, called with the module's own inputs.
Paths are written as for `model.get(path)`: dotted, from the model, aliases from `rename=`
included; an envoy (`model.transformer.h[0].mlp`) may be the key too.

How it works: for the run, the mocked module's instance `forward` is the stand-in, as
accelerate's hooks put one there. The engine's wrappers wrap an instance `forward` and put it
back after the run (`wrapping.ModuleHooks`), so `.input`, `.output` and edits of the mocked
module work as for any module, and the forward's other modules see the stand-in's output.
The submodules of a mocked module are never called; a body that reads one gets a
`ModuleNotCalledError` that names the mock (`not_run_message`, used by
`Interleaver.finish`). After the run, also one that raised, every `forward` is what it was.

`resolve_mocks` checks a `mocks=` dict when the trace is made (before the `with` body):
unknown paths (with the closest ones), stand-ins that cannot be called, a mock inside another
one. `mocks_applied` applies them around a run (a trace, a generation or a whole session);
an error raised during it gets a note saying what each stand-in returned, since a stand-in
whose output is not shaped like the module's fails where that output is used: in the body's
line that reads it, or in the model's own code.

Which modes take `mocks=` (remote=False and 'local', never a server) is decided in
`contract/options.py` and `backends/mocks.py`; this file is the engine's part.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol

import torch

from ..errors import TracingError

__all__ = [
    "MSG_BAD_STAND_IN", "MSG_BELOW_MOCK", "MSG_MOCKS_NOT_A_DICT", "MSG_MOCK_INSIDE_MOCK", "MSG_MOCK_THE_ROOT",
    "MSG_UNKNOWN_MOCK_PATH", "MockedModel", "Mock", "MockError", "describe_value", "mocks_applied", "not_run_message",
    "resolve_mocks",
]


class MockedModel(Protocol):
    """What mocks use of the model (`host.Host` has it; named here since the interleaver,
    which `host.py` names, imports this file)."""

    _module: torch.nn.Module

    def get(self, path: str) -> Any: ...

    def _before_run(self) -> None: ...


class MockError(TracingError):
    """A `mocks=` entry that cannot apply: an unknown path, a stand-in that cannot be called,
    a mock inside another one."""


class Mock(NamedTuple):
    """One checked entry of `mocks=`."""

    #: The path as the user wrote it (shown in messages and recorded in the job history).
    key: str
    #: The module's path from the model without aliases (`transformer.h.0.mlp`); it is looked
    #: up again when the mock is applied, since loading the weights may replace the modules.
    path: str
    #: The function or module called in the module's place.
    stand_in: Callable[..., Any]


MSG_MOCKS_NOT_A_DICT = (
    "mocks= takes a dict from module paths to stand-ins, got {kind}. For example:\n\n"
    "    with model.trace(prompt, mocks={{\"transformer.h.0.mlp\": stand_in}}):\n        ..."
)

MSG_UNKNOWN_MOCK_PATH = (
    "mocks= names `{key}`, which is not a module of this model{closest}. Write the path as "
    "`model.get(path)` takes it: dotted, from the model (aliases from `rename=` included), "
    "e.g. `mocks={{{example!r}: stand_in}}`; `print(model)` shows the modules."
)

MSG_BAD_STAND_IN = (
    "The stand-in for `{key}` is {kind}, which cannot run in the module's place. Pass a "
    "function that takes the module's inputs and returns its output, or a small "
    "torch.nn.Module called the same way:\n\n"
    "    def stand_in(hidden, *args, **kwargs):\n        return torch.zeros_like(hidden)\n\n"
    "    with model.trace(prompt, mocks={{{key!r}: stand_in}}):\n        ..."
)

MSG_MOCK_INSIDE_MOCK = (
    "mocks= names `{inner}`, which is {where} `{outer}`, also mocked: a stand-in replaces its "
    "module's whole computation, submodules included, so the one for `{inner}` would never "
    "run. Keep one of the two."
)

MSG_MOCK_THE_ROOT = (
    "mocks= names `{key}`, the whole model: a mock stands in for a module the model's forward "
    "calls, so there would be nothing left to trace. Mock the modules inside it, e.g. "
    "`mocks={{{example!r}: stand_in}}`."
)

MSG_BELOW_MOCK = (
    "`{path}.{what}` was requested, but {path} did not run: it is inside `{key}`, which this "
    "run mocks (`mocks={{{key!r}: ...}}`), and a stand-in replaces its module's whole "
    "computation, submodules included. Read the mocked module's own value "
    "(`{mocked}.output`), or mock the parts of `{key}` you want replaced instead of all of it, "
    "so that {path} runs."
)

#: Words of `MSG_BELOW_MOCK` that mark its text (an error's own, or inside a job's traceback).
_BELOW_MARK = "which this run mocks"

#: The note added to an error raised during a mocked run (its first line; each mock follows).
_NOTE_HEAD = (
    "This run used mocks. A mocked module's `.input`/`.output` are what its stand-in got and "
    "returned, and the model's code after it gets that output too: if the error comes from one, "
    "make the stand-in return what the real module returns (the same structure, shapes and dtype)."
)

#: id(module) -> (the mock's key, the mocked module's path) for every module below an applied
#: mock: the modules that will not run. Read by `not_run_message` when a body waited for one.
_BELOW: dict[int, tuple[str, str]] = {}


def resolve_mocks(model: MockedModel, mocks: Any) -> tuple[Mock, ...]:
    """Check `mocks=` against `model` and return it as `Mock`s (raises `MockError`)."""
    if not isinstance(mocks, Mapping):
        raise MockError(MSG_MOCKS_NOT_A_DICT.format(kind=type(mocks).__name__))
    resolved: list[Mock] = []
    for key, stand_in in mocks.items():
        key_text, path = _module_path(model, key)
        if isinstance(stand_in, type) or not callable(stand_in):
            # (A class is callable, but calling it builds an instance instead of an output.)
            kind = f"the class {stand_in.__name__}" if isinstance(stand_in, type) else f"of type {type(stand_in).__name__}"
            raise MockError(MSG_BAD_STAND_IN.format(key=key_text, kind=kind))
        resolved.append(Mock(key_text, path, stand_in))
    for outer in resolved:
        for inner in resolved:
            if inner is not outer and (inner.path == outer.path or inner.path.startswith(outer.path + ".")):
                where = "the same module as" if inner.path == outer.path else "inside"
                raise MockError(MSG_MOCK_INSIDE_MOCK.format(inner=inner.key, outer=outer.key, where=where))
    return tuple(resolved)


def _module_path(model: MockedModel, key: Any) -> tuple[str, str]:
    """(the key as text, the module's path from the model) for a `mocks=` key."""
    example = _example_path(model)
    has_model_child = "model" in model._module._modules  # (Llama's `model.layers`)
    if isinstance(getattr(key, "_module", None), torch.nn.Module) and not isinstance(key, str):
        key = text = str(key.path).removeprefix("model").removeprefix(".")  # an envoy: its path from the root
    elif isinstance(key, str):
        # `model.transformer.h.0` as the body spells it, unless `model` is a real child.
        text = key.removeprefix("model.") if not has_model_child else key
        if text == "model" and not has_model_child:
            text = ""
    else:
        raise MockError(MSG_MOCKS_NOT_A_DICT.format(kind=f"a dict with the key {key!r}"))
    if not text.strip("."):
        raise MockError(MSG_MOCK_THE_ROOT.format(key=key or "model", example=example))
    try:
        target = model.get(text)
    except (AttributeError, IndexError, KeyError, ValueError):
        target = None
    envoy_module = getattr(target, "_module", None) if target is not None else None
    if not isinstance(envoy_module, torch.nn.Module) or not str(getattr(target, "path", "")).startswith("model"):
        paths = [name for name, _ in model._module.named_modules() if name]
        close = difflib.get_close_matches(text, paths, n=3, cutoff=0.6)
        closest = (" (closest: " + ", ".join(f"`{p}`" for p in close) + ")") if close else ""
        raise MockError(MSG_UNKNOWN_MOCK_PATH.format(key=key, closest=closest, example=example))
    if envoy_module is model._module:
        raise MockError(MSG_MOCK_THE_ROOT.format(key=key, example=example))
    return text, str(target.path).removeprefix("model.")  # type: ignore[union-attr]


def _example_path(model: MockedModel) -> str:
    """A module path of this model to show in a message: the first three levels deep
    (`transformer.h.0`), else the deepest there is."""
    best = ""
    for name, _ in model._module.named_modules():
        if name.count(".") > best.count(".") or not best:
            best = name
        if name.count(".") >= 2:
            break
    return best or "layer"


class _Applied:
    """The mocks of one run, applied: what each replaced and what each stand-in returned."""

    def __init__(self) -> None:
        self.put_back: list[tuple[dict[str, Any], Any]] = []  # (module __dict__, its forward or _NONE)
        self.below: dict[int, Any] = {}  # `_BELOW`'s entries before this run (or _NONE)
        self.returned: dict[str, Any] = {}  # key -> the stand-in's last output
        self.called: dict[str, tuple[tuple, dict]] = {}  # key -> its last inputs (args, kwargs)

    def apply(self, mock: Mock, module: torch.nn.Module) -> None:
        d = module.__dict__
        self.put_back.append((d, d.get("forward", _NONE)))
        d["forward"] = self._forward(mock)
        below = (mock.key, f"model.{mock.path}")
        for sub in module.modules():
            if sub is not module:
                self.below.setdefault(id(sub), _BELOW.get(id(sub), _NONE))
                _BELOW[id(sub)] = below

    def _forward(self, mock: Mock) -> Callable[..., Any]:
        stand_in, key, returned, called = mock.stand_in, mock.key, self.returned, self.called

        def forward(*args: Any, **kwargs: Any) -> Any:
            called[key] = (args, kwargs)
            returned.pop(key, None)
            out = returned[key] = stand_in(*args, **kwargs)
            return out

        forward.__interlace_mock__ = key  # type: ignore[attr-defined]
        return forward

    def restore(self) -> None:
        for d, forward in reversed(self.put_back):
            if forward is _NONE:
                d.pop("forward", None)
            else:
                d["forward"] = forward
        self.put_back.clear()
        for idx, entry in self.below.items():
            if entry is _NONE:
                _BELOW.pop(idx, None)
            else:
                _BELOW[idx] = entry
        self.below.clear()

    def note(self, mocks: tuple[Mock, ...], error: BaseException) -> str:
        # (Nested mocked runs, a mocked session's mocked trace, add their lines to one note.)
        lines = [] if any(n.startswith(_NOTE_HEAD) for n in getattr(error, "__notes__", ())) else [_NOTE_HEAD]
        for mock in mocks:
            if mock.key in self.returned:
                lines.append(f"  `{mock.key}`: its stand-in returned {describe_value(self.returned[mock.key])}")
            elif mock.key in self.called:
                args, kwargs = self.called[mock.key]
                given = ", ".join([describe_value(a, 1) for a in args] + [f"{k}=..." for k in kwargs])
                lines.append(f"  `{mock.key}`: its stand-in raised, called as the module is: ({given})")
            else:
                lines.append(f"  `{mock.key}`: its stand-in had not run")
        return "\n".join(lines)


_NONE: Any = object()


@contextlib.contextmanager
def mocks_applied(model: MockedModel, mocks: tuple[Mock, ...], *, load: bool = True) -> Iterator[None]:
    """Run the block with `mocks` in place of their modules; put everything back afterwards.

    `load=False`: a run that uses the model's modules as they are, without its weights (a dry
    run on fake tensors), so the stand-ins go on those."""
    if not mocks:
        yield
        return
    if load:
        # A model whose weights are not loaded yet gets its modules here (LanguageModel's
        # dispatch may replace the tree): the stand-ins go on the modules that will run.
        model._before_run()
    applied = _Applied()
    try:
        for mock in mocks:
            applied.apply(mock, model.get(mock.path)._module)
        yield
    except Exception as error:
        # (A read below a mock already says so: `MSG_BELOW_MOCK`, here or in a job's text.)
        if not isinstance(error, MockError) and _BELOW_MARK not in str(error):
            error.add_note(applied.note(mocks, error))
        raise
    finally:
        applied.restore()


def not_run_message(module: torch.nn.Module, path: str, what: str) -> str | None:
    """Why a body's read of `module` never came, when a mock kept the module from running."""
    below = _BELOW.get(id(module))
    if below is None:
        return None
    key, mocked = below
    return MSG_BELOW_MOCK.format(path=path, what=what, key=key, mocked=mocked)


def describe_value(value: Any, depth: int = 0) -> str:
    """A short description of a module output's structure: `Tensor(1, 5, 128) float32`,
    `tuple(Tensor(1, 5, 128) float32, None)`."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)) and depth < 2:
        items = [describe_value(v, depth + 1) for v in value[:4]] + (["..."] if len(value) > 4 else [])
        return f"{type(value).__name__}(" + ", ".join(items) + ")"
    if isinstance(value, Mapping) and depth < 2:
        return f"{type(value).__name__}(" + ", ".join(f"{k}={describe_value(v, depth + 1)}" for k, v in list(value.items())[:4]) + ")"
    return "None" if value is None else type(value).__name__
