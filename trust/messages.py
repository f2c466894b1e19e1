"""Every conversion between the trust RPCs' protobuf messages and trust's domain values, both directions.

The coordinator (serving Enroll, Renew, GetRevocations), the agent (calling Enroll and
Renew) and every home (serving and calling GetRevocations) convert here, so each
message has one mapping each way. `trust.enroll` and `trust.revocation` stay free of
protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto import strata_pb2 as pb
from trust.enroll import Enrolled, EnrollmentRequest
from trust.identity import Identity
from trust.revocation import RevocationList

__all__ = [
    "Certificate",
    "certificate_from_pb",
    "certificate_to_pb",
    "enroll_request_from_pb",
    "enroll_request_to_pb",
    "renew_request_from_pb",
    "renew_request_to_pb",
    "revocations_from_reply",
    "revocations_reply",
    "version_of",
]


@dataclass(frozen=True, kw_only=True)
class Certificate:
    """What Enroll and Renew answer: the certificate, the CA, and where to renew it."""

    enrolled: Enrolled
    renew_address: str = ""


# ---------------------------------------------------------------- Enroll and Renew


def enroll_request_to_pb(request: EnrollmentRequest) -> pb.EnrollRequest:
    return pb.EnrollRequest(
        token=request.token,
        agent_id=request.requested_id,
        csr_pem=request.csr_pem,
        manifest_key=request.manifest_key,
        proof=request.proof,
    )


def enroll_request_from_pb(message: pb.EnrollRequest) -> EnrollmentRequest:
    return EnrollmentRequest(
        token=message.token,
        requested_id=message.agent_id,
        csr_pem=message.csr_pem,
        manifest_key=message.manifest_key,
        proof=message.proof,
    )


def renew_request_to_pb(request: EnrollmentRequest) -> pb.RenewRequest:
    return pb.RenewRequest(csr_pem=request.csr_pem, manifest_key=request.manifest_key, proof=request.proof)


def renew_request_from_pb(message: pb.RenewRequest) -> EnrollmentRequest:
    """A renewal names no token and no id: the caller's certificate says who it is."""
    return EnrollmentRequest(
        token="", requested_id="", csr_pem=message.csr_pem, manifest_key=message.manifest_key, proof=message.proof
    )


def certificate_to_pb(certificate: Certificate) -> pb.CertificateReply:
    enrolled = certificate.enrolled
    return pb.CertificateReply(
        certificate_pem=enrolled.cert_pem,
        ca_pem=enrolled.ca_pem,
        identity=str(enrolled.identity),
        renew_address=certificate.renew_address,
    )


def certificate_from_pb(message: pb.CertificateReply) -> Certificate:
    return Certificate(
        enrolled=Enrolled(
            identity=Identity.parse(message.identity), cert_pem=message.certificate_pem, ca_pem=message.ca_pem
        ),
        renew_address=message.renew_address,
    )


# ---------------------------------------------------------------- GetRevocations


def version_of(revocations: RevocationList | None) -> int:
    """A list's version; 0 for no list (a new CA's empty list is version 0 too: nothing to fetch)."""
    return 0 if revocations is None else revocations.version


def revocations_reply(revocations: RevocationList | None, known_version: int) -> pb.RevocationsReply:
    """The GetRevocations answer: the list only when it is newer than what the caller holds."""
    version = version_of(revocations)
    if revocations is None or version <= known_version:
        return pb.RevocationsReply(version=version)
    return pb.RevocationsReply(version=version, revocations=revocations.to_bytes())


def revocations_from_reply(reply: pb.RevocationsReply) -> RevocationList | None:
    """The list a GetRevocations reply carries, parsed (NOT verified: installing it verifies); None if none."""
    if not reply.revocations:
        return None
    return RevocationList.from_bytes(reply.revocations)
