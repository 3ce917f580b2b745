"""The house rules, checked on every test run (each failure names the files to fix).

- The layers hold (import-linter, contracts in pyproject.toml `[tool.importlinter]`):
  cli/testing/remote > models > backends | server > execution > contract > tracing >
  errors | config | _version; backends and server never import each other; the engine
  (`interlace.tracing`) imports none of contract, execution, backends, server, models.
- No import circle between files, lazy imports (inside functions) and those under
  `if TYPE_CHECKING:` counted: a circle there still ties the two files together.
- No file over 600 lines.
- Every module declares `__all__`.
- No module imports another file's `_private` name.

The last four read the source with `ast` (nothing is imported), so they report every file at
once even while the package cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "interlace"

MAX_LINES = 600


# -- the import graph, from the source ------------------------------------------------------


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/interlace."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


@dataclass(frozen=True)
class Import:
    """One name one module imports from another module of the package."""

    source: str  # the importing module
    target: str  # the module the name is found in (a submodule when the name is one)
    name: str | None  # the imported name (None for `import a.b`, or when the name is the module)
    line: int


@dataclass
class Graph:
    imports: list[Import] = field(default_factory=list)

    def edges(self) -> dict[str, dict[str, int]]:
        """source -> {target: first line}; self-imports left out."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for imp in self.imports:
            if imp.target != imp.source:
                out[imp.source].setdefault(imp.target, imp.line)
        return out


def _resolve(dotted: str) -> str:
    """The longest prefix of `dotted` that is a module of the package ('' if none)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _import_graph() -> Graph:
    """Every import of a package module, wherever it stands (module level, inside a function,
    under `if TYPE_CHECKING:`). `from pkg import name` points at the submodule `pkg.name` when
    there is one, else at `pkg`."""
    graph = Graph()
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if origin != "interlace" and not origin.startswith("interlace."):
                    continue
                for alias in node.names:
                    submodule = f"{origin}.{alias.name}"
                    if submodule in MODULES:
                        graph.imports.append(Import(module, submodule, None, node.lineno))
                    else:
                        graph.imports.append(Import(module, _resolve(origin), alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "interlace" or alias.name.startswith("interlace."):
                        graph.imports.append(Import(module, _resolve(alias.name), None, node.lineno))
    return graph


def _strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; only the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(MODULES):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _shortest_cycle(start: str, members: set[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, {})):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [start]


def _file(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT))


# -- the rules ------------------------------------------------------------------------------


def test_import_linter_contracts_hold() -> None:
    """`lint-imports` (contracts in pyproject.toml); its report is the failure message."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())", "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    report = done.stdout + done.stderr
    # The banner is art; the contracts' report starts after it.
    report = report[report.find("Contracts"):] if "Contracts" in report else report
    assert done.returncode == 0, f"import-linter: a layer rule is broken\n\n{report}"


def test_import_linter_counts_lazy_and_type_checking_imports() -> None:
    """import-linter counts imports inside functions always, and those under `if TYPE_CHECKING:`
    unless told not to: it must not be told (an annotation that names an upper layer is an
    arrow pointing up)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config.get("exclude_type_checking_imports", False) is False
    assert {c["id"] for c in config["contracts"]} >= {"layers", "engine-alone"}


def test_no_import_circle_between_files() -> None:
    edges = _import_graph().edges()
    circles = _strongly_connected(edges)
    lines = []
    for members in circles:
        inside = set(members)
        lines.append(f"{len(members)} modules tied together: {', '.join(members)}")
        shown: set[frozenset[str]] = set()
        for member in members:  # the shortest circle through each, once
            cycle = _shortest_cycle(member, inside, edges)
            if frozenset(cycle) not in shown:
                shown.add(frozenset(cycle))
                lines.append("  circle: " + " -> ".join(cycle))
        lines.append("  imports inside it:")
        for source in members:
            for target, line in sorted(edges.get(source, {}).items()):
                if target in inside:
                    lines.append(f"    {_file(source)}:{line} imports {target}")
    assert not circles, "import circles (lazy and TYPE_CHECKING imports counted):\n" + "\n".join(lines)


def test_no_file_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for path in sorted(PACKAGE.rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(f"{f}: {n}" for f, n in long.items())


def _declares_all(tree: ast.Module) -> bool:
    """`__all__ = [...]` (or annotated) at module level, possibly inside a top-level if/try."""
    body = list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "__all__":
            return True
        if isinstance(node, (ast.If, ast.Try)):
            body += node.body + node.orelse + getattr(node, "finalbody", [])
            body += [n for handler in getattr(node, "handlers", []) for n in handler.body]
    return False


def test_every_module_declares_all() -> None:
    missing = [
        _file(module)
        for module, path in MODULES.items()
        if not _declares_all(ast.parse(path.read_text(), str(path)))
    ]
    assert not missing, "modules without `__all__`:\n" + "\n".join(missing)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_imported_across_files() -> None:
    """`from .x import _name` ties a file to another's internals; make the name public (and
    list it in `__all__`) or move the code that needs it. Private *modules* (`_version`) are
    files, not names, and may be imported."""
    found = [
        f"{_file(imp.source)}:{imp.line} imports {imp.name} from {imp.target}"
        for imp in _import_graph().imports
        if imp.name is not None and _is_private(imp.name) and imp.target != imp.source
    ]
    assert not found, "private names imported from another file:\n" + "\n".join(found)
