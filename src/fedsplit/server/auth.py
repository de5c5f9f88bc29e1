"""Per-client bearer tokens. The file holds ``client_id sha256(token)`` per line, never the token."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Maps a presented token to its client id."""

    def __init__(self, entries: dict[str, str]) -> None:
        self._by_hash = {h: client for client, h in entries.items()}

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        entries = {}
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[1]) != 64:
                raise ValueError(f"{path}:{lineno}: expected 'client_id sha256hex'")
            entries[parts[0]] = parts[1]
        return cls(entries)

    @property
    def clients(self) -> set[str]:
        """The client ids that hold a token."""
        return set(self._by_hash.values())

    def client_for(self, token: str | None) -> str | None:
        if not token:
            return None
        digest = hash_token(token)
        for known, client in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return client
        return None


def add_token(path: str | Path, client_id: str) -> str:
    """Create a token for ``client_id``, append its hash to ``path``, return the token (shown once)."""
    if not client_id or any(c.isspace() for c in client_id):
        raise ValueError("client id must be a non-empty word without spaces")
    path = Path(path)
    existing = TokenStore.load(path).clients if path.exists() else set()
    if client_id in existing:
        raise ValueError(f"client {client_id!r} already has a token in {path}")
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{client_id} {hash_token(token)}\n")
    os.chmod(path, 0o600)
    return token


def bearer(metadata) -> str | None:
    """The token from ``authorization: Bearer <token>`` call metadata."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None
