"""Every Python block of the user docs runs as written, in order, one namespace per page.

A block may start with `# raises: Name` (a class from `interlace`, or a builtin): the block must
raise it. A block after a line `<!-- not run: why -->` is skipped (say why in the comment).
The pages use the built-in demo model and `remote=True` against a real server hosting it.
"""

from __future__ import annotations

import builtins
import re
import sys
import types
from pathlib import Path

import pytest

import interlace

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ["guide.md", "from-nnsight.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = "<!-- not run:"


def blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each Python block that runs."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        if before and before[-1].startswith(NOT_RUN):
            continue
        found.append((text[: match.start(1)].count("\n") + 1, match.group(1)))
    return found


def expected_error(code: str) -> type[BaseException] | None:
    first = code.lstrip().splitlines()[0]
    if not first.startswith("# raises:"):
        return None
    name = first.split(":", 1)[1].strip()
    return getattr(interlace, name, None) or getattr(builtins, name)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, monkeypatch_module):
    """A real server on its embedded default: the built-in demo model, as `interlace serve`."""
    from interlace.testing import ServerProcess

    cache = tmp_path_factory.mktemp("docs-cache")
    monkeypatch_module.setenv("INTERLACE_CACHE_DIR", str(cache))
    monkeypatch_module.setenv("INTERLACE_CONFIG_DIR", str(tmp_path_factory.mktemp("docs-config")))
    with ServerProcess(tmp_path_factory.mktemp("docs-server"), fake=False) as proc:
        monkeypatch_module.setattr(interlace.CONFIG.API, "HOST", proc.url)
        monkeypatch_module.setattr(interlace.CONFIG.API, "APIKEY", proc.create_key("docs"))
        monkeypatch_module.setattr(interlace.CONFIG.APP, "REMOTE_LOGGING", False)
        yield proc


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(page, demo_server, tmp_path):
    path = DOCS / page
    found = blocks(path)
    assert found, f"{page} has no Python blocks"
    # One real file holds every block at its own line of the page (prose blanked out), and one
    # module runs them in order: tracebacks, captured `with` blocks and `inspect.getsource`
    # of a class defined in an earlier block all see the page's own lines.
    lines = [""] * (path.read_text().count("\n") + 1)
    for lineno, code in found:
        for offset, line in enumerate(code.splitlines()):
            lines[lineno - 1 + offset] = line
    file = tmp_path / f"{path.stem.replace('-', '_')}.py"
    file.write_text("\n".join(lines) + "\n")
    module = types.ModuleType(f"docs_{file.stem}")
    module.__file__ = str(file)
    sys.modules[module.__name__] = module
    try:
        for lineno, code in found:
            compiled = compile("\n" * (lineno - 1) + code, str(file), "exec")
            error = expected_error(code)
            where = f"{page}:{lineno}"
            if error is None:
                try:
                    exec(compiled, module.__dict__)
                except Exception as exc:  # report the page's line, not the harness's
                    pytest.fail(f"the block at {where} raised {type(exc).__name__}: {exc}")
            else:
                with pytest.raises(error):
                    exec(compiled, module.__dict__)
    finally:
        del sys.modules[module.__name__]
