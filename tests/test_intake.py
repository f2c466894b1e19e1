"""The accept step over a real store and a real journal, with a minimal receiver: milliseconds each.

The receiver here is a list, standing in for an aggregator's round or a relay's
window (both are tested end to end elsewhere); everything else is the real code.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.staleness import make_discount
from intake.accept import Intake, IntakePolicy, OpenRound
from intake.journal import AcceptedUpdate, IntakeJournal
from intake.submission import Submission
from intake.validation import UpdateLimits
from proto.errors import Refusal, UpdateRefused
from storage.cid import cid_of
from storage.codec import encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, rfc3339
from storage.store import LocalStore
from trust.bundle import Bundle
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.signers import Signers

W = "w"
BASE_TENSORS = {W: np.ones(4, np.float32)}


class ListReceiver:
    def __init__(self, round_: int) -> None:
        self.round = round_
        self.lock = threading.RLock()
        self.folded: list[tuple[AcceptedUpdate, dict]] = []

    def open_round(self) -> OpenRound:
        return OpenRound(round=self.round, base_tensors=BASE_TENSORS)

    def fold(self, update: AcceptedUpdate, tensors: Mapping[str, np.ndarray]) -> int:
        self.folded.append((update, dict(tensors)))
        return len(self.folded)


class Fixture:
    def __init__(self, tmp_path: Path, *, round_: int = 5, max_staleness: int = 2, admit=None) -> None:
        self.store = LocalStore(tmp_path / "store")
        self.journal = IntakeJournal(tmp_path / "journal.sqlite")
        self.receiver = ListReceiver(round_)
        self.bases = {r: cid_of(f"base of round {r}".encode()) for r in range(round_ + 1)}
        for r, cid in self.bases.items():
            self.journal.record_base(cid, r)
        self.intake = Intake(
            receiver_id="agg-t",
            policy=IntakePolicy(
                federation="digits",
                kinds=("local", "relay"),
                limits=UpdateLimits(max_update_bytes=1 << 20, max_relative_norm=10.0),
                max_staleness=max_staleness,
                discount=make_discount("polynomial", exponent=1.0),
            ),
            receiver=self.receiver,
            store=self.store,
            journal=self.journal,
            key=KeyPair.generate(),
            admit=admit,
            clock=lambda: 1000.0,
        )

    def sub(self, agent: str = "a1", *, round_: int = 5, value: float = 1.5, num_samples: int = 10, **fields) -> Submission:
        fields.setdefault("federation", "digits")
        return Submission(
            agent_id=agent,
            round=round_,
            base_cid=self.bases.get(round_, cid_of(b"a base nobody served")),
            num_samples=num_samples,
            weights=encode_tensors({W: np.full(4, value, np.float32)}),
            **fields,
        )

    def refused(self, sub: Submission) -> Refusal:
        with pytest.raises(UpdateRefused) as info:
            self.intake.submit(sub)
        return info.value.reason


@pytest.fixture
def fx(tmp_path: Path):
    fixture = Fixture(tmp_path)
    yield fixture
    fixture.intake.close()
    fixture.journal.close()
    fixture.store.close()


def test_an_accepted_update_is_stored_journaled_and_folded(fx: Fixture) -> None:
    sub = fx.sub()
    result = fx.intake.submit(sub)
    assert not result.duplicate and result.round == 5
    (update, tensors) = fx.receiver.folded[0]
    assert update.update_cid == result.update_cid and update.weights_cid == cid_of(sub.weights)
    np.testing.assert_allclose(tensors[W], 1.5)
    assert fx.journal.find_update("a1", sub.base_cid) == update
    assert fx.store.has(update.weights_cid)
    manifest = Manifest.from_bytes(fx.store.get(update.update_cid))
    assert (manifest.kind, manifest.round, manifest.base, manifest.num_samples) == ("local", 5, sub.base_cid, 10)


def test_stale_updates_count_by_their_discount(fx: Fixture) -> None:
    """weight = num_samples x discount(staleness); with exponent 1, two rounds old counts 1/3."""
    fx.intake.submit(fx.sub("fresh", round_=5, num_samples=30))
    fx.intake.submit(fx.sub("old", round_=3, num_samples=30))
    weights = {u.agent_id: (u.staleness, u.weight) for u, _ in fx.receiver.folded}
    assert weights == {"fresh": (0, 30.0), "old": (2, pytest.approx(10.0))}


def test_too_stale_is_refused_and_journaled(fx: Fixture) -> None:
    assert fx.refused(fx.sub(round_=2)) == Refusal.STALE
    assert fx.journal.refusal_counts() == {"stale": 1}
    assert fx.receiver.folded == []


def test_a_resend_is_a_duplicate_and_a_different_update_is_a_conflict(fx: Fixture) -> None:
    first = fx.intake.submit(fx.sub())
    again = fx.intake.submit(fx.sub())
    assert again.duplicate and again.update_cid == first.update_cid
    assert fx.refused(fx.sub(value=2.5)) == Refusal.CONFLICT
    assert fx.refused(fx.sub(num_samples=11)) == Refusal.CONFLICT
    assert len(fx.receiver.folded) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round_": 9}, Refusal.UNKNOWN_BASE),
        ({"federation": "mnist"}, Refusal.UNKNOWN_FEDERATION),
        ({"kind": "cluster"}, Refusal.BAD_HEADER),
        ({"value": float("nan")}, Refusal.NOT_FINITE),
    ],
    ids=["unknown base", "federation", "kind", "nan"],
)
def test_refusals_keep_their_reason_and_fold_nothing(fx: Fixture, change: dict, reason: Refusal) -> None:
    assert fx.refused(fx.sub(**change)) == reason
    assert fx.journal.refusal_counts(5) == {reason.value: 1}
    assert fx.receiver.folded == [] and fx.journal.accepted_count() == 0


def test_a_header_round_that_is_not_the_bases_round_is_refused(fx: Fixture) -> None:
    sub = fx.sub(round_=4)
    wrong = Submission(**{**sub.__dict__, "round": 5})
    assert fx.refused(wrong) == Refusal.BAD_HEADER


def test_a_refused_updates_new_blob_is_removed_but_a_held_one_stays(fx: Fixture) -> None:
    bad = fx.sub(value=float("nan"))
    fx.refused(bad)
    assert not fx.store.has(cid_of(bad.weights))
    held = fx.store.put(bad.weights)
    fx.refused(bad)
    assert fx.store.has(held)


def test_the_receivers_admission_check_refuses_before_anything_is_stored(tmp_path: Path) -> None:
    def full(sub: Submission) -> None:
        raise UpdateRefused("backlog full", reason=Refusal.UPSTREAM_UNAVAILABLE)

    fixture = Fixture(tmp_path, admit=full)
    sub = fixture.sub()
    assert fixture.refused(sub) == Refusal.UPSTREAM_UNAVAILABLE
    assert not fixture.store.has(cid_of(sub.weights))
    fixture.intake.close()


def test_open_updates_are_what_a_restart_folds_back(fx: Fixture) -> None:
    fx.intake.submit(fx.sub("a1"))
    fx.intake.submit(fx.sub("a2", value=1.25))
    assert [u.agent_id for u in fx.journal.open_updates()] == ["a1", "a2"]


# ------------------------------------------------------------------ certified signers (with TLS)


class Certs:
    """A real fleet CA and certified agents, and the Signers a TLS server judges manifests with."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca = FleetCA.init(tmp_path / "ca", "demo")
        self.signers = Signers(self.ca.cert)

    def bundle(self, name: str) -> Bundle:
        return self.ca.issue(Identity(Role.AGENT, name), KeyPair.generate())


