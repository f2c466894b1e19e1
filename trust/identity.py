"""Who a certificate speaks for: a role and an id in one fleet, and the manifest key certified for them.

A Strata certificate names its holder in exactly one SAN URI,
``strata://<fleet>/<role>/<id>``. That URI is the identity; the subject's CN and O
are informational and never read back. `identity_of(cert)` parses it,
refusing anything else with an `IdentityError` whose reason says why.

A certificate also carries its holder's manifest-signing ed25519 public key, in a
non-critical X.509 extension (`MANIFEST_KEY_OID`) whose value is the DER
SubjectPublicKeyInfo of the key (algorithm id-Ed25519, 1.3.101.112). So "a model's
signature traces to an enrolled identity" is a lookup: the key that signed a
manifest must be the key certified for the producer the manifest names. One
identity, one key.

OIDs: Strata's private arc is a UUID OID under joint-iso-itu-t 2.25 (ITU-T X.667),
which anyone may mint without registration and nobody else will mint again:
``2.25.226702143890838327887907320187665887651`` (UUID
aa8d3ea7-1fd4-44ce-bee9-1020fb39b1a3). Its arc ``.1`` is the manifest-key extension.

This module never imports gRPC.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from storage.keys import KeyPair
from trust.errors import IdentityError

__all__ = [
    "MANIFEST_KEY_OID",
    "SCHEME",
    "STRATA_OID_ARC",
    "Certified",
    "Identity",
    "Role",
    "ca_fleet",
    "check_fleet",
    "identity_of",
    "load_certificate",
    "manifest_key_extension",
    "read_certificate",
    "serial_hex",
]

SCHEME = "strata"
STRATA_OID_ARC = "2.25.226702143890838327887907320187665887651"
MANIFEST_KEY_OID = x509.ObjectIdentifier(f"{STRATA_OID_ARC}.1")

# An id is one URI path segment that needs no percent-encoding, so it has exactly one
# spelling: letters, digits, '.', '_', '-', starting with a letter or digit (agent ids
# look like "agent-1a2b3c4d"), at most 128 characters. No '/', no spaces, no '%'.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A fleet is the URI's authority, so it is a DNS label: lower case, digits, '-'.
_FLEET = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ED25519_RAW = 32


class Role(StrEnum):
    """What a certificate holder is. The role table (`trust.roles`) says what each may call."""

    AGENT = "agent"
    RELAY = "relay"
    AGGREGATOR = "aggregator"
    COORDINATOR = "coordinator"
    OPERATOR = "operator"
    # operators who may also read device updates
    AUDIT = "audit"


def check_fleet(fleet: str) -> str:
    """`fleet`, if it is a valid fleet name (a DNS label); IdentityError otherwise."""
    if not isinstance(fleet, str) or not _FLEET.match(fleet):
        raise IdentityError(
            f"fleet name {fleet!r}: expected 1-63 lower-case letters, digits or '-', not starting or ending with '-'",
            reason="bad_identity",
        )
    return fleet


def ca_fleet(ca_cert: x509.Certificate) -> str:
    """The fleet a CA certificate serves: its subject's O (the CA writes it; nothing else reads the subject)."""
    names = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(names) != 1:
        raise IdentityError("the CA certificate names no fleet (subject O)", reason="bad_identity")
    return check_fleet(str(names[0].value))


