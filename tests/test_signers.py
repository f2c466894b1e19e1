"""Certified signers, offline: a manifest counts only if the certificate it embeds is the fleet CA's, names its
producer, certifies the key that signed it, was valid when it was made and is not revoked.

Real certificates from real fleet CAs (`trust.ca.FleetCA`) on an injectable clock; no wire. `strata verify --ca`
over a real fleet's lineage is in tests/test_tls_fleet.py; here, its unknown signer and bad arguments.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proto.errors import IntegrityError
from storage.cid import cid_of
from storage.codec import encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, rfc3339
from storage.models import save_model
from storage.store import LocalStore
from strata.cli import main as cli_main
from trust.bundle import Bundle
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.revocation import RevocationList
from trust.security import Security
from trust.signers import SIGNER_REASONS, SignerError, Signers

NOW = 1_900_000_000.0
WEIGHTS = encode_tensors({"w": np.ones((2, 2), np.float32)})


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ca(tmp_path: Path, clock: Clock) -> Iterator[FleetCA]:
    with FleetCA.init(tmp_path / "ca", "demo", clock=clock) as ca:
        yield ca


def _issue(ca: FleetCA, role: Role, name: str, key: KeyPair | None = None, **kwargs: Any) -> Bundle:
    return ca.issue(Identity(role, name), key or KeyPair.generate(), **kwargs)


def _certified(bundle: Bundle) -> KeyPair:
    return bundle.manifest_key.with_certificate(bundle.cert_pem.decode())


def _manifest(kind: str = "local", producer: tuple[str, str] = ("agent", "alice"), **overrides: Any) -> Manifest:
    fields: dict[str, Any] = {
        "kind": kind,
        "federation": "digits",
        "round": 0,
        "producer": Producer(role=producer[0], id=producer[1]),
        "weights": cid_of(WEIGHTS),
        "tensors": summarize(WEIGHTS),
        "base": cid_of(b"base"),
        "num_samples": 10,
        "created_at": rfc3339(NOW),
    }
    fields.update(overrides)
    return Manifest(**fields)


def _reason(signers: Signers, manifest: Manifest, **kwargs: Any) -> str:
    with pytest.raises(SignerError) as info:
        signers.check(manifest, **kwargs)
    assert info.value.reason in SIGNER_REASONS
    assert isinstance(info.value, IntegrityError)  # so the CLI exits 4
    return info.value.reason


def test_the_producer_signing_with_its_certified_key_counts(ca: FleetCA, clock: Clock) -> None:
    alice = _issue(ca, Role.AGENT, "alice")
    manifest = _manifest().signed(_certified(alice))
    signer = Signers(ca.cert, clock=clock).check(manifest, current=True)
    assert signer.certified.identity == Identity(Role.AGENT, "alice")
    assert signer.certified.serial == alice.certified.serial and signer.recorded_for == ""
    assert signer.to_json()["identity"] == "agent/alice" and "alice" in str(signer)


def test_unsigned_and_badly_signed_manifests_do_not_count(ca: FleetCA) -> None:
    signers = Signers(ca.cert)
    assert _reason(signers, _manifest()) == "unsigned"
    alice = _issue(ca, Role.AGENT, "alice")
    signed = _manifest().signed(_certified(alice))
    forged = dataclasses.replace(signed, num_samples=11)  # keeps the signature of 10 samples
    assert _reason(signers, forged) == "bad_signature"


def test_a_manifest_without_a_certificate_has_an_unknown_signer(ca: FleetCA) -> None:
    assert _reason(Signers(ca.cert), _manifest().signed(KeyPair.generate())) == "uncertified"


def test_a_certificate_from_another_ca_does_not_count(ca: FleetCA, tmp_path: Path, clock: Clock) -> None:
    with FleetCA.init(tmp_path / "other", "demo", clock=clock) as other:
        # same fleet name, same identity: only the issuing CA differs
        stranger = _issue(other, Role.AGENT, "alice")
    assert _reason(Signers(ca.cert), _manifest().signed(_certified(stranger))) == "wrong_ca"


def test_a_key_the_certificate_does_not_certify_does_not_count(ca: FleetCA) -> None:
    alice = _issue(ca, Role.AGENT, "alice")
    # alice's real certificate, but a key of her own that it does not certify
    manifest = _manifest(certificate=alice.cert_pem.decode()).signed(KeyPair.generate())
    assert _reason(Signers(ca.cert), manifest) == "key_mismatch"


def test_a_certificate_of_someone_else_than_the_producer_does_not_count(ca: FleetCA) -> None:
    bob = _issue(ca, Role.AGENT, "bob")
    assert _reason(Signers(ca.cert), _manifest(producer=("agent", "alice")).signed(_certified(bob))) == "not_producer"
    agg = _issue(ca, Role.AGGREGATOR, "agg-a")
    # the right id under another role is someone else
    assert _reason(Signers(ca.cert), _manifest(kind="cluster", producer=("relay", "agg-a")).signed(_certified(agg))) == "not_producer"


def test_a_receiver_may_record_a_device_update_on_its_behalf_and_nothing_else(ca: FleetCA) -> None:
    signers = Signers(ca.cert)
    agg = _certified(_issue(ca, Role.AGGREGATOR, "agg-a"))
    recorded = _manifest(extra={"recorded_by": "agg-a"}).signed(agg)
    signer = signers.check(recorded)
    assert signer.certified.identity == Identity(Role.AGGREGATOR, "agg-a") and signer.recorded_for == "agent/alice"
    assert signer.to_json()["recorded_for"] == "agent/alice"
    # recorded by someone else's name, or a kind no receiver records, or a recorder that receives nothing
    assert _reason(signers, _manifest(extra={"recorded_by": "agg-b"}).signed(agg)) == "not_producer"
    assert _reason(signers, _manifest(kind="cluster", producer=("aggregator", "agg-b"), extra={"recorded_by": "agg-a"}).signed(agg)) == "not_producer"
    operator = _certified(_issue(ca, Role.OPERATOR, "ops"))
    assert _reason(signers, _manifest(extra={"recorded_by": "ops"}).signed(operator)) == "not_producer"


def test_the_certificate_must_have_been_valid_when_the_manifest_was_made(ca: FleetCA, clock: Clock) -> None:
    alice = _issue(ca, Role.AGENT, "alice", validity=timedelta(hours=1))
    key = _certified(alice)
    signers = Signers(ca.cert, clock=clock)
    assert _reason(signers, _manifest(created_at=rfc3339(NOW - 86400)).signed(key)) == "not_valid_then"
    assert _reason(signers, _manifest(created_at=rfc3339(NOW + 7200)).signed(key)) == "not_valid_then"
    # made while valid: it still counts once the certificate expired, unless the check is for now
    made = _manifest(created_at=rfc3339(NOW + 60)).signed(key)
    clock.now = NOW + 7200
    assert signers.check(made).certified.identity.id == "alice"
    assert _reason(signers, made, current=True) == "expired"


def test_a_revoked_identity_or_serial_does_not_count(ca: FleetCA) -> None:
    alice, bob = _issue(ca, Role.AGENT, "alice"), _issue(ca, Role.AGENT, "bob")
    by_alice = _manifest().signed(_certified(alice))
    by_bob = _manifest(producer=("agent", "bob")).signed(_certified(bob))
    revocations = ca.revoke(identities=[Identity(Role.AGENT, "alice")])
    signers = Signers(ca.cert, revocations=revocations)
    assert _reason(signers, by_alice) == "revoked"
    assert signers.check(by_bob).certified.identity.id == "bob"
    # a function returning the current list: a server's interceptor holds it
    held: list[RevocationList | None] = [None]
    live = Signers(ca.cert, revocations=lambda: held[0])
    assert live.check(by_bob)
    held[0] = ca.revoke(serials=[bob.certified.serial])
    assert _reason(live, by_bob) == "revoked"


def test_a_revocation_list_of_another_ca_is_refused(ca: FleetCA, tmp_path: Path) -> None:
    with FleetCA.init(tmp_path / "other", "demo") as other:
        foreign = other.revoke(identities=[Identity(Role.AGENT, "bob")])
    with pytest.raises(IntegrityError):
        Signers(ca.cert, revocations=foreign)


def test_security_signs_with_its_certified_key_and_embeds_the_current_certificate(ca: FleetCA, tmp_path: Path) -> None:
    manifest_key = KeyPair.generate()
    directory = tmp_path / "bundle"
    first = _issue(ca, Role.RELAY, "relay-1", manifest_key).write(directory)
    security = Security(str(directory))
    assert security.manifest_key.public_key == manifest_key.public_key
    made = _manifest(kind="relay", producer=("relay", "relay-1")).signed(security.manifest_key)
    assert made.certificate == first.cert_pem.decode()
    assert security.signers.check(made).certified.serial == first.certified.serial
    # a renewal keeps the manifest key; the next manifest embeds the new certificate
    renewed = _issue(ca, Role.RELAY, "relay-1", manifest_key).write(directory)
    again = _manifest(kind="relay", producer=("relay", "relay-1"), num_samples=3).signed(security.manifest_key)
    assert renewed.certified.serial != first.certified.serial
    assert security.signers.check(again).certified.serial == renewed.certified.serial


def test_strata_verify_ca_exits_4_on_an_unknown_signer(ca: FleetCA, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca.cert_pem)
    alice = _certified(_issue(ca, Role.AGENT, "alice"))
    with LocalStore(tmp_path / "store") as store:
        update = save_model(
            store, weights=WEIGHTS, kind="local", federation="digits", round=0,
            producer=Producer(role="agent", id="alice"), key=alice, base=cid_of(b"base"), created_at=rfc3339(NOW),
        )  # fmt: skip
        # a base model put by an operator with a key no CA certified, and a cluster model of both
        stranger = save_model(
            store, weights=WEIGHTS, kind="base", federation="digits", round=0,
            producer=Producer(role="operator", id="ops"), key=KeyPair.generate(), created_at=rfc3339(NOW),
        )  # fmt: skip
        agg = _certified(_issue(ca, Role.AGGREGATOR, "agg-a"))
        cluster = save_model(
            store, weights=WEIGHTS, kind="cluster", federation="digits", round=0,
            producer=Producer(role="aggregator", id="agg-a"), key=agg, parents=[update.cid, stranger.cid],
            created_at=rfc3339(NOW),
        )  # fmt: skip
    args = ["verify", cluster.cid, "--store", str(tmp_path / "store"), "--json"]
    capsys.readouterr()
    assert cli_main(args) == 0  # self-consistent
    capsys.readouterr()
    assert cli_main([*args, "--ca", str(ca_pem)]) == 4
    result = json.loads(capsys.readouterr().out)
    assert [(p["cid"], p["reason"]) for p in result["problems"]] == [(stranger.cid, "uncertified")]
    signers = {row["cid"]: row.get("signer", {}).get("identity") for row in result["signers"]}
    assert signers == {cluster.cid: "aggregator/agg-a", update.cid: "agent/alice", stranger.cid: None}
    # a file that is not a certificate is invalid input; a missing one is not found
    (tmp_path / "junk.pem").write_text("junk")
    assert cli_main([*args, "--ca", str(tmp_path / "junk.pem")]) == 2
    assert cli_main([*args, "--ca", str(tmp_path / "missing.pem")]) == 3
