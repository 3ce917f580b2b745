"""The status page: one HTML file (`status.html`, package data) served at `GET /status` and `/`.

The page holds no data: it asks for an API key, reads `GET /v1/status` with it and follows
each unfinished job's event stream (see the page's script). Here it gets the protocol's names
from `contract/http.py` (so the page cannot drift from the server) and a Content-Security-Policy
that lets only its own inline script and style run, and lets them talk only to this server:
a value that slipped into the page as markup still could not run or send anything elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import lru_cache
from importlib import resources

from fastapi.responses import HTMLResponse

from ..contract.http import (
    AFTER_QUERY,
    JOB_EVENTS,
    KEY_HEADER,
    STATUS,
    TERMINAL,
    WS_AUTH_FIELDS,
)

__all__ = ["PAGE_FILE", "page_html", "page_response"]

PAGE_FILE = "status.html"
_PLACEHOLDER = "__PROTOCOL__"


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page, with the protocol's names in place of `__PROTOCOL__`."""
    template = resources.files(__package__).joinpath(PAGE_FILE).read_text(encoding="utf-8")
    protocol = {
        # Relative paths: the page works behind a proxy that serves the server under a prefix.
        "status": STATUS.lstrip("/"),
        "events": JOB_EVENTS.lstrip("/"),
        "afterQuery": AFTER_QUERY,
        "keyHeader": KEY_HEADER,
        "wsKeyField": WS_AUTH_FIELDS[0],
        "terminal": sorted(status.value for status in TERMINAL),
    }
    if template.count(_PLACEHOLDER) != 1:
        raise RuntimeError(f"{PAGE_FILE} must hold {_PLACEHOLDER} once, where its script reads the protocol")
    return template.replace(_PLACEHOLDER, json.dumps(protocol))


@lru_cache(maxsize=1)
def _security_policy() -> str:
    html = page_html()
    hashes = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        hashes[tag] = " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'" for block in blocks
        )
    return (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_response() -> HTMLResponse:
    """The page, never cached (a new server version serves a new page)."""
    return HTMLResponse(page_html(), headers={
        "Content-Security-Policy": _security_policy(),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    })