def _signed_sub(
    fx: Fixture, bundle: Bundle, key: KeyPair, *, producer: str = "a1", signers: Signers | None = None
) -> Submission:
    """A submission by the TLS caller `bundle`, carrying a manifest signed by `key`."""
    sub = fx.sub(bundle.identity.id)
    manifest = Manifest(
        kind="local",
        federation="digits",
        round=sub.round,
        producer=Producer(role="agent", id=producer),
        weights=cid_of(sub.weights),
        tensors=summarize(sub.weights),
        base=sub.base_cid,
        num_samples=sub.num_samples,
        created_at=rfc3339(time.time()),
    ).signed(key)
    return dataclasses.replace(sub, manifest=manifest.to_bytes(), caller=bundle.certified, signers=signers)


@pytest.fixture
def certs(tmp_path: Path):
    found = Certs(tmp_path)
    yield found
    found.ca.close()


def test_with_tls_the_callers_certified_key_and_certificate_count(fx: Fixture, certs: Certs) -> None:
    a1 = certs.bundle("a1")
    key = a1.manifest_key.with_certificate(a1.cert_pem.decode())
    result = fx.intake.submit(_signed_sub(fx, a1, key, signers=certs.signers))
    stored = Manifest.from_bytes(fx.store.get(result.update_cid))
    assert stored.certificate == a1.cert_pem.decode()
    assert certs.signers.check(stored).certified.identity == a1.identity


