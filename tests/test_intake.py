"""The accept step over a real store and a real journal, with a minimal receiver: milliseconds each.

The receiver here is a list, standing in for an aggregator's round or a relay's
window (both are tested end to end elsewhere); everything else is the real code.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.staleness import make_discount
from intake.accept import Intake, IntakePolicy, OpenRound
from intake.journal import AcceptedUpdate, IntakeJournal
from intake.submission import Submission, SubmitResult
from intake.validation import UpdateLimits
from proto.errors import Refusal, Unavailable, UpdateRefused
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
    def __init__(self, round_: int, base: Mapping[str, np.ndarray] = BASE_TENSORS) -> None:
        self.round: int | None = round_
        self.base = base
        self.lock = threading.RLock()
        self.folded: list[tuple[AcceptedUpdate, dict]] = []

    def open_round(self) -> OpenRound:
        if self.round is None:
            raise Unavailable("no base model yet")
        return OpenRound(round=self.round, base_tensors=self.base)

    def fold(self, update: AcceptedUpdate, tensors: Mapping[str, np.ndarray]) -> int:
        self.folded.append((update, dict(tensors)))
        return len(self.folded)


class Fixture:
    def __init__(
        self,
        tmp_path: Path,
        *,
        round_: int = 5,
        max_staleness: int = 2,
        admit=None,
        base=BASE_TENSORS,
        store: LocalStore | None = None,
        discount=None,
    ) -> None:
        self.store = store or LocalStore(tmp_path / "store")
        self.journal = IntakeJournal(tmp_path / "journal.sqlite")
        self.receiver = ListReceiver(round_, base)
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
                discount=discount or make_discount("polynomial", exponent=1.0),
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
        fields.setdefault("weights", encode_tensors({W: np.full(4, value, np.float32)}))
        return Submission(
            agent_id=agent,
            round=round_,
            base_cid=self.bases.get(round_, cid_of(b"a base nobody served")),
            num_samples=num_samples,
            **fields,
        )

    def close(self) -> None:
        self.intake.close()
        self.journal.close()
        self.store.close()

    def refused(self, sub: Submission) -> Refusal:
        with pytest.raises(UpdateRefused) as info:
            self.intake.submit(sub)
        return info.value.reason


@pytest.fixture
def fx(tmp_path: Path):
    fixture = Fixture(tmp_path)
    yield fixture
    fixture.close()


def test_an_accepted_update_is_stored_journaled_and_folded(fx: Fixture) -> None:
    sub = fx.sub()
    result = fx.intake.submit(sub)
    assert result.duplicate is False and result.round == 5
    (update, tensors) = fx.receiver.folded[0]
    assert update.update_cid == result.update_cid and update.weights_cid == cid_of(sub.weights)
    np.testing.assert_allclose(tensors[W], 1.5)
    assert fx.journal.find_update("a1", sub.base_cid) == update
    assert update.accepted_at == 1000.0  # the intake's clock
    assert fx.store.get(update.weights_cid) == sub.weights
    manifest = Manifest.from_bytes(fx.store.get(update.update_cid))
    assert (manifest.kind, manifest.round, manifest.base, manifest.num_samples) == ("local", 5, sub.base_cid, 10)
    # the sender sent no manifest: the receiver recorded one, at its clock's time, under its own name
    assert manifest.extra == {"recorded_by": "agg-t"} and manifest.created_at == rfc3339(1000.0)


def test_the_journal_keeps_what_the_sender_reported(fx: Fixture) -> None:
    sub = fx.sub("relay-1", kind="relay", metrics={"loss": 0.25}, base_metrics={"loss": 0.5})
    fx.intake.submit(sub)
    update = fx.journal.find_update("relay-1", sub.base_cid)
    assert (update.kind, update.metrics, update.base_metrics) == ("relay", {"loss": 0.25}, {"loss": 0.5})
    assert (update.trained_round, update.counted_round, update.size, update.tensors) == (5, 5, len(sub.weights), (W,))


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
    assert again == SubmitResult(update_cid=first.update_cid, round=first.round, duplicate=True)
    assert fx.refused(fx.sub(value=2.5)) == Refusal.CONFLICT
    assert fx.refused(fx.sub(num_samples=11)) == Refusal.CONFLICT
    assert len(fx.receiver.folded) == 1


def test_a_resend_is_answered_from_the_journal_even_after_its_round_is_too_old(fx: Fixture) -> None:
    first = fx.intake.submit(fx.sub())
    fx.receiver.round = 8  # three rounds on: a new update on that base would be stale
    assert fx.intake.submit(fx.sub()) == SubmitResult(update_cid=first.update_cid, round=5, duplicate=True)
    assert fx.refused(fx.sub(value=2.5)) == Refusal.CONFLICT


def test_a_submission_that_loses_the_race_to_the_journal_is_answered_as_a_resend(tmp_path: Path) -> None:
    """Two submissions for one (agent, base) both pass the early check; the journal keeps the first
    recorded, and the other is answered from it: a duplicate if it is the same update, else a conflict."""
    racing: list[Submission] = []

    def admit(sub: Submission) -> None:
        if racing:  # the other submission lands between this one's early check and its journal write
            fixture.intake.submit(racing.pop())

    fixture = Fixture(tmp_path, admit=admit)
    racing.append(fixture.sub())
    result = fixture.intake.submit(fixture.sub())
    winner = fixture.journal.find_update("a1", fixture.bases[5])
    assert result == SubmitResult(update_cid=winner.update_cid, round=5, duplicate=True)

    racing.append(fixture.sub("a2", value=2.5))
    assert fixture.refused(fixture.sub("a2")) == Refusal.CONFLICT
    assert fixture.journal.find_update("a2", fixture.bases[5]).weights_cid == cid_of(fixture.sub("a2", value=2.5).weights)
    assert [u.agent_id for u, _ in fixture.receiver.folded] == ["a1", "a2"]
    fixture.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round_": 9}, Refusal.UNKNOWN_BASE),
        ({"federation": "mnist"}, Refusal.UNKNOWN_FEDERATION),
        ({"kind": "cluster"}, Refusal.BAD_HEADER),
        ({"agent": ""}, Refusal.BAD_HEADER),
        ({"num_samples": 0}, Refusal.BAD_HEADER),
        ({"weights_cid": cid_of(b"other bytes")}, Refusal.HASH_MISMATCH),
        ({"weights": b"\x00" * ((1 << 20) + 1)}, Refusal.TOO_LARGE),
        ({"weights": b"\x00" * 64}, Refusal.INVALID_SAFETENSORS),
        ({"weights": encode_tensors({W: np.ones(5, np.float32)})}, Refusal.SHAPE_MISMATCH),
        ({"value": float("nan")}, Refusal.NOT_FINITE),
        ({"value": 1e3}, Refusal.NORM_BOUND),
        ({"manifest": b"{"}, Refusal.BAD_MANIFEST),
    ],
    ids=[
        "unknown base", "federation", "kind", "no agent", "no samples", "hash", "size", "garbage", "shape", "nan", "norm",
        "manifest",
    ],
)
def test_refusals_keep_their_reason_and_fold_nothing(fx: Fixture, change: dict, reason: Refusal) -> None:
    sub = fx.sub(**change)
    assert fx.refused(sub) == reason
    assert fx.journal.refusal_counts(5) == {reason.value: 1}
    assert fx.receiver.folded == [] and fx.journal.accepted_count() == 0
    assert not fx.store.has(cid_of(sub.weights))


def test_a_refusal_before_the_receiver_has_a_round_is_journaled_under_round_zero(fx: Fixture) -> None:
    fx.receiver.round = None
    assert fx.refused(fx.sub(federation="mnist")) == Refusal.UNKNOWN_FEDERATION
    assert fx.journal.refusal_counts(0) == {"unknown_federation": 1}


def test_acceptance_and_refusal_are_logged_as_one_event_each(fx: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="strata.intake"):
        result = fx.intake.submit(fx.sub(round_=4))
        fx.refused(fx.sub("a2", value=float("nan")))
    accepted, refused = [r for r in caplog.records if r.name == "strata.intake"]
    assert accepted.getMessage() == "update_accepted"
    assert accepted.fields == {
        "agent": "a1", "round": 5, "staleness": 1, "num_samples": 10, "tensors": 1, "update": result.update_cid,
        "accepted": 1,
    }  # fmt: skip
    assert refused.getMessage() == "update_refused"
    assert refused.fields == {"agent": "a2", "round": 5, "reason": "not_finite", "message": "tensor 'w' contains NaN or infinite values"}


def test_a_partial_update_is_validated_against_the_tensors_it_declares(tmp_path: Path) -> None:
    fixture = Fixture(tmp_path, base={**BASE_TENSORS, "head": np.zeros(2, np.float32)})
    sub = fixture.sub(weights=encode_tensors({"head": np.ones(2, np.float32)}), tensors=("head",))
    fixture.intake.submit(sub)
    (update, tensors) = fixture.receiver.folded[0]
    assert update.tensors == ("head",) and list(tensors) == ["head"]
    fixture.close()


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
        if sub.agent_id == "late":
            raise UpdateRefused("backlog full", reason=Refusal.UPSTREAM_UNAVAILABLE)

    fixture = Fixture(tmp_path, admit=full)
    sub = fixture.sub("late")
    assert fixture.refused(sub) == Refusal.UPSTREAM_UNAVAILABLE
    assert not fixture.store.has(cid_of(sub.weights))
    assert not fixture.intake.submit(fixture.sub("early", value=2.0)).duplicate
    fixture.close()


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


class _MeetingStore(LocalStore):
    """A store whose weights writes wait for each other: two submissions of the same new bytes both
    find the store without them, then both write (a race made deterministic)."""

    def __init__(self, root: Path, weights_cid: str) -> None:
        super().__init__(root)
        self._weights_cid = weights_cid
        self.meeting = threading.Barrier(2, timeout=10)

    def put(self, data, *, cid=None):  # type: ignore[no-untyped-def]
        if cid == self._weights_cid:
            self.meeting.wait()
        return super().put(data, cid=cid)


def test_a_refused_twin_never_deletes_the_blob_an_accepted_update_journaled(tmp_path: Path) -> None:
    weights = encode_tensors({W: np.full(4, 1.5, np.float32)})
    store = _MeetingStore(tmp_path / "store", cid_of(weights))
    fx = Fixture(tmp_path, store=store)
    good = fx.sub("good", weights=weights)
    # the same bytes under a manifest that disagrees with its header: refused after its blob is written
    twin = fx.sub("twin", weights=weights)
    forged = dataclasses.replace(
        twin, manifest=Manifest.from_bytes(update_manifest_bytes(fx, good)).to_bytes()
    )
    results: dict[str, object] = {}

    def submit(name: str, sub: Submission) -> None:
        try:
            results[name] = fx.intake.submit(sub)
        except UpdateRefused as refusal:
            results[name] = refusal.reason

    threads = [threading.Thread(target=submit, args=("good", good)), threading.Thread(target=submit, args=("twin", forged))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results["twin"] == Refusal.BAD_MANIFEST and isinstance(results["good"], SubmitResult)
    assert store.get(cid_of(weights)) == weights  # the accepted update's weights are still there
    fx.intake.close()


def update_manifest_bytes(fx: Fixture, sub: Submission) -> bytes:
    """A manifest signed for `sub` (as its agent would send it)."""
    from intake.submission import update_manifest

    return update_manifest(
        sub, cid_of(sub.weights), federation="digits", recorder="x", key=KeyPair.generate(), clock=lambda: 0.0
    ).to_bytes()


def test_an_update_whose_discount_rounds_its_weight_to_nothing_is_refused_stale(tmp_path: Path) -> None:
    steep = make_discount("exponential", half_life=0.001)  # passes the one-round probe, gives 0.0 at two
    fx = Fixture(tmp_path, discount=steep)
    reason = fx.refused(fx.sub(round_=3))
    assert reason == Refusal.STALE and fx.receiver.folded == [] and fx.journal.accepted_count() == 0
    fx.intake.close()
