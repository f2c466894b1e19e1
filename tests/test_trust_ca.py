"""The fleet CA: files and permissions, issuing, validity, CSR signing, the inventory; bundles on disk."""

from __future__ import annotations

import os
import stat
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proto.errors import FailedPrecondition, IntegrityError, InvalidInput, NotFound
from storage.keys import KeyPair
from trust.bundle import Bundle
from trust.ca import (
    DEFAULT_VALIDITY,
    MAX_VALIDITY,
    FleetCA,
    enrollment_proof_message,
    new_tls_key,
    parse_duration,
)
from trust.identity import Identity, Role, identity_of, read_certificate

NOW = 1_900_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ca(tmp_path, clock: Clock) -> FleetCA:
    with FleetCA.init(tmp_path / "ca", "demo", clock=clock) as ca:
        yield ca


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "aggregator/evil") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("strata://demo/aggregator/evil")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _proof(csr_pem: bytes, manifest_key: KeyPair) -> str:
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    return manifest_key.sign(enrollment_proof_message(der))


# ---------------------------------------------------------------- files


def test_init_writes_a_private_ca(tmp_path, ca: FleetCA) -> None:
    directory = tmp_path / "ca"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert ca.fleet == "demo"
    assert ca.revocations().version == 0  # an empty, signed list from the start


def test_init_refuses_to_overwrite_and_load_finds_it(tmp_path, ca: FleetCA) -> None:
    with pytest.raises(FailedPrecondition) as info:
        FleetCA.init(tmp_path / "ca", "demo")
    assert info.value.reason == "ca_exists"
    with FleetCA.load(tmp_path / "ca") as loaded:
        assert loaded.fingerprint == ca.fingerprint and loaded.fleet == "demo"


def test_load_refuses_a_missing_ca_or_an_exposed_key(tmp_path, ca: FleetCA) -> None:
    with pytest.raises(NotFound):
        FleetCA.load(tmp_path / "nowhere")
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    with pytest.raises(FailedPrecondition) as info:
        FleetCA.load(tmp_path / "ca")
    assert info.value.reason == "insecure_permissions"


def test_fleet_names_are_validated(tmp_path) -> None:
    with pytest.raises(InvalidInput):
        FleetCA.init(tmp_path / "ca", "Not A Label")


# ---------------------------------------------------------------- issuing


@pytest.mark.parametrize("role", list(Role))
def test_default_validity_is_short_and_per_role(ca: FleetCA, clock: Clock, role: Role) -> None:
    hosts = ["localhost"] if role in (Role.AGGREGATOR, Role.RELAY, Role.COORDINATOR) else []
    certified = ca.issue(Identity(role, "x1"), KeyPair.generate(), hosts=hosts).certified
    assert certified.not_after - NOW == pytest.approx(DEFAULT_VALIDITY[role].total_seconds(), abs=1)
    assert certified.not_before <= NOW  # backdated for clock skew
    assert DEFAULT_VALIDITY[Role.AGENT] == timedelta(hours=24)
    assert DEFAULT_VALIDITY[Role.AGGREGATOR] == timedelta(days=30)


def test_validity_is_configurable_and_bounded(ca: FleetCA) -> None:
    certified = ca.issue(Identity(Role.OPERATOR, "ops"), KeyPair.generate(), timedelta(hours=2)).certified
    assert certified.not_after - NOW == pytest.approx(7200, abs=1)
    with pytest.raises(InvalidInput):
        ca.issue(Identity(Role.OPERATOR, "ops"), KeyPair.generate(), MAX_VALIDITY + timedelta(days=1))
    with pytest.raises(InvalidInput):
        ca.issue(Identity(Role.OPERATOR, "ops"), KeyPair.generate(), timedelta(0))


def test_a_leaf_never_outlives_its_ca(tmp_path, clock: Clock) -> None:
    with FleetCA.init(tmp_path / "short", "demo", validity=timedelta(hours=1), clock=clock) as ca:
        bundle = ca.issue(Identity(Role.AGGREGATOR, "a1"), KeyPair.generate(), hosts=["localhost"])
        assert bundle.certified.not_after <= ca.cert.not_valid_after_utc.timestamp()


def test_parse_duration() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("15") == timedelta(seconds=15)
    for bad in ("", "1y", "-1d", "0s", "d"):
        with pytest.raises(InvalidInput):
            parse_duration(bad)


