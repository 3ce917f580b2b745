"""Trace options, split once: those the client consumes and those that travel to the server.

`model.trace(x, remote=..., **options)` mixes two kinds of keyword arguments:

- client-side options (`CLIENT_OPTIONS`) say how to run the trace (wait or not, which server,
  how loud); each is taken by the modes listed with it and never leaves the client;
- everything else is a server-side option: what the model's own `trace`/`generate` call takes
  (`max_new_tokens=`, `attention_mask=`, ...). Only these travel, in the request's `kwargs`.

The client splits them here (`split_client_options`), and the server checks what arrives with
the same function (`forbidden_server_option`), so an option the client refuses up front and
one the server refuses say the same thing, and a client option can never reach the hosted
model's `trace` call (where `max_upload_mb=` once surfaced as an internal server error).
"""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import InterlaceError

__all__ = ["CLIENT_OPTIONS", "MSG_DRY_RUN_LOCAL_ONLY", "MSG_MOCKS_NOT_REMOTE", "TraceOptionError", "split_client_options", "forbidden_server_option", "mode_name"]

#: Every client-side option, with the `remote=` values that take it.
CLIENT_OPTIONS: dict[str, tuple[Any, ...]] = {
    "verbose": ("local", True),
    "strict_remote": ("local", True),
    "max_upload_mb": ("local", True),
    "isolate": ("local",),
    "blocking": (True,),
    "callback": (True,),
    "host": (True,),
    "api_key": (True,),
    # Stand-ins run in this process only: a mocked run never goes to a server (see MSG_MOCKS_NOT_REMOTE).
    "mocks": (False, "local"),
    # Fake tensors through the simulation's path (`backends/dry_run.py`); see MSG_DRY_RUN_LOCAL_ONLY.
    "dry_run": ("local",),
}

#: Why `mocks=` is refused with `remote=True`, after the usual text of `option_message`.
MSG_MOCKS_NOT_REMOTE = (
    "A mocked run never goes to a server: the stand-ins are code in this process, so a server "
    "would run the real modules and the results would not be the ones you tested. Try the "
    "logic with `remote='local'` (the server's whole path, in this process, stand-ins "
    "included), then drop `mocks=` to run the real model with `remote=True`."
)

#: Why `dry_run=` is refused with `remote=False` and `remote=True`, after `option_message`'s text.
MSG_DRY_RUN_LOCAL_ONLY = (
    "A dry run checks a trace for a model whose weights you do not have (shapes, order of access, "
    "what can be sent, the server's policy, the result's size) by running the server's path here "
    "on fake tensors, so it is a kind of `remote='local'` run; with remote=True the server would "
    "compute for real, and with remote=False nothing is checked against a server."
)

#: An option's reason, added to its refusal (`option_message`).
_WHY_REFUSED = {"mocks": MSG_MOCKS_NOT_REMOTE, "dry_run": MSG_DRY_RUN_LOCAL_ONLY}

#: Arguments of `model.trace` itself; a request that carries them as model options is forged
#: or from a broken client (`remote=True` on the server would submit a job from the server).
_TRACE_ARGUMENTS = ("remote", "backend")

_EXAMPLE_VALUES = {
    "verbose": "True", "strict_remote": "True", "max_upload_mb": "50", "isolate": "True", "blocking": "False",
    "callback": '"https://example.org/hook"', "host": '"https://my-server:8000"', "api_key": '"..."',
    "mocks": '{"transformer.h.0.mlp": stand_in}',
    "dry_run": "True",
}


class TraceOptionError(InterlaceError, TypeError):
    """A keyword argument of `trace`/`generate`/`session` that this mode does not take.

    A TypeError, as Python raises for an unexpected keyword argument; the message names the
    option, the modes that take it, and the fix.
    """


def mode_name(remote: Any) -> str:
    return f"remote={remote!r}"


def _modes_text(modes: Iterable[Any]) -> str:
    names = [mode_name(m) for m in modes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def option_message(name: str, remote: Any) -> str:
    """Why `remote`'s mode does not take client option `name`, and how to write it instead."""
    modes = CLIENT_OPTIONS[name]
    example = f"model.trace(x, {mode_name(modes[0])}, {name}={_EXAMPLE_VALUES[name]})"
    why = _WHY_REFUSED.get(name)
    return (
        f"`{name}=` applies only with {_modes_text(modes)}, not with {mode_name(remote)}. "
        f"Remove it, or run in a mode that takes it: `{example}`." + (f" {why}" if why else "")
    )


def split_client_options(kwargs: dict[str, Any], remote: Any) -> dict[str, Any]:
    """Pop the client-side options from `kwargs` and return them; what stays is server-side.

    Raises TraceOptionError for a client option that `remote`'s mode does not take (all of
    them are listed in the message) and for a server-side name that must never travel.
    """
    taken: dict[str, Any] = {}
    refused: list[str] = []
    for name in list(kwargs):
        modes = CLIENT_OPTIONS.get(name)
        if modes is None:
            continue
        if remote in modes:
            taken[name] = kwargs.pop(name)
        else:
            refused.append(name)
    if refused:
        raise TraceOptionError(" ".join(option_message(name, remote) for name in refused))
    if remote not in (False, None):
        for name in kwargs:
            message = forbidden_server_option(name)
            if message is not None:
                raise TraceOptionError(message)
    return taken


def forbidden_server_option(name: str) -> str | None:
    """The message for a server-side option name that may not reach the hosted model's call,
    or None when it may (unknown model options go on: the model's own call judges them)."""
    if name in CLIENT_OPTIONS:
        return (
            f"`{name}=` is a client option ({_modes_text(CLIENT_OPTIONS[name])}) and is never sent "
            "to a server; this request came from a client that sent it. Use the same Interlace "
            "version on client and server (`interlace env` shows both)."
        )
    if name in _TRACE_ARGUMENTS:
        return (
            f"`{name}=` chooses where a trace runs and cannot be a model option; on the server "
            "every trace runs on the hosted model. Remove it from the request's options."
        )
    if not name.isidentifier() or (name.startswith("__") and name.endswith("__")):
        return (
            f"`{name}` is not a valid trace option: names of the form `__name__` are reserved "
            "for Interlace. Pass only the model's own keyword arguments, e.g. "
            "`model.generate(x, remote=True, max_new_tokens=5)`."
        )
    return None
