"""Semi-global synthesis against real peers: PeerService servers on loopback serving signed cluster models.

Weighting is checked on a hand-computed case; screening refuses a poisoned (x100)
peer, a tampered manifest, a non-member, a stale model and a dead peer, and
records each refusal in the semi-global manifest.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import SynthesisSettings
from aggregator.peers import GrpcPeerAccess, PeerServicer, Published, pointer_for
from aggregator.synthesis import SemiGlobalSynthesizer, robust_z_scores
from coordinator.ring import Member, Ring
from proto import strata_pb2_grpc as pb_grpc
from proto.serving import ServerHandle, create_server
from storage.codec import decode_tensors, encode_tensors
from storage.keys import KeyPair
from storage.lineage import walk
from storage.manifest import Manifest, Producer
from storage.models import load_model, save_model
from storage.store import LocalStore
from trust.signers import Signers

BASE = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "b": np.array([0.5, -0.5], dtype=np.float32)}


@dataclass
class Peer:
    member: Member
    store: LocalStore
    key: KeyPair
    published: Published
    handle: ServerHandle

    def publish(self, tensors: dict[str, np.ndarray], *, round_: int, num_samples: int) -> Manifest:
        manifest = save_model(
            self.store,
            weights=encode_tensors(tensors),
            kind="cluster",
            federation="toy",
            round=round_,
            producer=Producer(role="aggregator", id=self.member.id),
            key=self.key,
            num_samples=num_samples,
        )
        self.publish_manifest(manifest)
        return manifest

    def publish_manifest(self, manifest: Manifest) -> None:
        self.published.add(manifest)
        self.published.set_latest(pointer_for(manifest, 0.0))


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[dict[str, Peer]]:
    started: dict[str, Peer] = {}
    for name in ("agg-b", "agg-c", "agg-d"):
        store = LocalStore(tmp_path / name)
        published = Published()
        handle = create_server("127.0.0.1:0")
        pb_grpc.add_PeerServiceServicer_to_server(
            PeerServicer(aggregator_id=name, federation="toy", published=published, store=store, offload=handle.offload),
            handle.server,
        )
        handle.start()
        started[name] = Peer(
            member=Member(id=name, address=handle.address), store=store, key=KeyPair.generate(), published=published, handle=handle
        )
    yield started
    for peer in started.values():
        peer.handle.stop(0)
        peer.store.close()


def _synthesizer(
    tmp_path: Path, ring: Ring, *, signers: Signers | None = None, **settings: object
) -> tuple[SemiGlobalSynthesizer, LocalStore, KeyPair]:
    store = LocalStore(tmp_path / "agg-a")
    key = KeyPair.generate()
    synthesizer = SemiGlobalSynthesizer(
        aggregator_id="agg-a",
        federation="toy",
        settings=SynthesisSettings(**{"peer_wait_s": 0.0, **settings}),
        store=store,
        key=key,
        ring=lambda: ring,
        peers=GrpcPeerAccess(),
        signers=signers,
    )
    return synthesizer, store, key


def _own_cluster(store: LocalStore, key: KeyPair, tensors: dict[str, np.ndarray], *, round_: int, num_samples: int) -> Manifest:
    return save_model(
        store,
        weights=encode_tensors(tensors),
        kind="cluster",
        federation="toy",
        round=round_,
        producer=Producer(role="aggregator", id="agg-a"),
        key=key,
        num_samples=num_samples,
    )


def _ring(peers: dict[str, Peer], *names: str) -> Ring:
    return Ring([Member(id="agg-a", address="127.0.0.1:1"), *(peers[n].member for n in names)], version=3)


def test_weighting_matches_a_hand_computed_case(tmp_path: Path, peers: dict[str, Peer]) -> None:
    # own: base + 1 (100 samples, age 0); b: base + 3 (300 samples, age 0); c: base - 2 (200 samples, age 2)
    own = {k: v + 1 for k, v in BASE.items()}
    b = peers["agg-b"].publish({k: v + 3 for k, v in BASE.items()}, round_=4, num_samples=300)
    c = peers["agg-c"].publish({k: v - 2 for k, v in BASE.items()}, round_=2, num_samples=200)
    synthesizer, store, key = _synthesizer(
        tmp_path, _ring(peers, "agg-b", "agg-c"), decay="exponential", decay_params={"half_life": 2.0}, max_age=5
    )
    cluster = _own_cluster(store, key, own, round_=4, num_samples=100)

    semi = synthesizer(cluster, own)

    # weights: own 100 x 1, b 300 x 1, c 200 x 0.5**(2/2) = 100  ->  offsets (100*1 + 300*3 + 100*-2) / 500 = 1.6
    _, weights = load_model(store, semi.cid)
    result = decode_tensors(weights)
    for name, base in BASE.items():
        np.testing.assert_allclose(result[name], base + 1.6, rtol=1e-6)
    assert semi.kind == "semi-global" and semi.round == 4
    assert set(semi.parents) == {cluster.cid, b.cid, c.cid}
    assert semi.num_samples == 600
    assert semi.extra["weights"] == {cluster.cid: 100.0, b.cid: 300.0, c.cid: 100.0}
    assert semi.extra["refused_peers"] == []
    assert (synthesizer.peers_used, dict(synthesizer.peers_refused)) == (len(semi.parents) - 1, {})
    semi.verify_signature()
    # the peers' cluster models were copied in, so the lineage can be walked from this store alone
    graph = walk(store, semi.cid)
    assert graph.ok and set(graph.nodes) == {semi.cid, cluster.cid, b.cid, c.cid}


def test_poisoned_peer_is_screened_out_and_recorded(tmp_path: Path, peers: dict[str, Peer]) -> None:
    own = {k: v + 0.1 for k, v in BASE.items()}
    honest_b = peers["agg-b"].publish({k: v + 0.2 for k, v in BASE.items()}, round_=1, num_samples=100)
    honest_c = peers["agg-c"].publish({k: v - 0.1 for k, v in BASE.items()}, round_=1, num_samples=100)
    poisoned = peers["agg-d"].publish({k: v * 100 for k, v in BASE.items()}, round_=1, num_samples=10_000)
    synthesizer, store, key = _synthesizer(tmp_path, _ring(peers, "agg-b", "agg-c", "agg-d"), decay="constant", decay_params={})
    cluster = _own_cluster(store, key, own, round_=1, num_samples=100)

    semi = synthesizer(cluster, own)

    assert poisoned.cid not in semi.parents
    assert set(semi.parents) == {cluster.cid, honest_b.cid, honest_c.cid}
    refused = {r["cid"]: r for r in semi.extra["refused_peers"]}
    assert refused[poisoned.cid]["producer"] == "agg-d"
    assert refused[poisoned.cid]["reason"] in ("outlier", "norm_outlier")
    _, weights = load_model(store, semi.cid)
    np.testing.assert_allclose(decode_tensors(weights)["w"], BASE["w"] + (0.1 + 0.2 - 0.1) / 3, rtol=1e-5)


def test_robust_z_flags_the_far_vector_among_many() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.normal(0, 0.01, 50) + 1.0 for _ in range(5)] + [np.full(50, 3.0)]
    scores = robust_z_scores(vectors)
    assert scores[-1] > 3.5 and (scores[:-1] < 3.5).all()


def test_tampered_non_member_stale_and_dead_peers_are_refused(tmp_path: Path, peers: dict[str, Peer]) -> None:
    own = {k: v + 0.1 for k, v in BASE.items()}
    # agg-b: a manifest whose signature was altered (re-serialized with a bad signature)
    good = peers["agg-b"].publish({k: v + 0.2 for k, v in BASE.items()}, round_=3, num_samples=100)
    bad_signature = dict(good.signature)
    bad_signature["sig"] = KeyPair.generate().sign(b"something else")
    tampered = Manifest.from_json({**good.to_json(), "signature": bad_signature})
    peers["agg-b"].store.put(tampered.to_bytes())
    peers["agg-b"].publish_manifest(tampered)
    # agg-c: signed by a producer that is not on the ring
    outsider = save_model(
        peers["agg-c"].store,
        weights=encode_tensors(own),
        kind="cluster",
        federation="toy",
        round=3,
        producer=Producer(role="aggregator", id="agg-x"),
        key=peers["agg-c"].key,
        num_samples=50,
    )
    peers["agg-c"].publish_manifest(outsider)
    # agg-d: far too old, then its server dies
    peers["agg-d"].publish(own, round_=0, num_samples=10)
    synthesizer, store, key = _synthesizer(tmp_path, _ring(peers, "agg-b", "agg-c", "agg-d"), max_age=2)
    cluster = _own_cluster(store, key, own, round_=3, num_samples=100)

    semi = synthesizer(cluster, own)
    reasons = {r["producer"]: r["reason"] for r in semi.extra["refused_peers"]}
    assert reasons == {"agg-b": "bad_signature", "agg-c": "not_member", "agg-d": "stale"}
    assert semi.parents == (cluster.cid,)

    peers["agg-d"].handle.stop(0)
    semi = synthesizer(cluster, own)
    reasons = {r["producer"]: r["reason"] for r in semi.extra["refused_peers"]}
    assert reasons["agg-d"] == "unavailable"
    # what /metrics reports (strata_aggregator_synthesis_peers_*): the two syntheses' refusals, by reason
    assert synthesizer.peers_used == 0
    assert dict(synthesizer.peers_refused) == {"bad_signature": 2, "not_member": 2, "stale": 1, "unavailable": 1}


def test_waits_briefly_for_a_peer_still_closing_the_same_round(tmp_path: Path, peers: dict[str, Peer]) -> None:
    own = {k: v + 1 for k, v in BASE.items()}
    peers["agg-b"].publish({k: v + 5 for k, v in BASE.items()}, round_=2, num_samples=100)
    synthesizer, store, key = _synthesizer(tmp_path, _ring(peers, "agg-b"), decay="constant", decay_params={}, peer_wait_s=5.0)
    cluster = _own_cluster(store, key, own, round_=3, num_samples=100)
    timer = threading.Timer(0.5, lambda: peers["agg-b"].publish({k: v + 3 for k, v in BASE.items()}, round_=3, num_samples=100))
    timer.start()
    try:
        semi = synthesizer(cluster, own)
    finally:
        timer.join()
    assert semi.extra["peer_rounds"] and set(semi.extra["peer_rounds"].values()) == {3}
    _, weights = load_model(store, semi.cid)
    np.testing.assert_allclose(decode_tensors(weights)["w"], BASE["w"] + 2.0, rtol=1e-6)


def test_a_device_update_is_never_published(tmp_path: Path) -> None:
    """FetchBlob serves what is published; a device update cannot be, so its CIDs never are."""
    from proto.errors import InvalidInput

    with LocalStore(tmp_path / "s") as store:
        for kind in ("local", "relay"):
            update = save_model(
                store, weights=encode_tensors(BASE), kind=kind, federation="toy", round=0,
                producer=Producer(role="agent", id="a1"), key=KeyPair.generate(),
            )  # fmt: skip
            published = Published()
            with pytest.raises(InvalidInput, match="device update"):
                published.add(update)
            assert update.cid not in published and update.weights not in published


def test_with_a_fleet_ca_only_certified_ring_members_count(tmp_path: Path, peers: dict[str, Peer]) -> None:
    """With TLS, a peer's cluster model counts only if its embedded certificate is a current one of the fleet
    CA, certifying the signing key for aggregator <producer>, the ring member asked."""
    from trust.ca import FleetCA
    from trust.identity import Identity, Role

    with FleetCA.init(tmp_path / "ca", "testfleet") as ca:

        def certified(name: str, key: KeyPair) -> KeyPair:
            bundle = ca.issue(Identity(Role.AGGREGATOR, name), key)
            return key.with_certificate(bundle.cert_pem.decode())

        own = {k: v + 0.1 for k, v in BASE.items()}
        # agg-b: honest, signed with its certified key
        peers["agg-b"].key = certified("agg-b", peers["agg-b"].key)
        honest = peers["agg-b"].publish({k: v + 0.2 for k, v in BASE.items()}, round_=1, num_samples=100)
        # agg-c's pointer names a model "by agg-c" that a non-member, agg-x, signed with its own certified key
        outsider_key = certified("agg-x", KeyPair.generate())
        impostor = save_model(
            peers["agg-c"].store, weights=encode_tensors(own), kind="cluster", federation="toy", round=1,
            producer=Producer(role="aggregator", id="agg-c"), key=outsider_key, num_samples=50,
        )  # fmt: skip
        peers["agg-c"].publish_manifest(impostor)
        # agg-d: a member, but signing with a bare key: nothing certifies it
        peers["agg-d"].publish({k: v - 0.1 for k, v in BASE.items()}, round_=1, num_samples=100)
        synthesizer, store, key = _synthesizer(
            tmp_path, _ring(peers, "agg-b", "agg-c", "agg-d"), signers=Signers(ca.cert), decay="constant", decay_params={}
        )
        cluster = _own_cluster(store, certified("agg-a", key), own, round_=1, num_samples=100)

        semi = synthesizer(cluster, own)

    refused = {r["producer"]: r for r in semi.extra["refused_peers"]}
    assert {p: r["reason"] for p, r in refused.items()} == {"agg-c": "uncertified_signer", "agg-d": "uncertified_signer"}
    assert "not_producer" in refused["agg-c"]["message"] and "agg-x" in refused["agg-c"]["message"]
    assert "uncertified" in refused["agg-d"]["message"]
    assert set(semi.parents) == {cluster.cid, honest.cid}


@pytest.mark.parametrize(
    ("strategy", "params"), [("fedavg", {}), ("median", {}), ("multi_krum", {"f": 1}), ("geomed", {"iterations": 20})]
)
def test_a_poisoned_peer_model_that_passes_screening_stays_out_under_a_robust_rule(
    tmp_path: Path, peers: dict[str, Peer], strategy: str, params: dict
) -> None:
    """A malicious aggregator publishes base + 100x an honest change: its norm is within 10x of ours
    and four models are too few for the z-score, so screening lets it through; a robust rule must not."""
    change = 0.1
    own = {k: v + change for k, v in BASE.items()}
    peers["agg-b"].publish({k: v + 2 * change for k, v in BASE.items()}, round_=1, num_samples=100)
    peers["agg-c"].publish({k: v - change for k, v in BASE.items()}, round_=1, num_samples=100)
    poisoned = peers["agg-d"].publish({k: v + 100 * change for k, v in BASE.items()}, round_=1, num_samples=100)
    synthesizer, store, key = _synthesizer(
        tmp_path, _ring(peers, "agg-b", "agg-c", "agg-d"), decay="constant", decay_params={}, strategy=strategy, strategy_params=params
    )
    cluster = _own_cluster(store, key, own, round_=1, num_samples=100)

    semi = synthesizer(cluster, own)

    described = semi.algorithm["strategy"]
    assert described["name"] == strategy and params.items() <= described["params"].items()
    offset = decode_tensors(load_model(store, semi.cid)[1])["w"] - BASE["w"]
    if strategy == "fedavg":  # the control: screening alone does not catch it
        assert poisoned.cid in semi.parents and np.all(offset > 2)
        return
    assert np.all(offset <= 2 * change + 1e-3) and np.all(offset >= -change - 1e-3)  # within the honest range
    if strategy == "multi_krum":  # left out entirely, and said so
        assert poisoned.cid not in semi.parents
        (refusal,) = semi.extra["refused_peers"]
        assert (refusal["cid"], refusal["reason"]) == (poisoned.cid, "rejected_by_rule")
    if strategy == "geomed":
        assert semi.extra["aggregation"]["coefficients"][poisoned.cid] < 0.05


def test_an_inflated_peer_sample_count_is_capped_at_ten_times_the_median(tmp_path: Path, peers: dict[str, Peer]) -> None:
    own = {k: v + 1 for k, v in BASE.items()}
    peers["agg-b"].publish({k: v + 3 for k, v in BASE.items()}, round_=1, num_samples=100)
    greedy = peers["agg-c"].publish({k: v - 2 for k, v in BASE.items()}, round_=1, num_samples=2**62)
    synthesizer, store, key = _synthesizer(tmp_path, _ring(peers, "agg-b", "agg-c"), decay="constant", decay_params={})
    cluster = _own_cluster(store, key, own, round_=1, num_samples=100)

    semi = synthesizer(cluster, own)

    # counts 100, 100, 2^62: median 100, so the claim is credited with 1000
    assert semi.extra["capped_peer_samples"] == {greedy.cid: 2**62}
    assert semi.num_samples == 1200
    offset = decode_tensors(load_model(store, semi.cid)[1])["w"] - BASE["w"]
    np.testing.assert_allclose(offset, (100 * 1 + 100 * 3 + 1000 * -2) / 1200, rtol=1e-5)


class _CountingAccess(GrpcPeerAccess):
    """The real peer access, counting how often the synthesizer asked for a peer's pointer."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def latest(self, member: Member, timeout_s: float):  # noqa: ANN201
        self.asked += 1
        return super().latest(member, timeout_s)


