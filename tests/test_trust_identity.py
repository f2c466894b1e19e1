"""Identities in certificates: the strata:// SAN URI round trip, and every way a certificate can fail to carry one."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from storage.keys import KeyPair
from trust.ca import FleetCA
from trust.errors import IdentityError
from trust.identity import (
    MANIFEST_KEY_OID,
    Identity,
    Role,
    identity_of,
    manifest_key_extension,
    read_certificate,
)


@pytest.fixture
def ca(tmp_path) -> FleetCA:
    with FleetCA.init(tmp_path / "ca", "fleet-1") as ca:
        yield ca


def _cert(*, uris: list[str], extensions: list[x509.ExtensionType] = (), cn: str = "x") -> x509.Certificate:
    """A self-signed certificate with exactly the SAN URIs and extensions given."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize("role", list(Role))
def test_identity_round_trips_through_a_certificate(ca: FleetCA, role: Role) -> None:
    identity = Identity(role, "node-7.a_b")
    key = KeyPair.generate()
    hosts = ["localhost"] if role in (Role.AGGREGATOR, Role.RELAY, Role.COORDINATOR) else []
    bundle = ca.issue(identity, key, hosts=hosts)
    assert identity_of(bundle.cert_pem) == identity
    assert identity_of(bundle.cert_pem, fleet="fleet-1") == identity
    certified = read_certificate(bundle.cert_pem)
    assert certified.identity == identity
    assert certified.fleet == "fleet-1"
    assert certified.manifest_key == key.public_key  # one identity, one key
    assert certified.verify_producer_key(key) and not certified.verify_producer_key(KeyPair.generate())


def test_identity_text_forms() -> None:
    identity = Identity(Role.AGENT, "agent-1a2b")
    assert str(identity) == "agent/agent-1a2b"
    assert Identity.parse("agent/agent-1a2b") == identity
    assert identity.uri("demo") == "strata://demo/agent/agent-1a2b"
    assert Identity.from_uri("strata://demo/agent/agent-1a2b") == ("demo", identity)
    assert Identity("relay", "r1").role is Role.RELAY  # a role's string is accepted and normalized


@pytest.mark.parametrize("bad_id", ["", "a/b", "x" * 129, "-leading", "sp ace", "pct%2F", "ünï"])
def test_ids_are_validated(bad_id: str) -> None:
    with pytest.raises(IdentityError) as info:
        Identity(Role.AGENT, bad_id)
    assert info.value.reason == "bad_identity"
    assert Identity(Role.AGENT, "x" * 128).id  # the bound is inclusive


def test_unknown_role_is_refused() -> None:
    with pytest.raises(IdentityError) as info:
        Identity("admin", "root")
    assert info.value.reason == "unknown_role"


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "no_identity"),
        (["https://example.com/agent/a1"], "no_identity"),
        (["strata://f/agent/a1", "strata://f/agent/a2"], "ambiguous_identity"),
        (["strata://f/agent"], "bad_identity"),
        (["strata://f/agent/a1/extra"], "bad_identity"),
        (["strata://f/agent/"], "bad_identity"),
        (["strata://F_LEET/agent/a1"], "bad_identity"),
        (["strata:f/agent/a1"], "bad_identity"),
        (["strata://f/root/a1"], "unknown_role"),
    ],
)
def test_san_parsing_refusals(uris: list[str], reason: str) -> None:
    with pytest.raises(IdentityError) as info:
        identity_of(_cert(uris=uris))
    assert info.value.reason == reason


def test_the_subject_never_names_the_identity() -> None:
    """A CN that looks like an identity counts for nothing."""
    with pytest.raises(IdentityError) as info:
        identity_of(_cert(uris=[], cn="strata://f/aggregator/a1"))
    assert info.value.reason == "no_identity"


def test_wrong_fleet_is_refused_when_a_fleet_is_expected() -> None:
    cert = _cert(uris=["strata://other/agent/a1"], extensions=[manifest_key_extension(KeyPair.generate().public_key)])
    assert identity_of(cert) == Identity(Role.AGENT, "a1")
    with pytest.raises(IdentityError) as info:
        identity_of(cert, fleet="fleet-1")
    assert info.value.reason == "wrong_fleet"


def test_the_manifest_key_extension_is_required_and_must_be_ed25519() -> None:
    with pytest.raises(IdentityError) as info:
        read_certificate(_cert(uris=["strata://f/agent/a1"]))
    assert info.value.reason == "no_manifest_key"
    garbage = x509.UnrecognizedExtension(MANIFEST_KEY_OID, b"\x04\x03abc")
    with pytest.raises(IdentityError) as info:
        read_certificate(_cert(uris=["strata://f/agent/a1"], extensions=[garbage]))
    assert info.value.reason == "bad_manifest_key"
    with pytest.raises(IdentityError) as info:
        manifest_key_extension("not base64 of 32 bytes")
    assert info.value.reason == "bad_manifest_key"


def test_the_manifest_key_extension_is_not_critical(ca: FleetCA) -> None:
    """Non-critical, so TLS stacks that do not know it still accept the certificate."""
    cert = x509.load_pem_x509_certificate(ca.issue(Identity(Role.AGENT, "a1"), KeyPair.generate()).cert_pem)
    extension = cert.extensions.get_extension_for_oid(MANIFEST_KEY_OID)
    assert extension.critical is False


def test_garbage_is_not_a_certificate() -> None:
    with pytest.raises(IdentityError):
        identity_of(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