def _check_id(value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise IdentityError(
            f"identity id {value!r}: expected 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            reason="bad_identity",
        )
    return value


def _role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise IdentityError(
            f"unknown role {value!r}; expected one of {', '.join(r.value for r in Role)}", reason="unknown_role"
        ) from None


@dataclass(frozen=True)
class Identity:
    """A role and an id, e.g. Identity(Role.AGENT, "agent-1a2b3c4d"); written "agent/agent-1a2b3c4d"."""

    role: Role
    id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", _role(self.role))
        _check_id(self.id)

    def __str__(self) -> str:
        return f"{self.role.value}/{self.id}"

    @classmethod
    def parse(cls, text: str) -> Identity:
        """The identity written "role/id"."""
        role, sep, id_ = str(text).partition("/")
        if not sep:
            raise IdentityError(f"identity {text!r}: expected role/id", reason="bad_identity")
        return cls(_role(role), id_)

    def uri(self, fleet: str) -> str:
        """The SAN URI naming this identity in `fleet`: strata://<fleet>/<role>/<id>."""
        return f"{SCHEME}://{check_fleet(fleet)}/{self.role.value}/{self.id}"

    @classmethod
    def from_uri(cls, uri: str) -> tuple[str, Identity]:
        """(fleet, identity) of a strata:// URI; IdentityError(reason="bad_identity") for anything else."""
        prefix = f"{SCHEME}://"
        if not uri.startswith(prefix):
            raise IdentityError(f"{uri!r} is not a {prefix} URI", reason="bad_identity")
        parts = uri[len(prefix) :].split("/")
        if len(parts) != 3:
            raise IdentityError(f"{uri!r}: expected {prefix}<fleet>/<role>/<id>", reason="bad_identity")
        fleet, role, id_ = parts
        return check_fleet(fleet), cls(_role(role), id_)


def serial_hex(serial: int) -> str:
    """A certificate serial as lower-case hex without leading zeros: how Strata writes serials everywhere."""
    return format(serial, "x")


def manifest_key_extension(public_key: str) -> x509.UnrecognizedExtension:
    """The extension certifying an ed25519 manifest key (storage.keys' base64 of the raw 32 bytes)."""
    raw = _raw_public(public_key)
    spki = Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return x509.UnrecognizedExtension(MANIFEST_KEY_OID, spki)


def _raw_public(public_key: str) -> bytes:
    try:
        raw = base64.b64decode(str(public_key).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != _ED25519_RAW or base64.b64encode(raw).decode("ascii") != public_key:
        raise IdentityError(
            "a manifest key is the base64 of a raw 32-byte ed25519 public key", reason="bad_manifest_key"
        )
    return raw


def _manifest_key_of(cert: x509.Certificate) -> str:
    try:
        extension = cert.extensions.get_extension_for_oid(MANIFEST_KEY_OID)
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate carries no manifest key", reason="no_manifest_key") from None
    value = extension.value
    der = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError("the certificate's manifest key is not an ed25519 key", reason="bad_manifest_key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_certificate(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    """A certificate from itself or its PEM; IdentityError(reason="bad_identity") for anything else."""
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode("ascii") if isinstance(cert, str) else bytes(cert)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise IdentityError("not a PEM certificate", reason="bad_identity") from None


def _strata_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(f"{SCHEME}:")]


def identity_of(cert: x509.Certificate | bytes | str, *, fleet: str | None = None) -> Identity:
    """The identity `cert` names in its one strata:// SAN URI; with `fleet`, it must be of that fleet.

    Raises IdentityError: no_identity (no strata URI), ambiguous_identity (more than one),
    bad_identity / unknown_role (malformed), wrong_fleet.
    """
    cert = load_certificate(cert)
    return _parse_identity(cert, fleet)[1]


def _parse_identity(cert: x509.Certificate, fleet: str | None) -> tuple[str, Identity]:
    uris = _strata_uris(cert)
    if not uris:
        raise IdentityError("the certificate names no strata:// identity", reason="no_identity")
    if len(uris) > 1:
        raise IdentityError(f"the certificate names {len(uris)} strata:// identities; one is allowed", reason="ambiguous_identity")
    found_fleet, identity = Identity.from_uri(uris[0])
    if fleet is not None and found_fleet != fleet:
        raise IdentityError(f"the certificate is of fleet {found_fleet!r}, not {fleet!r}", reason="wrong_fleet")
    return found_fleet, identity


@dataclass(frozen=True, kw_only=True)
class Certified:
    """What a Strata certificate says: who, in which fleet, with which manifest key, when, under which serial."""

    fleet: str
    identity: Identity
    manifest_key: str
    serial: str
    not_before: float
    not_after: float
    fingerprint: str
    hosts: tuple[str, ...] = ()

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def to_json(self) -> dict[str, object]:
        return {
            "fleet": self.fleet,
            "identity": str(self.identity),
            "role": self.identity.role.value,
            "id": self.identity.id,
            "manifest_key": self.manifest_key,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "fingerprint": self.fingerprint,
            "hosts": list(self.hosts),
        }

    def verify_producer_key(self, manifest_key: KeyPair | str) -> bool:
        """True when `manifest_key` (a pair or a public key) is the one this certificate certifies."""
        public = manifest_key.public_key if isinstance(manifest_key, KeyPair) else manifest_key
        return public == self.manifest_key


def _timestamp(moment: datetime) -> float:
    return moment.timestamp()


def _hosts(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress) if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)]
    return tuple(names)


def read_certificate(cert: x509.Certificate | bytes | str, *, fleet: str | None = None) -> Certified:
    """Everything Strata reads from a certificate; IdentityError if it is not a Strata certificate.

    This parses; it does not verify the signature chain (TLS did, or `Bundle`/`FleetCA` do).
    """
    cert = load_certificate(cert)
    found_fleet, identity = _parse_identity(cert, fleet)
    return Certified(
        fleet=found_fleet,
        identity=identity,
        manifest_key=_manifest_key_of(cert),
        serial=serial_hex(cert.serial_number),
        not_before=_timestamp(cert.not_valid_before_utc),
        not_after=_timestamp(cert.not_valid_after_utc),
        fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        hosts=_hosts(cert),
    )
