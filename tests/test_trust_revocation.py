"""The signed revocation list: what it covers, its signature, tampering, replay of older versions."""

from __future__ import annotations

import json

import pytest

from proto.errors import IntegrityError, InvalidInput
from storage.keys import KeyPair
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.revocation import RevocationList


@pytest.fixture
def ca(tmp_path) -> FleetCA:
    with FleetCA.init(tmp_path / "ca", "demo") as ca:
        yield ca


def test_revoking_identities_and_serials_bumps_the_version(ca: FleetCA) -> None:
    agent = ca.issue(Identity(Role.AGENT, "d1"), KeyPair.generate()).certified
    other = ca.issue(Identity(Role.AGENT, "d2"), KeyPair.generate()).certified
    v1 = ca.revoke(identities=[Identity(Role.AGENT, "d1")])
    assert v1.version == 1
    assert v1.is_revoked(Identity(Role.AGENT, "d1")) and v1.is_revoked(agent)
    assert not v1.is_revoked(Identity(Role.RELAY, "d1"))  # an identity is a role and an id
    assert not v1.is_revoked(other)
    v2 = ca.revoke(serials=[other.serial.upper()])
    assert v2.version == 2 and v2.is_revoked(other) and v2.is_revoked(other.serial)
    assert ca.revoke(identities=[Identity(Role.AGENT, "d1")]).version == 2  # nothing new, no new version
    assert ca.revocations().version == 2  # saved


def test_the_list_verifies_under_its_ca_and_round_trips(ca: FleetCA) -> None:
    signed = ca.revoke(identities=[Identity(Role.AGGREGATOR, "a9")])
    parsed = RevocationList.from_bytes(signed.to_bytes())
    assert parsed.verify_with(ca.cert) == signed
    assert parsed.verify_with(ca.cert_pem).is_revoked(Identity(Role.AGGREGATOR, "a9"))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: r.update(identities=[]),
        lambda r: r.update(identities=["agent/d1", "agent/d2"]),
        lambda r: r.update(serials=["ff"]),
        lambda r: r.update(version=r["version"] + 5),
        lambda r: r.update(issued_at="2020-01-01T00:00:00.000Z"),
    ],
)
def test_tampering_breaks_the_signature(ca: FleetCA, tamper) -> None:
    record = json.loads(ca.revoke(identities=[Identity(Role.AGENT, "d1")]).to_bytes())
    tamper(record)
    forged = RevocationList.from_bytes(json.dumps(record).encode())
    with pytest.raises(IntegrityError) as info:
        forged.verify_with(ca.cert)
    assert info.value.reason == "bad_signature"


def test_another_ca_or_fleet_or_no_signature_is_refused(tmp_path, ca: FleetCA) -> None:
    signed = ca.revoke(identities=[Identity(Role.AGENT, "d1")])
    with FleetCA.init(tmp_path / "impostor", "demo") as impostor:
        with pytest.raises(IntegrityError) as info:
            signed.verify_with(impostor.cert)
        assert info.value.reason == "bad_signature"
    with FleetCA.init(tmp_path / "elsewhere", "other-fleet") as elsewhere:
        with pytest.raises(IntegrityError) as info:
            signed.verify_with(elsewhere.cert)
        assert info.value.reason == "wrong_fleet"
    with pytest.raises(IntegrityError):
        RevocationList.empty("demo").verify_with(ca.cert)


def test_only_newer_versions_replace_a_list(ca: FleetCA) -> None:
    v1 = ca.revoke(identities=[Identity(Role.AGENT, "d1")])
    v2 = ca.revoke(identities=[Identity(Role.AGENT, "d2")])
    assert v2.newer_than(v1) and v1.newer_than(None)
    assert not v1.newer_than(v2) and not v2.newer_than(v2)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b'{"schema": "strata/revocations/1"}', b"not json"],
)
def test_malformed_lists_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput) as info:
        RevocationList.from_bytes(data)
    assert info.value.reason == "bad_revocations"


def test_entries_are_validated(ca: FleetCA) -> None:
    record = json.loads(ca.revocations().to_bytes())
    record["identities"] = ["not-an-identity"]
    with pytest.raises(InvalidInput):
        RevocationList.from_bytes(json.dumps(record).encode())
    record["identities"], record["serials"] = [], ["zz"]
    with pytest.raises(InvalidInput):
        RevocationList.from_bytes(json.dumps(record).encode())
