"""Bootstrap tokens, as Kubernetes does them: ``<id>.<secret>``, good for one thing: enrolling.

A token is 6 + 16 characters of [a-z0-9] (e.g. ``07401b.f395accd246ae52d``). The id
is public: it names the token in listings and logs and looks it up. The secret is
shown once, when the token is made, and stored only as its SHA-256; redeeming
compares hashes in constant time (`hmac.compare_digest`). SHA-256 and not scrypt: a
secret is 16 random characters (~82 bits) drawn by `secrets`, not a password, so a
slow hash buys nothing against guessing and would cost every enrollment.

Each token carries the role it enrolls (agent only), an expiry and a use limit, so
one token can enroll a whole batch of devices for a day. `redeem` returns a
`Grant` (the role, never an identity: the enrolling side names the id) or raises
`TokenRefused` with a `TokenReason`: unknown, expired, used_up, bad_secret, revoked
(or malformed). A use is counted only when the whole token checks out, atomically,
so concurrent enrollments never overspend it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from proto.errors import InvalidInput, NotFound
from storage.durable import DurableSqlite
from trust.errors import Unauthenticated
from trust.identity import Role

__all__ = ["ENROLLABLE_ROLES", "Grant", "TokenInfo", "TokenReason", "TokenRefused", "TokenStore"]

ENROLLABLE_ROLES = frozenset({Role.AGENT})
_ALPHABET = string.ascii_lowercase + string.digits
_ID_LEN, _SECRET_LEN = 6, 16
_TOKEN = re.compile(rf"^([a-z0-9]{{{_ID_LEN}}})\.([a-z0-9]{{{_SECRET_LEN}}})$")
_MAX_USES = 1_000_000


class TokenReason(StrEnum):
    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    USED_UP = "used_up"
    BAD_SECRET = "bad_secret"
    REVOKED = "revoked"


class TokenRefused(Unauthenticated):
    """A token that buys nothing; `reason` is a `TokenReason` value prefixed "token_" (e.g. "token_expired")."""

    def __init__(self, message: str, *, why: TokenReason, token_id: str = "") -> None:
        super().__init__(message, reason=f"token_{why.value}")
        self.why = why
        self.token_id = token_id


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What a redeemed token buys: enrolling one identity of `role`."""

    token_id: str
    role: Role


@dataclass(frozen=True, kw_only=True)
class TokenInfo:
    """A token as listings show it: everything but the secret."""

    id: str
    role: Role
    created_at: float
    expires_at: float
    max_uses: int
    uses: int
    revoked_at: float | None
    description: str

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.uses >= self.max_uses:
            return "used_up"
        return "active"

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "id": self.id,
            "role": self.role.value,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "max_uses": self.max_uses,
            "uses": self.uses,
            "revoked_at": self.revoked_at,
            "description": self.description,
            "state": self.state(now),
        }


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


# compared against when the id is unknown, so both paths do the same work
_DUMMY_DIGEST = _digest("0" * _SECRET_LEN)


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