def test_serving_roles_get_hosts_and_server_auth_others_client_auth_only(ca: FleetCA) -> None:
    server = x509.load_pem_x509_certificate(
        ca.issue(Identity(Role.AGGREGATOR, "a1"), KeyPair.generate(), hosts=["localhost", "127.0.0.1", "agg-a.internal"]).cert_pem
    )
    assert read_certificate(server).hosts == ("localhost", "agg-a.internal", "127.0.0.1")
    assert set(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    client = x509.load_pem_x509_certificate(ca.issue(Identity(Role.AGENT, "d1"), KeyPair.generate()).cert_pem)
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(InvalidInput) as info:
        ca.issue(Identity(Role.AGENT, "d1"), KeyPair.generate(), hosts=["localhost"])
    assert info.value.reason == "bad_host"
    with pytest.raises(InvalidInput):
        ca.issue(Identity(Role.RELAY, "r1"), KeyPair.generate(), hosts=["not a host!"])


def test_issued_certificates_verify_under_their_ca_only(tmp_path, ca: FleetCA) -> None:
    bundle = ca.issue(Identity(Role.RELAY, "r1"), KeyPair.generate(), hosts=["localhost"])
    assert ca.verify(bundle.cert_pem).identity == Identity(Role.RELAY, "r1")
    with FleetCA.init(tmp_path / "other", "demo") as other:
        with pytest.raises(IntegrityError) as info:
            other.verify(bundle.cert_pem)
        assert info.value.reason == "wrong_ca"


# ---------------------------------------------------------------- CSRs


def test_sign_csr_takes_the_identity_from_the_caller_never_the_csr(ca: FleetCA) -> None:
    key, manifest_key = new_tls_key(), KeyPair.generate()
    csr = _csr(key)
    cert_pem = ca.sign_csr(csr, Identity(Role.AGENT, "dev-1"), manifest_key.public_key, manifest_key_proof=_proof(csr, manifest_key))
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert identity_of(cert) == Identity(Role.AGENT, "dev-1")
    assert cert.public_key() == key.public_key()  # the CSR's key, proven by the CSR
    assert read_certificate(cert).manifest_key == manifest_key.public_key
    assert read_certificate(cert).not_after - NOW == pytest.approx(86400, abs=1)
    assert [i.how for i in ca.issued(Identity(Role.AGENT, "dev-1"))] == ["enrolled"]


def test_sign_csr_refuses_a_csr_that_proves_nothing(ca: FleetCA) -> None:
    manifest_key = KeyPair.generate()
    identity = Identity(Role.AGENT, "dev-1")
    with pytest.raises(InvalidInput) as info:
        ca.sign_csr(b"not a csr", identity, manifest_key.public_key, manifest_key_proof="")
    assert info.value.reason == "bad_csr"
    rsa_csr = _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(InvalidInput) as info:
        ca.sign_csr(rsa_csr, identity, manifest_key.public_key, manifest_key_proof=_proof(rsa_csr, manifest_key))
    assert info.value.reason == "bad_csr_key"


def test_sign_csr_demands_proof_of_the_manifest_key(ca: FleetCA) -> None:
    """Else a device could have someone else's manifest key certified as its own."""
    csr, other_csr = _csr(new_tls_key()), _csr(new_tls_key())
    mine, victim = KeyPair.generate(), KeyPair.generate()
    identity = Identity(Role.AGENT, "dev-1")
    for public, proof in [
        (victim.public_key, _proof(csr, mine)),  # proof by another key
        (mine.public_key, _proof(other_csr, mine)),  # proof over another CSR
        (mine.public_key, "AAAA"),
    ]:
        with pytest.raises(InvalidInput) as info:
            ca.sign_csr(csr, identity, public, manifest_key_proof=proof)
        assert info.value.reason == "bad_proof"
    assert ca.issued() == []


def test_inventory_lists_every_certificate(tmp_path, ca: FleetCA) -> None:
    a1 = ca.issue(Identity(Role.AGGREGATOR, "a1"), KeyPair.generate(), hosts=["localhost"])
    ca.issue(Identity(Role.OPERATOR, "ops"), KeyPair.generate())
    assert [str(i.certified.identity) for i in ca.issued()] == ["aggregator/a1", "operator/ops"]
    assert ca.find(a1.certified.serial).certified.identity == Identity(Role.AGGREGATOR, "a1")
    with pytest.raises(NotFound):
        ca.find("abc")
    with FleetCA.load(tmp_path / "ca") as reopened:  # durable
        assert len(reopened.issued()) == 2


# ---------------------------------------------------------------- bundles


def test_bundle_writes_private_files_and_loads_back(tmp_path, ca: FleetCA) -> None:
    manifest_key = KeyPair.generate()
    bundle = ca.issue(Identity(Role.COORDINATOR, "c"), manifest_key, hosts=["localhost"]).write(tmp_path / "b")
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o700
    for name in ("key.pem", "manifest.key"):
        assert stat.S_IMODE((tmp_path / "b" / name).stat().st_mode) == 0o600
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.identity == Identity(Role.COORDINATOR, "c")
    assert loaded.manifest_key.public_key == manifest_key.public_key
    files = loaded.tls_files()
    assert (files.cert, files.key, files.ca) == (tmp_path / "b" / "cert.pem", tmp_path / "b" / "key.pem", tmp_path / "b" / "ca.pem")
    assert bundle.seconds_left(NOW) > 0


def test_a_bundle_whose_pieces_do_not_belong_together_is_refused(tmp_path, ca: FleetCA) -> None:
    one = ca.issue(Identity(Role.RELAY, "r1"), KeyPair.generate(), hosts=["localhost"])
    two = ca.issue(Identity(Role.RELAY, "r2"), KeyPair.generate(), hosts=["localhost"])
    with pytest.raises(IntegrityError) as info:
        Bundle(ca_pem=one.ca_pem, cert_pem=one.cert_pem, key_pem=two.key_pem, manifest_key=one.manifest_key)
    assert info.value.reason == "key_mismatch"
    with pytest.raises(IntegrityError) as info:
        Bundle(ca_pem=one.ca_pem, cert_pem=one.cert_pem, key_pem=one.key_pem, manifest_key=two.manifest_key)
    assert info.value.reason == "manifest_key_mismatch"
    with FleetCA.init(tmp_path / "other", "demo") as other:
        with pytest.raises(IntegrityError) as info:
            Bundle(ca_pem=other.cert_pem, cert_pem=one.cert_pem, key_pem=one.key_pem, manifest_key=one.manifest_key)
        assert info.value.reason == "wrong_ca"


def test_bundle_load_refuses_missing_or_exposed_files(tmp_path, ca: FleetCA) -> None:
    ca.issue(Identity(Role.RELAY, "r1"), KeyPair.generate(), hosts=["localhost"]).write(tmp_path / "b")
    os.chmod(tmp_path / "b" / "key.pem", 0o640)
    with pytest.raises(FailedPrecondition):
        Bundle.load(tmp_path / "b")
    (tmp_path / "b" / "key.pem").unlink()
    with pytest.raises(NotFound):
        Bundle.load(tmp_path / "b")