def test_with_tls_a_key_of_the_agents_own_but_not_its_certified_one_is_an_uncertified_signer(
    fx: Fixture, certs: Certs
) -> None:
    a1 = certs.bundle("a1")
    own = KeyPair.generate()  # a key of a1's own, not the one its certificate certifies
    assert fx.refused(_signed_sub(fx, a1, own)) == Refusal.UNCERTIFIED_SIGNER
    # its real certificate embedded does not help: the certificate does not certify that key
    assert fx.refused(_signed_sub(fx, a1, own.with_certificate(a1.cert_pem.decode()), signers=certs.signers)) == (
        Refusal.UNCERTIFIED_SIGNER
    )
    assert fx.journal.refusal_counts() == {"uncertified_signer": 2}
    assert fx.receiver.folded == [] and not fx.store.has(cid_of(fx.sub().weights))


def test_with_tls_the_certified_key_without_its_certificate_or_with_anothers_is_refused(fx: Fixture, certs: Certs) -> None:
    a1, a2 = certs.bundle("a1"), certs.bundle("a2")
    # signed by the certified key, but nothing embedded for an offline reader to check
    assert fx.refused(_signed_sub(fx, a1, a1.manifest_key, signers=certs.signers)) == Refusal.UNCERTIFIED_SIGNER
    # a2's certificate under a1's key
    stolen = a1.manifest_key.with_certificate(a2.cert_pem.decode())
    assert fx.refused(_signed_sub(fx, a1, stolen, signers=certs.signers)) == Refusal.UNCERTIFIED_SIGNER


def test_with_tls_a_manifest_naming_another_producer_is_refused(fx: Fixture, certs: Certs) -> None:
    a1, a2 = certs.bundle("a1"), certs.bundle("a2")
    # a2's genuinely signed manifest, sent by a1
    a2_key = a2.manifest_key.with_certificate(a2.cert_pem.decode())
    assert fx.refused(_signed_sub(fx, a1, a2_key, producer="a2", signers=certs.signers)) == Refusal.NOT_PRODUCER


def test_with_tls_a_revoked_signer_is_refused(fx: Fixture, certs: Certs) -> None:
    a1 = certs.bundle("a1")
    key = a1.manifest_key.with_certificate(a1.cert_pem.decode())
    revoked = Signers(certs.ca.cert, revocations=certs.ca.revoke(serials=[a1.certified.serial]))
    assert fx.refused(_signed_sub(fx, a1, key, signers=revoked)) == Refusal.UNCERTIFIED_SIGNER


def test_with_tls_a_sender_without_a_manifest_gets_one_recorded_by_the_receiver(fx: Fixture, certs: Certs) -> None:
    a1 = certs.bundle("a1")
    result = fx.intake.submit(dataclasses.replace(fx.sub("a1"), caller=a1.certified, signers=certs.signers))
    recorded = Manifest.from_bytes(fx.store.get(result.update_cid))
    assert recorded.producer.id == "a1" and recorded.extra["recorded_by"] == "agg-t"
