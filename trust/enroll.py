"""Enrollment: a bootstrap token and a CSR in, a short-lived certificate out. The core the Enroll RPC adapts.

The device side (`enrollment_request`) makes a fresh P-256 TLS key, a CSR for it, and
a proof that it also holds its manifest key (an ed25519 signature binding that key
to the CSR). The CA side (`Enrollment.enroll`) checks the CSR and the proof (cheap,
stateless), spends one use of the token (so an unauthenticated caller learns nothing
more than "bad token"), then decides the identity:

- the role is the token's (agent), the id the one the device asked for (its agent id);
- a revoked identity is refused (PERMISSION_DENIED ``revoked``);
- one identity, one key: if the identity holds an unexpired certificate for another
  manifest key, it is refused (ALREADY_EXISTS ``identity_taken``); the same key may
  enroll again (a device that lost its certificate re-enrolls).

`Enrollment.renew` serves a caller that still holds a valid certificate: same
identity, same manifest key, new TLS key and validity, no token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proto.errors import Conflict
from storage.keys import KeyPair
from trust.bundle import Bundle
from trust.ca import FleetCA, enrollment_proof_message, private_key_pem
from trust.errors import PermissionDenied
from trust.identity import Certified, Identity, Role
from trust.revocation import RevocationList
from trust.tokens import TokenStore

__all__ = ["Enrolled", "Enrollment", "EnrollmentRequest", "bundle_from_enrollment", "enrollment_request"]


@dataclass(frozen=True, kw_only=True)
class EnrollmentRequest:
    """What a device sends to enroll (or, without a token, to renew)."""

    token: str
    requested_id: str
    csr_pem: bytes
    manifest_key: str
    proof: str


@dataclass(frozen=True, kw_only=True)
class Enrolled:
    identity: Identity
    cert_pem: bytes
    ca_pem: bytes


def enrollment_request(*, token: str, requested_id: str, tls_key: ec.EllipticCurvePrivateKey, manifest_key: KeyPair) -> EnrollmentRequest:
    """The device side: a CSR for `tls_key` and the manifest key's proof over it. The CSR's subject is a
    courtesy (the CA ignores it)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, requested_id)]))
        .sign(tls_key, hashes.SHA256())
    )
    proof = manifest_key.sign(enrollment_proof_message(csr.public_bytes(serialization.Encoding.DER)))
    return EnrollmentRequest(
        token=token,
        requested_id=requested_id,
        csr_pem=csr.public_bytes(serialization.Encoding.PEM),
        manifest_key=manifest_key.public_key,
        proof=proof,
    )


def bundle_from_enrollment(enrolled: Enrolled, tls_key: ec.EllipticCurvePrivateKey, manifest_key: KeyPair) -> Bundle:
    """The device's bundle once enrolled (checked: the certificate is for this key and manifest key)."""
    return Bundle(ca_pem=enrolled.ca_pem, cert_pem=enrolled.cert_pem, key_pem=private_key_pem(tls_key), manifest_key=manifest_key)


class Enrollment:
    """Enrollment and renewal against one CA and one token store. Thread-safe."""

    def __init__(
        self,
        ca: FleetCA,
        tokens: TokenStore,
        *,
        revocations: Callable[[], RevocationList | None] | None = None,
        validity: timedelta | None = None,
    ) -> None:
        self._ca = ca
        self._tokens = tokens
        self._revocations = revocations or ca.revocations
        self._validity = validity
        self._lock = threading.Lock()

    def enroll(self, request: EnrollmentRequest) -> Enrolled:
        """Raises InvalidInput (bad CSR, proof or id), TokenRefused, PermissionDenied (revoked) or Conflict
        (identity_taken)."""
        self._ca.check_csr(request.csr_pem, request.manifest_key, request.proof)
        # a malformed id is refused before the token is spent, like a bad CSR
        Identity(Role.AGENT, request.requested_id)
        grant = self._tokens.redeem(request.token)
        identity = Identity(grant.role, request.requested_id)
        return self._certify(identity, request)

    def renew(self, current: Certified, request: EnrollmentRequest) -> Enrolled:
        """A new certificate for the identity `current` certifies (the caller's, from the interceptor)."""
        self._ca.check_csr(request.csr_pem, request.manifest_key, request.proof)
        if request.manifest_key != current.manifest_key:
            raise PermissionDenied(
                f"{current.identity} renews with its certified manifest key or not at all", reason="manifest_key_changed"
            )
        return self._certify(current.identity, request)

    def _certify(self, identity: Identity, request: EnrollmentRequest) -> Enrolled:
        revocations = self._revocations()
        if revocations is not None and revocations.is_revoked(identity):
            raise PermissionDenied(f"{identity} is revoked", reason="revoked")
        with self._lock:
            now = self._ca.clock()
            for issued in self._ca.issued(identity):
                held = issued.certified
                if held.valid_at(now) and held.manifest_key != request.manifest_key and not (
                    revocations is not None and revocations.is_revoked(held)
                ):
                    raise Conflict(
                        f"{identity} is held by another manifest key until its certificate {held.serial} expires",
                        reason="identity_taken",
                    )
            cert_pem = self._ca.sign_csr(
                request.csr_pem, identity, request.manifest_key, self._validity, manifest_key_proof=request.proof
            )
        return Enrolled(identity=identity, cert_pem=cert_pem, ca_pem=self._ca.cert_pem)
