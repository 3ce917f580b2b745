"""The package's public surface: `interlace.__all__` declares exactly what the top level defines,
and each package face (`interlace.tracing`, `.contract`, ...) declares a `__all__` it keeps.

Other parts of the project add names over time; this test does not pin the full list. It
checks that nothing public is undeclared (a leak) and nothing declared is missing, plus the
core engine names that must always be there.
"""

from __future__ import annotations

import importlib
import types

import pytest

import interlace

# Names the tracing engine guarantees; others may be added next to them.
CORE = {
    "__version__",
    "NNsight",
    "LanguageModel",
    "Envoy",
    "save",
    "InterlaceError",
    "TracingError",
    "MissedProviderError",
    "OutOfOrderError",
    "ModuleNotCalledError",
    "SourceNotFoundError",
}


def _declared() -> set[str]:
    return {n for n in interlace.__all__ if not (n.startswith("__") and n.endswith("__"))}


def _public_top_level() -> set[str]:
    """Non-underscore names bound in the package namespace. Submodules count only when they
    are declared (Python binds every imported submodule as an attribute; `interlace.remote`
    is a submodule made callable on purpose and declared)."""
    declared = _declared()
    return {
        name
        for name, value in vars(interlace).items()
        if not name.startswith("_") and (not isinstance(value, types.ModuleType) or name in declared)
    }


def test_all_has_no_duplicates() -> None:
    assert len(interlace.__all__) == len(set(interlace.__all__))


def test_all_equals_the_public_top_level_names() -> None:
    declared = _declared()
    public = _public_top_level()
    assert public - declared == set(), "public but not in __all__"
    assert declared - public == set(), "in __all__ but not defined"


def test_every_declared_name_resolves() -> None:
    for name in interlace.__all__:
        value = getattr(interlace, name)
        assert value is not None, name
        if isinstance(value, types.ModuleType):  # only a module that is itself the API (callable)
            assert callable(value), f"interlace.{name} is a plain submodule, not the declared object"


def test_core_engine_names_are_declared() -> None:
    assert CORE <= set(interlace.__all__)
    assert isinstance(interlace.__version__, str) and interlace.__version__


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from interlace import *", ns)
    ns.pop("__builtins__", None)
    assert set(ns) == set(interlace.__all__)


def test_error_hierarchy() -> None:
    assert issubclass(interlace.TracingError, interlace.InterlaceError)
    assert issubclass(interlace.SourceNotFoundError, interlace.TracingError)
    assert issubclass(interlace.OutOfOrderError, interlace.MissedProviderError)
    assert issubclass(interlace.ModuleNotCalledError, interlace.MissedProviderError)
    assert issubclass(interlace.MissedProviderError, interlace.InterlaceError)
    assert issubclass(interlace.LanguageModel, interlace.NNsight)
    assert issubclass(interlace.NNsight, interlace.Envoy)


# -- the package faces ----------------------------------------------------------------------

#: Each package's `__init__.py` is its face: `__all__` lists what other layers may use.
FACES = [
    "interlace.tracing",
    "interlace.contract",
    "interlace.execution",
    "interlace.backends",
    "interlace.server",
    "interlace.models",
]


@pytest.mark.parametrize("face", FACES)
def test_package_face_declares_all(face: str) -> None:
    module = importlib.import_module(face)
    declared = getattr(module, "__all__", None)
    assert isinstance(declared, (list, tuple)), f"{face} has no `__all__` (its face: what other layers may use)"
    assert all(isinstance(name, str) for name in declared), f"{face}.__all__ holds a non-string"
    duplicates = sorted({name for name in declared if list(declared).count(name) > 1})
    assert not duplicates, f"{face}.__all__ lists twice: {duplicates}"
    missing = [name for name in declared if not hasattr(module, name)]
    assert not missing, f"{face}.__all__ lists names it does not define: {missing}"


def test_hybrid_execution_names() -> None:
    """`interlace.local()`, `@interlace.trace` and `interlace.list()` (local blocks). `list` is
    reached by name only: in `__all__`, a star import would shadow the built-in `list`."""
    assert {"local", "trace"} <= set(interlace.__all__)
    assert "list" not in interlace.__all__ and "list" in dir(interlace)
    from interlace import list as interlace_list

    assert interlace_list is interlace.list and issubclass(interlace.list, list) and interlace.list is not list
    assert interlace.list().append(1) == [1]


def test_jobs_is_the_job_history() -> None:
    """`interlace.jobs` is an object (the history API), not the `backends.history` module."""
    from interlace.backends.history import JobHistory

    assert isinstance(interlace.jobs, JobHistory) and "jobs" in interlace.__all__
    for name in ("list", "show", "rerun", "diff", "prune"):
        assert callable(getattr(interlace.jobs, name)), name
