"""`Host`: the model object the engine runs beside, as the engine sees it.

Today the one host is `interlace.models.nnsight.NNsight` (and its subclasses such as
`LanguageModel`); the engine never imports it. It is the root of its envoy tree (an `Envoy`
itself), and a trace calls the hooks below on it: `models/` adapts how inputs are prepared,
batched and run, and the engine drives the run. `Host` is a `typing.Protocol`: NNsight
does not inherit from it, and nothing checks it at run time.

The raw `__dict__` handshake
----------------------------
For speed (these are read on every served value, with cold caches) the engine reads some of
the host's state from `host.__dict__` directly instead of through methods. The keys, what
they hold, and who reads (r) or writes (w) them besides the host itself, are listed in
`DICT_KEYS` below; the engine writes the string literals there, not these names, because a
constant costs a global lookup on the hot paths. A host must set every key that has no
default in `DICT_KEYS` in its `__init__` (NNsight does).

An optional hook, looked up on the host's class with `getattr`: `_envoy_class(module, path)
-> type[Envoy]`, the class of the envoy made for a descendant module (`envoy.make_envoy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    import torch

    from .interleaver import Interleaver
    from .mediator import Mediator

__all__ = ["DICT_KEYS", "EnvoyLike", "Host", "Prepared"]

#: One invoke's input after `Host._prepare_input`: (args, kwargs, batch size).
Prepared = tuple[tuple[Any, ...], dict[str, Any], int]

#: The keys of `host.__dict__` the engine reads or writes directly, and what they hold.
DICT_KEYS: Final[dict[str, str]] = {
    # -- the run ----------------------------------------------------------------------------------
    "_active": "the running Interleaver, the tracer of a one-read trace run with none, or None "
               "(w tracer.py, edit.py; r source.py)",
    "_no_lazy": "True once any module's `.source` is built: every run wraps every module "
                "(w source.py; default absent)",
    "_scanned": "what the last `model.scan(...)` saw: id(module) -> (module, (args, kwargs), "
                "output) (w scan.py; r envoy.py; default absent)",
    # -- the module index (built by `_module_index`) ------------------------------------------------
    "_index_map": "id(module) -> module index, or None until built (r envoy.py, reads.py; "
                  "envoy.py sets None when a module is attached)",
    "_modules_list": "the modules by index (r tracer.py, cache.py)",
    "_paths_list": "the modules' dotted paths by index (r tracer.py, source.py, envoy.py)",
    "_n_core": "how many leading indices belong to the wrapped module's own tree; the rest are "
               "extra modules such as `generator` (r source.py; default absent until indexed)",
    "_unstepped": "indices with one value per run (an extra module's root): step loops do not "
                  "apply (r envoy.py, reads.py; default absent until indexed)",
    # -- names ------------------------------------------------------------------------------------
    "_shadow": "names that may mean an alias or an extra module rather than the child of that "
               "name (r envoy.py, reads.py)",
    "_root_aliases": "alias -> dotted path mounted on the root (r reads.py, cache.py)",
    "_name_aliases": "alias -> real child name, anywhere in the tree (r cache.py)",
    "_extra_modules": "name -> module traced like a child but not part of the model "
                      "(`generator`) (r reads.py)",
    # -- edits ------------------------------------------------------------------------------------
    "_default_edits": "the `Edit`s of `model.edit()`, run before every trace's bodies (w, r edit.py)",
    "_edit_origin": "on a `model.edit()` copy: the model it copies (w edit.py; r source.py; "
                    "default absent)",
    "_before_run": "an instance override of the hook (w edit.py, scan.py; default absent)",
    "_begin_run": "an instance override of the hook (w edit.py; default absent)",
    "_end_run": "an instance override of the hook (w edit.py; default absent)",
}


class EnvoyLike(Protocol):
    """An envoy, as the host's hooks and `source.py` take and give one (`envoy.Envoy` is one)."""

    _module: torch.nn.Module
    _root: Host  # the envoy tree's root: the host (a host is its own root)

    @property
    def path(self) -> str:
        """The dotted path from the root, e.g. `model.transformer.h.0`."""
        ...

    @property
    def output(self) -> Any:
        """What the module returned, inside a trace."""
        ...

    def get(self, path: str) -> EnvoyLike:
        """The envoy at a dotted path below this one."""
        ...


class Host(EnvoyLike, Protocol):
    """The model object a trace runs: the root envoy, plus the hooks the engine calls."""

    __dict__: dict[str, Any]

    # -- preparing a run (tracer.py) -----------------------------------------------------------

    def _before_run(self) -> None:
        """Called before each local run (LanguageModel loads its weights here)."""
        ...

    def _has_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether `trace(...)` got an input (otherwise its kwargs are options for invokes)."""
        ...

    def _prepare_input(self, *args: Any, **kwargs: Any) -> Prepared:
        """Normalise one invoke's input into (args, kwargs, batch size)."""
        ...

    def _batch(self, prepared: list[Prepared]) -> Prepared:
        """Combine several invokes' prepared inputs into one batch."""
        ...

    def _trace_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Options given to a trace whose inputs come from invokes (they apply to the batch)."""
        ...

    def _edit_mediators(self, ns: dict[str, Any]) -> list[Mediator]:
        """One mediator per `model.edit()` edit, run before the trace's own bodies."""
        ...

    # -- running (tracer.py) --------------------------------------------------------------------

    def _runs_without_interleaver(self) -> bool:
        """Whether a one-read trace may run with no interleaver (`inline.run_one_read`)."""
        ...

    def _new_interleaver(self, mediators: list[Mediator], batch_size: int, steps: int | None,
                         kind: type[Interleaver] = ...) -> Interleaver:
        """A new interleaver (of class `kind`, `Interleaver` by default) for one run over this
        host's module index."""
        ...

    def _begin_run(self, interleaver: Interleaver) -> None:
        """Mark the host busy with `interleaver` and put its wrappers on the modules."""
        ...

    def _call_model(self, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any], interleaver: Interleaver | None) -> Any:
        """Run the model for a trace of `kind` (`"trace"`, `"generate"`, ...) on the batch."""
        ...

    def _end_run(self, interleaver: Interleaver) -> None:
        """Take the wrappers off, mark the host free, keep what the run taught (call order)."""
        ...

    def _result_envoy(self, kind: str) -> EnvoyLike:
        """The envoy whose `.output` is a trace's result (`tracer.output`)."""
        ...

    # -- the module index (envoy.py, cache.py, source.py, reads.py) -----------------------------

    def _module_index(self, module: torch.nn.Module) -> int:
        """The module's index, (re)building the index (`DICT_KEYS`) when it is not in it."""
        ...

    def _step_for(self, idx: int) -> int | None:
        """Call index to use for module `idx` (None: the invoke's step); written out in `Envoy.output`."""
        ...

    # -- the envoy tree (envoy.py) --------------------------------------------------------------

    def _alias_target(self, envoy: EnvoyLike, name: str) -> EnvoyLike | None:
        """The envoy an alias or extra module `name` on `envoy` stands for, else None."""
        ...

    def _tree_repr(self, envoy: EnvoyLike) -> str:
        """`repr(envoy)`: its module tree, with this host's aliases."""
        ...
