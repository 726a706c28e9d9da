"""Tenants and their bearer tokens: who is calling the gateway.

:class:`Tenants` owns the gateway's token table. It is built from text with
one ``<tenant> <token>`` pair per line (a tokens file, or the same text in the
environment variable ``CORRAL_GATEWAY_TOKENS``); blank lines and lines that
start with ``#`` are ignored, a tenant may have several tokens (rotation), and
a token belongs to exactly one tenant.

It keeps only the SHA-256 digest of each token, never the token: a gateway
actor's constructor arguments live in Ray's control store, and a digest there
gives nobody a way in. A presented token is hashed and compared with *every*
configured digest with :func:`hmac.compare_digest` (no early exit), so the time
an answer takes says nothing about which bytes or which token matched.

Nothing here logs or formats a token, whole or in part; error messages name
line numbers and tenants only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from typing import Iterable, Optional

from corral.errors import InvalidRequest

__all__ = ["Tenants", "TOKENS_ENV", "MIN_TOKEN_LENGTH", "TENANT_RE", "digest"]

#: The environment variable that may hold the tokens text instead of a file.
TOKENS_ENV = "CORRAL_GATEWAY_TOKENS"
#: Shorter tokens are refused: a guessable token is no token.
MIN_TOKEN_LENGTH = 16
#: Tenant names: they prefix session ids (``<tenant>/<session>``), so no ``/`` and no spaces.
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: what fits in a header


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Tenants:
    """The token table: SHA-256 digests of tokens, each with its tenant.

    ``authenticate(header)`` is the one check every request goes through.
    Instances are immutable after construction and safe to share.
    """

    def __init__(self, entries: Iterable[tuple[bytes, str]]) -> None:
        pairs = [(bytes(d), str(t)) for d, t in entries]
        if not pairs:
            raise InvalidRequest(
                "the gateway has no tokens: give a tokens file (--token-file, one '<tenant> <token>' a line) "
                f"or the same text in ${TOKENS_ENV}; it never runs open"
            )
        seen: dict[bytes, str] = {}
        for d, tenant in pairs:
            if len(d) != 32:
                raise InvalidRequest(f"tenant {tenant!r}: a token digest must be 32 bytes (SHA-256)")
            if not TENANT_RE.match(tenant):
                raise InvalidRequest(f"tenant name {tenant!r}: use letters, digits, '_', '.', '-' (at most 64)")
            if d in seen:
                raise InvalidRequest(f"one token is given to two tenants ({seen[d]!r} and {tenant!r})")
            seen[d] = tenant
        self._entries: tuple[tuple[bytes, str], ...] = tuple(pairs)

    # -- building ------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> "Tenants":
        """From ``<tenant> <token>`` lines; a malformed line is an error naming its number."""
        if not isinstance(text, str):
            raise InvalidRequest(f"{source}: expected text, got {type(text).__name__}")
        entries = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise InvalidRequest(f"{source} line {n}: expected '<tenant> <token>' (two fields)")
            tenant, token = parts
            if not TENANT_RE.match(tenant):
                raise InvalidRequest(f"{source} line {n}: tenant name {tenant!r}: use letters, digits, '_', '.', '-'")
            if not _TOKEN_RE.match(token) or len(token) < MIN_TOKEN_LENGTH:
                raise InvalidRequest(
                    f"{source} line {n} (tenant {tenant!r}): the token must be at least {MIN_TOKEN_LENGTH} "
                    "printable characters (e.g. `openssl rand -hex 32`)"
                )
            entries.append((digest(token), tenant))
        if not entries:
            raise InvalidRequest(f"{source}: no '<tenant> <token>' line; the gateway never runs open")
        return cls(entries)

    @classmethod
    def from_file(cls, path: str) -> "Tenants":
        try:
            st = os.stat(path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise InvalidRequest(f"cannot read the tokens file {path!r}: {e.strerror or e}") from None
        tenants = cls.parse(text, source=path)
        tenants.world_readable = bool(st.st_mode & (stat.S_IROTH | stat.S_IWOTH))
        return tenants

    @classmethod
    def load(cls, token_file: Optional[str] = None, environ: Optional[dict] = None) -> "Tenants":
        """From ``token_file`` if given, else from ``$CORRAL_GATEWAY_TOKENS``; neither: an error."""
        if token_file:
            return cls.from_file(token_file)
        env = os.environ if environ is None else environ
        text = env.get(TOKENS_ENV)
        if text:
            return cls.parse(text, source=f"${TOKENS_ENV}")
        return cls([])  # raises: no tokens

    @classmethod
    def from_digests(cls, rows: Iterable[tuple[str, str]]) -> "Tenants":
        """From ``(hex digest, tenant)`` rows, as :meth:`digests` gives them (how a gateway actor gets them)."""
        try:
            return cls((bytes.fromhex(h), t) for h, t in rows)
        except (TypeError, ValueError):
            raise InvalidRequest("token digests must be (hex SHA-256, tenant) pairs") from None

    def digests(self) -> list[tuple[str, str]]:
        """``(hex digest, tenant)`` rows: what may be handed to another process instead of tokens."""
        return [(d.hex(), t) for d, t in self._entries]

    #: Set by :meth:`from_file` when the file can be read by other users (the CLI warns).
    world_readable = False

    # -- checking ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return sorted({t for _, t in self._entries})

    def authenticate(self, authorization: Optional[str]) -> Optional[str]:
        """The tenant of an ``Authorization: Bearer <token>`` header value, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Optional[str] = None
        for d, tenant in self._entries:  # every entry, whatever matched: the time says nothing
            if hmac.compare_digest(given, d):
                found = tenant
        return found

    def __repr__(self) -> str:  # never the digests, let alone tokens
        return f"<Tenants {len(self._entries)} tokens for {self.names}>"
