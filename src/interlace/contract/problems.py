"""Problems found in a request: each names the user's line, a category and the fix as code."""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict

from ..errors import InterlaceError

__all__ = ["Problem", "RemoteValidationError", "CATEGORIES", "unique", "first_line"]

#: Every category the validator can report, with a one-line meaning (shown by `interlace env`).
CATEGORIES = {
    "unserializable-variable": "a variable the body uses cannot be sent to the server",
    "module-not-allowed": "a module that the server does not provide",
    "lambda-capture": "a lambda captures something that cannot be sent",
    "undecorated-function": "strict_remote requires @interlace.remote on user functions",
    "undecorated-class": "strict_remote requires @interlace.remote on user classes",
    "source-unavailable": "a user function or class whose source code cannot be read",
    "file-io": "shipped code touches files",
    "network": "shipped code touches the network",
    "subprocess": "shipped code starts processes or reaches the interpreter",
    "forbidden-builtin": "shipped code calls eval, exec, open, __import__ or similar",
    "forbidden-attribute": "shipped code reaches interpreter internals (frames, globals, subclasses)",
    "payload-too-large": "the request is larger than the server accepts",
    "unserializable-input": "the trace's inputs cannot be sent",
    "unserializable-result": "a saved value cannot be sent back",
    "unknown-model": "the server does not host this model",
    "invalid-request": "the request itself is malformed or from an incompatible version",
    "class-base-not-allowed": "a shipped class derives from a class that cannot be sent",
    "local-only-function": "an @interlace.trace function used outside `with interlace.local():`",
}


class Problem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str
    message: str
    filename: str = "<unknown>"
    lineno: int = 0
    fix: str = ""

    def render(self, number: int | None = None) -> str:
        head = f"{number}. " if number is not None else ""
        where = f"{self.filename}:{self.lineno}" if self.lineno else self.filename
        text = f"{head}{where} [{self.category}] {self.message}"
        if self.fix:
            fix = "\n".join("        " + line for line in self.fix.strip("\n").splitlines())
            text += f"\n     fix:\n{fix}"
        return text


def unique(problems: Iterable[Problem]) -> list[Problem]:
    """The problems in order, each once (a Problem is frozen, so equal ones hash alike)."""
    return list(dict.fromkeys(problems))


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for a one-line problem description."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RemoteValidationError(InterlaceError):
    """The request would be rejected by the server. `.problems` lists every problem found."""

    def __init__(self, problems: Iterable[Problem | dict[str, Any]], *, subject: str | None = None) -> None:
        """`subject` names what cannot be sent when it is not a trace, e.g. "`f`" for a
        function checked by `@interlace.remote` at decoration time."""
        self.problems = [p if isinstance(p, Problem) else Problem(**p) for p in problems]
        self.subject = subject
        count = len(self.problems)
        counted = f"{count} problem{'s' if count != 1 else ''}"
        head = f"{subject} cannot be sent to a server ({counted}):" if subject else f"This trace cannot run remotely ({counted}):"
        lines = [head]
        lines += ["  " + p.render(i + 1) for i, p in enumerate(self.problems)]
        super().__init__("\n".join(lines))

    @property
    def categories(self) -> list[str]:
        return [p.category for p in self.problems]
