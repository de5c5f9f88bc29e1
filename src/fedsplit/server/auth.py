"""Who is calling: per-client bearer tokens, or client certificates under mutual TLS.

The token file holds ``client_id sha256(token)`` per line, never the token. A running server
re-reads it when it changes (:meth:`TokenStore.refresh`), so ``fedsplit token revoke`` takes
effect without a restart. Under mutual TLS (``serve --tls-client-ca``) a client's id is the
common name of its certificate; with a token file as well, the token must be the same client's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# What a client id may be: it names sessions, audit records and checkpoint directories.
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read_entries(path: Path) -> dict[str, str]:
    """``{client_id: sha256 hex}`` from a token file; ValueError names a bad line."""
    entries = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) != 64:
            raise ValueError(f"{path}:{lineno}: expected 'client_id sha256hex'")
        entries[parts[0]] = parts[1]
    return entries


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten, replaced or appended to; None when it is gone (or unreadable)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class TokenStore:
    """Maps a presented token to its client id; one loaded from a file follows the file's changes."""

    def __init__(
        self,
        entries: dict[str, str],
        path: str | Path | None = None,
        seen: tuple[int, int, int] | None = None,
    ) -> None:
        self._by_hash = {h: client for client, h in entries.items()}
        self.path = Path(path) if path is not None else None
        # The file's signature when ``entries`` were read (default: now).
        self._seen = seen if seen is not None else (_signature(self.path) if self.path is not None else None)
        #: Bumped at each re-read, so a caller checked against an older one is checked again.
        self.generation = 0

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        seen = _signature(path)  # before reading: a change made while reading is seen next time
        return cls(_read_entries(path), path, seen)

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read (one ``stat``); True when it did.

        A file that is gone or unreadable accepts no client until it is fixed (fail closed), with
        a warning: a mistyped manual edit must not leave a revoked token working.
        """
        if self.path is None:
            return False
        seen = _signature(self.path)
        if seen == self._seen:
            return False
        self._seen = seen
        entries: dict[str, str] = {}
        if seen is None:
            log.warning("token file %s is gone: no client is accepted until it is back", self.path)
        else:
            try:
                entries = _read_entries(self.path)
            except (OSError, ValueError) as exc:
                log.warning("token file unreadable (%s): no client is accepted until it is fixed", exc)
        self._by_hash = {h: client for client, h in entries.items()}
        self.generation += 1
        log.info("token file %s re-read: %d client(s)", self.path, len(self._by_hash))
        return True

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


def check_client_id(client_id: str) -> None:
    """ValueError unless ``client_id`` is a plain name: letters, digits and ``._@+-``, up to 128."""
    if not _CLIENT_ID.fullmatch(client_id or ""):
        raise ValueError(
            f"client id {client_id!r} must be 1-128 letters, digits or ._@+- and start with a letter or digit"
        )


def add_token(path: str | Path, client_id: str) -> str:
    """Create a token for ``client_id``, add its hash to ``path``, return the token (shown once).

    The file is replaced atomically, like :func:`revoke_token`'s, so a running server never reads half a line.
    """
    if not client_id or any(c.isspace() for c in client_id):
        raise ValueError("client id must be a non-empty word without spaces")
    path = Path(path)
    existing = TokenStore.load(path).clients if path.exists() else set()
    if client_id in existing:
        raise ValueError(f"client {client_id!r} already has a token in {path}")
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    _replace(path, f"{text}{client_id} {hash_token(token)}\n")
    return token


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600) atomically: a running server reads the old file or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def revoke_token(path: str | Path, client_id: str) -> None:
    """Remove ``client_id``'s token from ``path``; a running server refuses it from its next call on."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no token file {path}")
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.split()[:1] != [client_id]]
    if len(kept) == len(lines):
        raise ValueError(f"client {client_id!r} has no token in {path}")
    _replace(path, "".join(kept))


def bearer(metadata) -> str | None:
    """The token from ``authorization: Bearer <token>`` call metadata."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def certificate_name(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The common name of the client certificate gRPC verified (``context.auth_context()``), if any."""
    names = list(auth_context.get("x509_common_name") or ())
    return names[0].decode("utf-8", "replace") if names else None


class AuthError(Exception):
    """A call that does not say who it is; the message is the one-line reason (UNAUTHENTICATED)."""


@dataclass
class Caller:
    """An authenticated client: its id, and the bearer token it presented (re-checked on revocation)."""

    client: str
    token: str | None = None
    generation: int = 0  # the TokenStore generation the token was last checked against


class Authenticator:
    """Identifies callers by bearer token, by client certificate (``mutual_tls``), or both.

    With neither, every caller is ``anonymous``. With both, the certificate names the client and
    the token must be that client's.
    """

    def __init__(self, tokens: TokenStore | None, mutual_tls: bool = False) -> None:
        self.tokens, self.mutual_tls = tokens, mutual_tls

    def identify(self, metadata, auth_context: Mapping[str, Iterable[bytes]]) -> Caller:
        """The caller of a call with this metadata and TLS auth context; AuthError if it is not one."""
        if self.tokens is None and not self.mutual_tls:
            return Caller("anonymous")
        certified = None
        if self.mutual_tls:
            certified = certificate_name(auth_context)
            if certified is None:
                raise AuthError("no client certificate with a common name (mutual TLS is required)")
            try:
                check_client_id(certified)
            except ValueError as exc:
                raise AuthError(f"certificate common name: {exc}") from None
        if self.tokens is None:
            return Caller(certified)
        self.tokens.refresh()
        token = bearer(metadata)
        client = self.tokens.client_for(token)
        if client is None:
            raise AuthError("missing or invalid bearer token")
        if certified is not None and client != certified:
            raise AuthError(f"the bearer token is not the token of {certified!r}, the certificate's client")
        return Caller(client, token, self.tokens.generation)

    def still_valid(self, caller: Caller) -> bool:
        """Whether ``caller``'s token is still in the token file (re-read if it changed)."""
        if self.tokens is None:
            return True
        self.tokens.refresh()
        if caller.generation != self.tokens.generation:
            if self.tokens.client_for(caller.token) != caller.client:
                return False
            caller.generation = self.tokens.generation
        return True
