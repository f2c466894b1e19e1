"""Robust rules, server optimizers and sample-count claims through a real RoundManager (store + journal)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.rules import make_strategy
from intake.submission import Submission
from proto.errors import Refusal, UpdateRefused
from storage.codec import encode_tensors
from storage.lineage import walk
from storage.manifest import MAX_METRICS
from strata import render
from tests.test_rounds import Rounds, W


def _close(rounds: Rounds, values: list[float], samples: list[int] | None = None):
    for i, value in enumerate(values):
        rounds.submit(f"a{i}", value, 10 if samples is None else samples[i])
    cluster = rounds.manager.maybe_close(active_trainers=len(values))
    assert cluster is not None
    return cluster


def test_a_median_round_ignores_two_outliers_and_says_which_rule_made_the_model(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, strategy=make_strategy("median"), quorum=1.0)
    try:
        cluster = _close(rounds, [1.0, 2.0, 3.0, 100.0, -100.0])
        np.testing.assert_array_equal(rounds.tensors(cluster.cid), [2.0, 2.0])
        assert cluster.algorithm["name"] == "median" and len(cluster.parents) == 5
    finally:
        rounds.close()


def test_krum_refusals_name_the_agents_in_the_cluster_manifest(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, strategy=make_strategy("multi_krum", {"f": 2, "m": 3}), quorum=1.0)
    try:
        cluster = _close(rounds, [1.0, 2.0, 3.0, 100.0, -100.0])
        np.testing.assert_allclose(rounds.tensors(cluster.cid), [2.0, 2.0])
        assert cluster.algorithm["params"] == {"f": 2, "m": 3}
        refused = cluster.extra["aggregation"]["refused"]
        assert {r["agent"] for r in refused} == {"a3", "a4"}
        assert all(r["reason"] == "krum_not_selected" for r in refused)
        # what `strata model show` and `strata lineage` print for it
        text = render.manifest_text(cluster.cid, cluster)
        assert "rule       multi_krum(f=2,m=3)" in text and "rule did   2 refused (a3, a4)" in text
        tree = render.lineage_tree(render.view_from_graph(walk(rounds.store, cluster.cid)))
        assert "rule=multi_krum(f=2,m=3)" in tree.splitlines()[0]
    finally:
        rounds.close()


def test_a_claim_above_the_maximum_is_capped_and_recorded(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, quorum=1.0, max_num_samples=100)
    try:
        cluster = _close(rounds, [1.0, 4.0], samples=[100, 2**62])
        # without the cap the 2^62 claim would make the cluster exactly 4.0
        np.testing.assert_allclose(rounds.tensors(cluster.cid), [2.5, 2.5])
        assert cluster.num_samples == 200
        capped = cluster.extra["capped_num_samples"]
        assert capped["max"] == 100 and list(capped["claimed"].values()) == [2**62]
        assert "1 sample claim(s) capped at 100" in render.manifest_text(cluster.cid, cluster)
    finally:
        rounds.close()


def test_a_claim_above_the_maximum_is_refused_when_so_configured(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, quorum=1.0, max_num_samples=100, over_max_samples="refuse")
    try:
        with pytest.raises(UpdateRefused) as info:
            rounds.submit("greedy", 1.0, 101)
        assert info.value.reason == Refusal.TOO_MANY_SAMPLES and "above this federation's maximum 100" in str(info.value)
        with pytest.raises(UpdateRefused) as info:
            rounds.submit("overflow", 1.0, 2**63)
        assert info.value.reason == Refusal.BAD_HEADER
        rounds.submit("honest", 1.0, 100)
    finally:
        rounds.close()


@pytest.mark.parametrize(
    ("metrics", "says"),
    [({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, "at most 128"), ({"x" * 129: 1.0}, "name of 129 characters")],
)
def test_metrics_maps_are_bounded(tmp_path: Path, metrics: dict, says: str) -> None:
    rounds = Rounds(tmp_path, quorum=1.0)
    try:
        current = rounds.manager.current
        with pytest.raises(UpdateRefused) as info:
            rounds.manager.intake.submit(
                Submission(
                    agent_id="chatty",
                    round=current.round,
                    base_cid=current.model_cid,
                    num_samples=1,
                    weights=encode_tensors({W: np.ones(2, np.float32)}),
                    federation="digits",
                    metrics=metrics,
                )
            )
        assert info.value.reason == Refusal.BAD_METRICS and says in str(info.value)
    finally:
        rounds.close()


def test_server_optimizer_state_survives_a_restart(tmp_path: Path) -> None:
    def strategy():
        return make_strategy("trimmed_mean", {"beta": 0.2}, server_opt="fedadam", server_opt_params={"lr": 0.5})

    rounds = Rounds(tmp_path, strategy=strategy(), quorum=1.0)
    try:
        first = _close(rounds, [1.0, 1.0, 1.0])
        assert first.algorithm["server_opt"]["name"] == "fedadam"
        assert first.extra["aggregation"]["server_opt"]["step"] == 1
        rounds.strategy = strategy()  # a fresh process: no state in memory
        rounds.restart()
        assert rounds.strategy.optimizer.t == 1  # resumed from the last cluster manifest
        second = _close(rounds, [2.0, 2.0, 2.0])
        assert second.extra["aggregation"]["server_opt"]["step"] == 2
        assert render.rule_of(second) == "trimmed_mean(beta=0.2)+fedadam(beta1=0.9,beta2=0.99,lr=0.5,tau=1e-09)"
    finally:
        rounds.close()


def test_an_inflated_claim_below_the_maximum_is_rescaled_against_the_rounds_median(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, quorum=1.0, max_claim_ratio=10)
    try:
        cluster = _close(rounds, [1.0, 1.0, 1.0, 4.0], samples=[100, 100, 100, 100_000])
        # credited 100, 100, 100 and 10 x 100: (300 x 1 + 1000 x 4) / 1300; unrescaled it would be ~3.99
        np.testing.assert_allclose(rounds.tensors(cluster.cid), [4300 / 1300] * 2, rtol=1e-6)
        assert cluster.num_samples == 1300
        rescaled = cluster.extra["rescaled_num_samples"]
        assert rescaled["ratio"] == 10 and rescaled["median_per_contributor"] == 100
        (entry,) = rescaled["claims"].values()
        assert entry == {"claimed": 100_000, "credited": 1000, "agent": "a3"}
        assert "1 sample claim(s) lowered to 10 x the round's median (a3)" in render.manifest_text(cluster.cid, cluster)
        assert rounds.manager.history()[0].num_samples == 1300
    finally:
        rounds.close()


@pytest.mark.parametrize(
    ("rule", "params", "expected"),
    [
        # the weighted average of every update: (4 x 100 x 1.0 + 200 x 1.2) / 600
        ("multi_krum", {"f": 1, "m": 5}, 640 / 600),
        ("clipped_fedavg", {"tau": 2.0}, 640 / 600),  # nothing exceeds 2 x the median change
        # the honest updates hold 400 of 600 credited samples, a weighted majority: the median is theirs
        ("geomed", {"iterations": 50}, 1.0),
    ],
)
def test_every_weighted_rule_sees_the_rescaled_claims(tmp_path: Path, rule: str, params: dict, expected: float) -> None:
    def run(ratio: float) -> np.ndarray:  # ratio 2: the inflated claim is credited 2 x 100
        rounds = Rounds(tmp_path / f"{rule}-{ratio}", strategy=make_strategy(rule, params), quorum=1.0, max_claim_ratio=ratio)
        try:
            cluster = _close(rounds, [1.0, 1.0, 1.0, 1.0, 1.2], samples=[100, 100, 100, 100, 10**7])
            assert ("rescaled_num_samples" in cluster.extra) == (ratio > 0)
            return rounds.tensors(cluster.cid)
        finally:
            rounds.close()

    rescaled, raw = run(2.0), run(0.0)
    if expected is not None:
        np.testing.assert_allclose(rescaled, [expected] * 2, rtol=1e-6)
    assert np.all(np.abs(rescaled - 1.0) < np.abs(raw - 1.0) - 1e-3)


def _submit_relay(rounds: Rounds, relay: str, value: float, num_samples: int, devices: int) -> None:
    current = rounds.manager.current
    # a relay's combined update names its devices' updates as parents (here stand-in blobs)
    parents = tuple(rounds.store.put(f"{relay}-device-{i}".encode()) for i in range(devices))
    rounds.manager.intake.submit(
        Submission(
            agent_id=relay,
            round=current.round,
            base_cid=current.model_cid,
            num_samples=num_samples,
            weights=encode_tensors({W: np.full(2, value, np.float32)}),
            federation="digits",
            kind="relay",
            parents=parents,
        )
    )


def test_a_relays_claim_is_rescaled_per_device_it_names(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, quorum=1.0, max_claim_ratio=10)
    try:
        for i in range(3):
            rounds.submit(f"a{i}", 1.0, 100)
        _submit_relay(rounds, "relay-honest", 1.0, 1500, devices=5)  # 300 per device: within 10 x 100
        _submit_relay(rounds, "relay-greedy", 1.0, 1500, devices=1)  # one device claiming 1500: credited 1000
        cluster = rounds.manager.maybe_close(active_trainers=5)
        assert cluster is not None
        assert cluster.num_samples == 300 + 1500 + 1000
        claims = cluster.extra["rescaled_num_samples"]["claims"]
        assert [(c["agent"], c["claimed"], c["credited"]) for c in claims.values()] == [("relay-greedy", 1500, 1000)]
    finally:
        rounds.close()
