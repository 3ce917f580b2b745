"""The contract: one function that lists every problem of a request under a server policy.

The client runs it before sending (after encoding, which adds problems only the client can
see, such as a variable that cannot be encoded), the simulator runs it, and the server runs
it on receipt. Same input, same problems, same messages.
"""

from __future__ import annotations

from typing import Any, Final, Iterator

from .codecheck import check_source
from .policy import Policy, module_category
from .problems import Problem, unique
from .request import TraceRequest

__all__ = ["FIX_TOO_LARGE", "upload_too_large", "validate_request"]

#: How to send less, shown with a too-large request wherever it is caught.
FIX_TOO_LARGE: Final = (
    "# send less: compute large tensors on the server inside the trace,\n"
    "# or save only what you need (e.g. h[:, -1].save() instead of h.save())"
)


def upload_too_large(size: int, policy: Policy) -> str | None:
    """The one check of the upload limit: the problem with a request of `size` bytes, if any.

    The client and the simulation see it as a problem of `validate_request`; a server that
    receives such bytes answers 413 with the same text (`execution.receive`). The decoder and
    the HTTP reader also stop reading at this many bytes, so nothing larger is ever held."""
    if size <= policy.max_upload_bytes:
        return None
    return f"the request is {size / 1e6:.1f} MB; the server accepts at most {policy.max_upload_bytes / 1e6:.1f} MB"


def validate_request(request: TraceRequest, policy: Policy, *, payload_size: int | None = None) -> list[Problem]:
    block = request.block
    problems: list[Problem] = []
    too_large = None if payload_size is None else upload_too_large(payload_size, policy)
    if too_large is not None:
        problems.append(Problem(
            category="payload-too-large", filename=block.filename, lineno=block.first_lineno,
            message=too_large, fix=FIX_TOO_LARGE,
        ))
    sources = [(block.source, block.filename, block.first_lineno, "the traced block")]
    for spec in request.objects.values():
        entry = spec.model_dump()
        source = entry.get("source")
        if isinstance(source, str) and source:
            sources.append((source, str(entry.get("filename", "<unknown>")), int(entry.get("lineno", 1) or 1), f"`{entry.get('name')}`"))
        if policy.strict_remote or request.strict_remote:
            if not entry.get("decorated") and entry.get("kind") in ("function", "class"):
                kind = entry["kind"]
                problems.append(Problem(
                    category=f"undecorated-{kind}", filename=str(entry.get("filename", "<unknown>")), lineno=int(entry.get("lineno", 0) or 0),
                    message=f"`{entry.get('name')}` is not decorated with @interlace.remote (strict_remote=True)",
                    fix=f"from interlace import remote\n\n@remote\n{'class' if kind == 'class' else 'def'} {entry.get('name')}...",
                ))
    total_source = sum(len(s[0]) for s in sources)
    if total_source > policy.max_source_bytes:
        problems.append(Problem(category="payload-too-large", filename=block.filename, lineno=block.first_lineno,
                                message=f"{total_source} bytes of source; the server accepts at most {policy.max_source_bytes}"))
    shipped = list(request.variables) + list(request.model_refs)
    for source, filename, lineno, what in sources:
        problems.extend(check_source(source, filename, lineno, policy, shipped=shipped, what=what))
    objects = [o.model_dump() for o in request.objects.values()]
    for node in _nodes([request.variables, request.args, request.kwargs, objects]):
        tag = node.get("$t")
        name = node.get("name") if tag == "x:module" else node.get("module") if tag == "x:ref" else None
        if isinstance(name, str) and name != "builtins" and not policy.allows_module(name):
            problems.append(Problem(
                category=module_category(name), filename=block.filename, lineno=block.first_lineno,
                message=f"module `{name}` is not available on the server",
                fix="# compute the value before the trace and pass it in, or use a module\n# the server provides (run `interlace env` to list them)",
            ))
    return unique(problems)


def _nodes(value: Any) -> Iterator[dict[str, Any]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "$t" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
