"""Which peers a synthesis asks: `synthesis.peers` all, random:K, and exp:K (the exponential graph).

Pure functions and a synthesizer's peer choice; nothing here needs a peer to answer
(the gather path is covered by tests/test_synthesis.py with real PeerServices).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import SynthesisSettings
from aggregator.peers import GrpcPeerAccess
from aggregator.synthesis import SemiGlobalSynthesizer, exponential_peers
from coordinator.ring import Member, Ring
from proto.errors import ConfigError
from storage.keys import KeyPair
from storage.store import LocalStore


def _members(n: int) -> list[Member]:
    return [Member(id=f"agg-{i:02d}", address=f"127.0.0.1:{20000 + i}") for i in range(n)]


def _pull_average(values: dict[str, float], choose: object, rounds: int) -> dict[str, float]:
    """Each round every member replaces its value by the plain mean of its own and its chosen peers'."""
    for round_ in range(rounds):
        values = {
            own: (values[own] + sum(values[p.id] for p in choose(own, round_))) / (1 + len(choose(own, round_)))  # type: ignore[operator]
            for own in values
        }
    return values


def test_hops_double_and_rotate_with_the_round() -> None:
    members = _members(8)
    hops = [[int(p.id[-2:]) for p in exponential_peers(members, "agg-00", r, 1)] for r in range(4)]
    assert hops == [[1], [2], [4], [1]]
    two = [[int(p.id[-2:]) for p in exponential_peers(_members(10), "agg-09", r, 2)] for r in range(3)]
    # 10 members: hops 1, 2, 4, 8 two at a time, from the last member (wrapping around)
    assert two == [[0, 1], [3, 7], [0, 1]]


def test_every_member_is_asked_as_often_as_it_asks() -> None:
    for n, count in ((8, 1), (10, 2), (7, 1), (10, 3)):
        members = _members(n)
        for round_ in range(5):
            asked = [p.id for m in members for p in exponential_peers(members, m.id, round_, count)]
            assert all(len(exponential_peers(members, m.id, round_, count)) == min(count, (n - 1).bit_length())
                       for m in members)
            assert sorted(asked) == sorted(m.id for m in members for _ in range(min(count, (n - 1).bit_length())))
            assert all(p.id != m.id for m in members for p in exponential_peers(members, m.id, round_, count))


def test_log2_n_rounds_of_pull_averaging_give_the_exact_mean_where_random_peers_do_not() -> None:
    members = _members(16)
    by_id = {m.id: m for m in members}
    start = {m.id: float(i * i) for i, m in enumerate(members)}
    mean = sum(start.values()) / len(start)

    exp = _pull_average(start, lambda own, r: exponential_peers(members, own, r, 1), rounds=4)
    assert all(v == pytest.approx(mean, abs=1e-9) for v in exp.values())

    rng = random.Random(0)
    picks = {(own, r): rng.sample([m for m in members if m.id != own], 1) for own in by_id for r in range(4)}
    rand = _pull_average(start, lambda own, r: picks[(own, r)], rounds=4)
    assert float(np.std(list(rand.values()))) > 1.0  # random pulls have not mixed in the same 4 rounds


def test_no_peers_outside_the_ring_or_alone() -> None:
    assert exponential_peers(_members(5), "agg-99", 0, 2) == []
    assert exponential_peers(_members(1), "agg-00", 0, 1) == []
    # more hops asked than there are: every hop, once
    assert len(exponential_peers(_members(4), "agg-00", 3, 5)) == 2


@pytest.mark.parametrize("spec", ["exp:0", "exp:", "exp:x", "ring:2", "random:-1", "exp"])
def test_bad_peer_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        SynthesisSettings(peers=spec)


def test_a_synthesizer_with_exp_asks_the_rounds_hop(tmp_path: Path) -> None:
    members = _members(8)
    ring = Ring(members, version=1)
    store = LocalStore(tmp_path / "store")
    try:
        synthesizer = SemiGlobalSynthesizer(
            aggregator_id="agg-03", federation="toy", settings=SynthesisSettings(peers="exp:1"), store=store,
            key=KeyPair.generate(), ring=lambda: ring, peers=GrpcPeerAccess(),
        )
        assert [[p.id for p in synthesizer.select_peers(ring, r)] for r in range(3)] == [["agg-04"], ["agg-05"], ["agg-07"]]
        sampled = SemiGlobalSynthesizer(
            aggregator_id="agg-03", federation="toy", settings=SynthesisSettings(peers="random:2"), store=store,
            key=KeyPair.generate(), ring=lambda: ring, peers=GrpcPeerAccess(), rng=random.Random(1),
        ).select_peers(ring, 0)
        assert len(sampled) == 2 and "agg-03" not in {p.id for p in sampled}
    finally:
        store.close()
