"""The revocation list: which identities and certificate serials a fleet no longer trusts, signed by its CA.

The coordinator distributes it to aggregators and relays; each hands it to its
`trust.interceptor.TrustInterceptor`, which refuses revoked callers. Certificates are
short-lived, so the list stays short: an entry matters only until the certificates it
covers expire (an identity entry also stops that identity from enrolling again).

The file is canonical JSON (sorted keys, no spaces, UTF-8, as manifests are)::

    {"fleet": "...", "identities": ["agent/a1", ...], "issued_at": "<RFC 3339>",
     "schema": "strata/revocations/1", "serials": ["<hex>", ...], "signature": "<base64>",
     "version": 3}

The signature is the CA key's ECDSA P-256 / SHA-256 signature (DER, base64) of the
canonical JSON of every field but ``signature``. Versions only grow: a holder refuses
a list older than the one it has (`newer_than`), so an old list cannot be replayed to
un-revoke someone.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from proto.errors import IntegrityError, InvalidInput
from storage.manifest import canonical_json, rfc3339
from trust.identity import Certified, Identity, ca_fleet, check_fleet, load_certificate

__all__ = ["SCHEMA", "RevocationList"]

SCHEMA = "strata/revocations/1"
_FIELDS = {"schema", "fleet", "version", "issued_at", "identities", "serials", "signature"}


def _serial(text: str) -> str:
    value = str(text).strip().lower()
    try:
        return format(int(value, 16), "x")
    except ValueError:
        raise InvalidInput(f"serial {text!r} is not hexadecimal", reason="bad_serial") from None


@dataclass(frozen=True, kw_only=True)
class RevocationList:
    """One version of the list. Build with `empty`/`with_revoked`, sign with `signed`, check with `verify_with`."""

    fleet: str
    version: int
    issued_at: str
    identities: frozenset[str] = frozenset()
    serials: frozenset[str] = frozenset()
    signature: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_fleet(self.fleet)
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 0:
            raise InvalidInput(f"revocation list version {self.version!r} must be a non-negative integer", reason="bad_revocations")
        object.__setattr__(self, "identities", frozenset(str(Identity.parse(i)) for i in self.identities))
        object.__setattr__(self, "serials", frozenset(_serial(s) for s in self.serials))

    @classmethod
    def empty(cls, fleet: str, *, now: float = 0.0) -> RevocationList:
        return cls(fleet=fleet, version=0, issued_at=rfc3339(now))

    # ------------------------------------------------------------ queries

    def is_revoked(self, subject: Identity | Certified | str) -> bool:
        """Whether an identity, a certificate (its identity or its serial) or a serial (hex) is revoked."""
        if isinstance(subject, Certified):
            return str(subject.identity) in self.identities or subject.serial in self.serials
        if isinstance(subject, Identity):
            return str(subject) in self.identities
        return _serial(subject) in self.serials

    def newer_than(self, other: RevocationList | None) -> bool:
        return other is None or self.version > other.version

    # ------------------------------------------------------------ changes

    def with_revoked(
        self, *, identities: Iterable[Identity | str] = (), serials: Iterable[str] = (), now: float
    ) -> RevocationList:
        """The next version with these added (unsigned); this very list if nothing is new."""
        new_identities = self.identities | {str(i) if isinstance(i, Identity) else str(Identity.parse(i)) for i in identities}
        new_serials = self.serials | {_serial(s) for s in serials}
        if new_identities == self.identities and new_serials == self.serials:
            return self
        return replace(
            self,
            version=self.version + 1,
            issued_at=rfc3339(now),
            identities=frozenset(new_identities),
            serials=frozenset(new_serials),
            signature=None,
        )

    # ------------------------------------------------------------ signing

    def _body(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "fleet": self.fleet,
            "version": self.version,
            "issued_at": self.issued_at,
            "identities": sorted(self.identities),
            "serials": sorted(self.serials),
        }

    def signing_bytes(self) -> bytes:
        return canonical_json(self._body())

    def signed(self, sign: Callable[[bytes], bytes]) -> RevocationList:
        """This list signed by `sign` (e.g. `FleetCA.sign_bytes`)."""
        return replace(self, signature=base64.b64encode(sign(self.signing_bytes())).decode("ascii"))

    def verify_with(self, ca_cert: x509.Certificate | bytes | str) -> RevocationList:
        """This list, if the CA of `ca_cert` signed exactly these contents for its fleet; IntegrityError otherwise."""
        ca = load_certificate(ca_cert)
        if self.signature is None:
            raise IntegrityError("the revocation list is not signed", reason="bad_signature")
        if ca_fleet(ca) != self.fleet:
            raise IntegrityError(f"the revocation list is for fleet {self.fleet!r}, not {ca_fleet(ca)!r}", reason="wrong_fleet")
        public = ca.public_key()
        try:
            signature = base64.b64decode(self.signature.encode("ascii"), validate=True)
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise InvalidSignature
            public.verify(signature, self.signing_bytes(), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, UnicodeEncodeError, ValueError):
            raise IntegrityError("the revocation list's signature does not verify under the CA", reason="bad_signature") from None
        return self

    # ------------------------------------------------------------ bytes

    def to_bytes(self) -> bytes:
        if self.signature is None:
            raise InvalidInput("sign the revocation list before writing it", reason="bad_revocations")
        return canonical_json({**self._body(), "signature": self.signature})

    def to_json(self) -> dict[str, Any]:
        return {**self._body(), "signature": self.signature}

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        """Parse a list (not yet verified: call `verify_with`); InvalidInput(reason="bad_revocations") if malformed."""
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict) or set(record) != _FIELDS or record.get("schema") != SCHEMA:
            raise InvalidInput(f"not a {SCHEMA} revocation list", reason="bad_revocations")
        identities, serials = record["identities"], record["serials"]
        if not isinstance(identities, list) or not isinstance(serials, list) or not isinstance(record["signature"], str):
            raise InvalidInput("revocation list: identities and serials are lists, signature a string", reason="bad_revocations")
        if not isinstance(record["issued_at"], str):
            raise InvalidInput("revocation list: issued_at is an RFC 3339 string", reason="bad_revocations")
        try:
            return cls(
                fleet=record["fleet"],
                version=record["version"],
                issued_at=record["issued_at"],
                identities=frozenset(identities),
                serials=frozenset(serials),
                signature=record["signature"],
            )
        except InvalidInput:
            raise
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"revocation list: {e}", reason="bad_revocations") from None
