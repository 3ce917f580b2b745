"""API keys: creation, verification, revocation.

A key looks like `il_<key id>_<secret>`. Only a salted SHA-256 of the secret is stored, so a
copy of the database does not give anyone a usable key; the key id in the clear lets the
server find the row without trying every hash. The key's name is the *user*: jobs belong to
the name, so a user with a new key (same --name) still sees their earlier jobs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final

from ..contract.http import KEY_HEADER
from .db import Database

__all__ = ["KEY_PREFIX", "KeyInfo", "User", "KeyStore", "MSG_MISSING_KEY", "MSG_INVALID_KEY"]

KEY_PREFIX = "il_"
CREATE_HINT = "Create a key on the server machine with `interlace keys create --name YOUR_NAME`"

MSG_MISSING_KEY: Final = (
    f"This endpoint needs an API key in the {KEY_HEADER} header. {CREATE_HINT}, then set it on the "
    "client with INTERLACE_API_KEY=<key> or interlace.CONFIG.set_default_api_key('<key>')."
)
MSG_INVALID_KEY: Final = f"The API key in the {KEY_HEADER} header is unknown or revoked. {CREATE_HINT} and use the new key."


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    created: float
    revoked: float | None


@dataclass(frozen=True)
class User:
    name: str
    key_id: str


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str | None = None) -> tuple[str, KeyInfo]:
        """Make a new key; returns (the full key, shown once; its info)."""
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        owner = name or f"user-{key_id}"
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, salt, hash, created) VALUES (?, ?, ?, ?, ?)",
                (key_id, owner, salt, _digest(salt, secret), now),
            )
        return f"{KEY_PREFIX}{key_id}_{secret}", KeyInfo(key_id, owner, now, None)

    def list_keys(self) -> list[KeyInfo]:
        rows = self.db.query("SELECT id, name, created, revoked FROM api_keys ORDER BY created")
        return [KeyInfo(r["id"], r["name"], r["created"], r["revoked"]) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
            )
            return cur.rowcount > 0

    def count_active(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL")
        return int(row[0]) if row else 0

    def verify(self, key: str | None) -> User | None:
        """The key's user, or None for a missing, malformed, unknown or revoked key.

        Looked up on every request (no cache) so that `interlace keys revoke` takes effect
        at once; it is one indexed read and one hash.
        """
        if not key or not key.startswith(KEY_PREFIX):
            return None
        key_id, sep, secret = key[len(KEY_PREFIX):].partition("_")
        if not sep or not secret:
            return None
        row = self.db.query_one("SELECT name, salt, hash, revoked FROM api_keys WHERE id = ?", (key_id,))
        if row is None or row["revoked"] is not None:
            return None
        if not hmac.compare_digest(_digest(row["salt"], secret), row["hash"]):
            return None
        return User(name=row["name"], key_id=key_id)