def test_a_buffered_aggregator_blends_what_a_peer_last_made_without_waiting(tmp_path: Path, peers: dict[str, Peer]) -> None:
    """Buffered round numbers count each aggregator's own steps: a peer at step 2 while we are at step 30 is
    not behind, so its model is blended at once (one pointer request), whatever peer_wait_s says."""
    peers["agg-b"].publish({k: v + 5 for k, v in BASE.items()}, round_=2, num_samples=100)
    store, key, access = LocalStore(tmp_path / "agg-a"), KeyPair.generate(), _CountingAccess()
    synthesizer = SemiGlobalSynthesizer(
        aggregator_id="agg-a",
        federation="toy",
        settings=SynthesisSettings(peer_wait_s=600.0, decay="constant", decay_params={}, decay_unit="seconds", max_age=1e12),
        store=store,
        key=key,
        ring=lambda: _ring(peers, "agg-b"),
        peers=access,
        wait_for_peers=False,
    )
    own = {k: v + 1 for k, v in BASE.items()}
    try:
        semi = synthesizer(_own_cluster(store, key, own, round_=30, num_samples=100), own)
        assert access.asked == 1
        assert set(semi.extra["peer_rounds"].values()) == {2}
        np.testing.assert_allclose(decode_tensors(load_model(store, semi.cid)[1])["w"], BASE["w"] + 3.0, rtol=1e-6)
    finally:
        store.close()