class TokenStore(DurableSqlite):
    """Bootstrap tokens in a durable SQLite file (or in memory with `path=None`). Thread-safe."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        role TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL DEFAULT 0,
        revoked_at REAL,
        description TEXT NOT NULL DEFAULT ''
    );
    """
    SCHEMA_VERSION = 1

    def __init__(self, path: str | Path | None, *, clock: Callable[[], float] = time.time, readonly: bool = False) -> None:
        super().__init__(path, readonly=readonly)
        self._clock = clock

    def create(self, *, role: Role | str = Role.AGENT, ttl_s: float, max_uses: int = 1, description: str = "") -> str:
        """A new token, `<id>.<secret>`. This is the only time the secret exists outside the caller's hands."""
        role = Role(role)
        if role not in ENROLLABLE_ROLES:
            raise InvalidInput(
                f"tokens enroll {', '.join(sorted(r.value for r in ENROLLABLE_ROLES))} only; "
                f"issue a {role.value} certificate with `strata certs issue`",
                reason="bad_role",
            )
        if not ttl_s > 0:
            raise InvalidInput(f"a token's lifetime must be positive, got {ttl_s}", reason="bad_duration")
        if isinstance(max_uses, bool) or not isinstance(max_uses, int) or not 1 <= max_uses <= _MAX_USES:
            raise InvalidInput(f"a token's uses must be 1..{_MAX_USES}, got {max_uses!r}", reason="bad_uses")
        now = self._clock()
        while True:
            token_id, secret = _random(_ID_LEN), _random(_SECRET_LEN)
            if not self._read("SELECT 1 FROM tokens WHERE id = ?", (token_id,)):
                break
        self._write(
            [
                (
                    "INSERT INTO tokens (id, secret_sha256, role, created_at, expires_at, max_uses, description)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (token_id, _digest(secret), role.value, now, now + ttl_s, max_uses, str(description)[:200]),
                )
            ]
        )
        return f"{token_id}.{secret}"

    def list(self) -> list[TokenInfo]:
        """Every token, oldest first, without secrets or their hashes."""
        rows = self._read(
            "SELECT id, role, created_at, expires_at, max_uses, uses, revoked_at, description FROM tokens ORDER BY created_at, id"
        )
        return [
            TokenInfo(
                id=row["id"],
                role=Role(row["role"]),
                created_at=row["created_at"],
                expires_at=row["expires_at"],
                max_uses=row["max_uses"],
                uses=row["uses"],
                revoked_at=row["revoked_at"],
                description=row["description"],
            )
            for row in rows
        ]

    def revoke(self, token_id: str) -> None:
        """Refuse the token from now on (idempotent); NotFound if there is no such token."""
        if not self._read("SELECT 1 FROM tokens WHERE id = ?", (token_id,)):
            raise NotFound(f"no token {token_id!r}", reason="not_found")
        self._write([("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (self._clock(), token_id))])

    def redeem(self, token: str) -> Grant:
        """Spend one use of `token`: its Grant, or TokenRefused saying why not."""
        match = _TOKEN.match(token) if isinstance(token, str) else None
        if match is None:
            raise TokenRefused("not a bootstrap token (expected <6 chars>.<16 chars> of [a-z0-9])", why=TokenReason.MALFORMED)
        token_id, secret = match.groups()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                grant = self._redeem_locked(token_id, secret)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return grant

    def _redeem_locked(self, token_id: str, secret: str) -> Grant:
        row = self._db.execute(
            "SELECT secret_sha256, role, expires_at, max_uses, uses, revoked_at FROM tokens WHERE id = ?", (token_id,)
        ).fetchone()
        # the secret is checked first, whatever else is wrong, so a refusal never tells a
        # guesser more about a token than "wrong secret"
        matches = hmac.compare_digest(_digest(secret), row[0] if row else _DUMMY_DIGEST)
        if row is None:
            raise TokenRefused(f"no token {token_id}", why=TokenReason.UNKNOWN, token_id=token_id)
        if not matches:
            raise TokenRefused(f"wrong secret for token {token_id}", why=TokenReason.BAD_SECRET, token_id=token_id)
        _, role, expires_at, max_uses, uses, revoked_at = row
        if revoked_at is not None:
            raise TokenRefused(f"token {token_id} was revoked", why=TokenReason.REVOKED, token_id=token_id)
        if self._clock() >= expires_at:
            raise TokenRefused(f"token {token_id} has expired", why=TokenReason.EXPIRED, token_id=token_id)
        if uses >= max_uses:
            raise TokenRefused(f"token {token_id} has been used {uses} of {max_uses} times", why=TokenReason.USED_UP, token_id=token_id)
        self._db.execute("UPDATE tokens SET uses = uses + 1 WHERE id = ?", (token_id,))
        return Grant(token_id=token_id, role=Role(role))
