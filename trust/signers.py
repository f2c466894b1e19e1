"""Signatures that mean something: whether a manifest's signer is the key the fleet CA certified for its producer.

A producer with a fleet certificate embeds it in every manifest it signs
(`storage.manifest.Manifest.certificate`, covered by the signature). `Signers`
checks one manifest offline, against the fleet CA's certificate and optionally
a revocation list:

1. the signature verifies over the manifest (``unsigned``, ``bad_signature``);
2. it embeds a certificate (``uncertified``), one the fleet CA issued
   (``wrong_ca``) and that names a Strata identity (``bad_certificate``);
3. the certificate's manifest-key extension is the key that signed
   (``key_mismatch``);
4. the certificate's identity is the manifest's producer, role and id
   (``not_producer``), with one exception: a device update
   (`DEVICE_UPDATE_KINDS`) that a receiver (an aggregator or a relay) recorded
   on a device's behalf, because the device sent no manifest of its own, names
   the receiver in ``extra.recorded_by`` and is signed by it;
5. the certificate was valid when the manifest says it was made, at
   ``created_at`` (``not_valid_then``); with ``current=True`` it must also be
   valid now (``expired``);
6. neither the identity nor the certificate's serial is revoked (``revoked``).

Failures raise `SignerError`, an IntegrityError whose `reason` is one of
`SIGNER_REASONS`. Receivers map them to their own codes: SubmitUpdate's
``uncertified_signer`` refusal, synthesis's ``uncertified_signer`` peer reason,
AnnounceModel's PERMISSION_DENIED; `strata verify --ca` prints them and exits 4.

This module never imports gRPC.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from proto.errors import IntegrityError
from storage.manifest import DEVICE_UPDATE_KINDS, Manifest, timestamp
from trust.errors import IdentityError
from trust.identity import Certified, Role, ca_fleet, load_certificate, read_certificate
from trust.revocation import RevocationList

__all__ = ["RECORDER_ROLES", "SIGNER_REASONS", "Signer", "SignerError", "Signers"]

SIGNER_REASONS = (
    "unsigned",
    "bad_signature",
    "uncertified",
    "wrong_ca",
    "bad_certificate",
    "key_mismatch",
    "not_producer",
    "not_valid_then",
    "expired",
    "revoked",
)
# who may record a device's update on its behalf: the homes that receive updates
RECORDER_ROLES = frozenset({Role.AGGREGATOR, Role.RELAY})


class SignerError(IntegrityError):
    """A manifest whose signer does not count; `reason` is one of SIGNER_REASONS."""

    reason = "uncertified"


@dataclass(frozen=True, kw_only=True)
class Signer:
    """Who signed a manifest, as its embedded certificate (checked against the fleet CA) says."""

    certified: Certified
    # "role/id" of the device a receiver recorded this update for; empty when the producer signed
    recorded_for: str = ""

    def to_json(self) -> dict[str, object]:
        record: dict[str, object] = {
            "identity": str(self.certified.identity),
            "serial": self.certified.serial,
            "not_before": self.certified.not_before,
            "not_after": self.certified.not_after,
        }
        if self.recorded_for:
            record["recorded_for"] = self.recorded_for
        return record

    def __str__(self) -> str:
        text = f"{self.certified.identity} (serial {self.certified.serial})"
        return f"{text}, recorded for {self.recorded_for}" if self.recorded_for else text


Revocations = RevocationList | Callable[[], RevocationList | None] | None


class Signers:
    """Judges manifest signers against one fleet CA and (optionally) its revocation list.

    `revocations` is a verified list, or a function returning the current one (a server's
    interceptor holds the list the coordinator distributes); it must be the CA's (see
    `RevocationList.verify_with`). Thread-safe.
    """

    def __init__(
        self,
        ca_cert: x509.Certificate | bytes | str,
        *,
        revocations: Revocations = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ca = load_certificate(ca_cert)
        self.fleet = ca_fleet(self._ca)
        if isinstance(revocations, RevocationList):
            revocations.verify_with(self._ca)
        self._revocations = revocations
        self._clock = clock

    @property
    def revocations(self) -> RevocationList | None:
        source = self._revocations
        return source() if callable(source) else source

    def certificate(self, pem: str | bytes) -> Certified:
        """What `pem` certifies, once the fleet CA's signature on it verifies; SignerError otherwise."""
        data = pem.encode("ascii") if isinstance(pem, str) else bytes(pem)
        found = _issued_by(data, self._ca)
        if isinstance(found, tuple):
            reason, message = found
            raise SignerError(message, reason=reason)
        return found

    def check(self, manifest: Manifest, *, current: bool = False) -> Signer:
        """The manifest's certified signer; SignerError (see the module docstring) if it does not count."""
        try:
            manifest.verify_signature()
        except IntegrityError as exc:
            raise SignerError(str(exc), reason=exc.reason) from None
        if manifest.certificate is None:
            raise SignerError(f"manifest {manifest.cid} carries no certificate for its signing key", reason="uncertified")
        certified = self.certificate(manifest.certificate)
        assert manifest.signature is not None
        if certified.manifest_key != manifest.signature["public_key"]:
            raise SignerError(
                f"manifest {manifest.cid} is signed by a key that the certificate of {certified.identity} does not certify",
                reason="key_mismatch",
            )
        signer = Signer(certified=certified, recorded_for=_recorded_for(manifest, certified))
        created = timestamp(manifest.created_at)
        if not certified.valid_at(created):
            raise SignerError(
                f"the certificate of {certified.identity} (serial {certified.serial}) was not valid at the manifest's "
                f"created_at {manifest.created_at}",
                reason="not_valid_then",
            )
        if current and not certified.valid_at(self._clock()):
            raise SignerError(
                f"the certificate of {certified.identity} (serial {certified.serial}) is not valid now", reason="expired"
            )
        revocations = self.revocations
        if revocations is not None and revocations.is_revoked(certified):
            raise SignerError(f"{certified.identity} (serial {certified.serial}) is revoked", reason="revoked")
        return signer


def _recorded_for(manifest: Manifest, certified: Certified) -> str:
    """"" when the certificate's identity is the producer; the device's "role/id" for a receiver's recording."""
    identity, producer = certified.identity, manifest.producer
    if (identity.role.value, identity.id) == (producer.role, producer.id):
        return ""
    if (
        manifest.kind in DEVICE_UPDATE_KINDS
        and identity.role in RECORDER_ROLES
        and manifest.extra.get("recorded_by") == identity.id
    ):
        return f"{producer.role}/{producer.id}"
    raise SignerError(
        f"manifest {manifest.cid} names producer {producer.role}/{producer.id} but is signed by {identity}",
        reason="not_producer",
    )


@functools.lru_cache(maxsize=1024)
def _issued_by(pem: bytes, ca: x509.Certificate) -> Certified | tuple[str, str]:
    """What `pem` certifies, or (reason, message). A producer embeds the same certificate in every
    manifest until it renews, so each is parsed and verified once."""
    try:
        cert = load_certificate(pem)
    except IdentityError:
        return "bad_certificate", "the embedded certificate is not a PEM certificate"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "wrong_ca", "the embedded certificate was not issued by the fleet CA"
    try:
        return read_certificate(cert, fleet=ca_fleet(ca))
    except IdentityError as exc:
        return "bad_certificate", f"the embedded certificate names no usable identity: {exc}"
