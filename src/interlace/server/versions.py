"""Which client versions this server accepts (the client sends `contract.http.VERSION_HEADER`).

A client is accepted when its major version equals the server's. The rule is deliberately
simple so the 426 message can state the range exactly.
"""

from __future__ import annotations

import re
from typing import Final

from .._version import __version__
from ..contract.http import VERSION_HEADER

__all__ = ["parse", "supported_range", "incompatibility", "MSG_UNREADABLE_VERSION", "MSG_UNSUPPORTED_VERSION"]

_VERSION = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")

MSG_UNREADABLE_VERSION: Final = (
    "Unreadable {header} {client_version!r}; send the client's version, e.g. {server_version!r}. "
    "This server (interlace {server_version}) accepts clients {wanted}."
)
MSG_UNSUPPORTED_VERSION: Final = (
    "Client version {client_version} is not supported by this server (interlace {server_version}), "
    "which accepts clients {wanted}. Install a matching client: pip install 'interlace{wanted}'."
)


def parse(version: str) -> tuple[int, int, int] | None:
    match = _VERSION.match(version)
    if not match:
        return None
    major, minor, patch = (int(g) if g else 0 for g in match.groups())
    return major, minor, patch


def supported_range(server_version: str = __version__) -> str:
    parsed = parse(server_version)
    major = parsed[0] if parsed else 0
    return f">={major}.0.0,<{major + 1}.0.0"


def incompatibility(client_version: str | None, server_version: str = __version__) -> str | None:
    """None if compatible (or not sent: curl and other tools may omit it), else the message."""
    if client_version is None or client_version == "":
        return None
    client = parse(client_version)
    server = parse(server_version)
    wanted = supported_range(server_version)
    if client is None:
        return MSG_UNREADABLE_VERSION.format(header=VERSION_HEADER, client_version=client_version,
                                             server_version=server_version, wanted=wanted)
    if server is not None and client[0] != server[0]:
        return MSG_UNSUPPORTED_VERSION.format(client_version=client_version, server_version=server_version,
                                              wanted=wanted)
    return None
