"""Differential privacy: the mechanisms' statistics, the accountant against the library, local DP
on the device, central DP and the budget in a real RoundManager (real store, real journal)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from agent.privacy import apply_local_dp
from agent.submit import local_update
from aggregator.config import AggregatorConfig
from aggregator.rules import make_strategy
from aggregator.strategies import Strategy
from intake.submission import Submission
from privacy import (
    AdaptiveClip,
    LocalDp,
    PrivacyEvent,
    PrivacySettings,
    add_gaussian_noise,
    clip_delta,
    delta_norm,
    effective_noise_multiplier,
    epsilon_of,
    privatize_update,
)
from privacy.config import CentralDpSettings, LocalDpSettings
from proto.errors import ConfigError, InvalidInput, Refusal, UpdateRefused
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.models import load_model
from tests.test_rounds import Rounds

RNG_SEED = 1234


def _base() -> dict[str, np.ndarray]:
    return {"a": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32), "steps": np.array([7], np.int64)}


def _update(scale: float) -> dict[str, np.ndarray]:
    base = _base()
    return {"a": base["a"] + scale, "b": base["b"] - scale, "steps": np.array([9], np.int64)}


# ------------------------------------------------------------------ mechanisms


def test_clip_scales_a_long_delta_onto_the_ball_and_leaves_a_short_one_alone() -> None:
    base, long_update = _base(), _update(2.0)
    before = {k: v.copy() for k, v in long_update.items()}
    norm = delta_norm(base, long_update)
    assert norm == pytest.approx(2.0 * math.sqrt(17))
    clipped, reported = clip_delta(base, long_update, clip=1.0)
    assert reported == pytest.approx(norm)
    assert delta_norm(base, clipped) == pytest.approx(1.0, rel=1e-6)
    # the direction is kept, integer tensors pass through, inputs are untouched
    np.testing.assert_allclose(clipped["a"] - base["a"], (long_update["a"] - base["a"]) / norm, rtol=1e-6)
    assert clipped["steps"].tolist() == [9] and clipped["a"].dtype == np.float32
    for name, array in before.items():
        np.testing.assert_array_equal(long_update[name], array)
    short = _update(0.01)
    unchanged, _ = clip_delta(base, short, clip=1.0)
    np.testing.assert_array_equal(unchanged["a"], short["a"])
    with pytest.raises(ValueError):
        clip_delta(base, short, clip=0.0)


def test_gaussian_noise_has_the_asked_std_and_zero_mean() -> None:
    zeros = {"x": np.zeros(200_000, np.float32), "n": np.array([3], np.int32)}
    noised = add_gaussian_noise(zeros, 0.5, np.random.default_rng(RNG_SEED))
    assert abs(float(noised["x"].mean())) < 0.01
    assert float(noised["x"].std()) == pytest.approx(0.5, rel=0.01)
    assert noised["n"].tolist() == [3] and not zeros["x"].any()


def test_privatized_update_is_clipped_then_noised_with_std_sigma_times_clip() -> None:
    base = {"x": np.zeros(100_000, np.float32)}
    update = {"x": np.full(100_000, 1.0, np.float32)}  # norm ≈ 316, far past the clip
    out, norm = privatize_update(base, update, clip=2.0, noise_multiplier=0.01, rng=np.random.default_rng(RNG_SEED))
    assert norm == pytest.approx(math.sqrt(100_000), rel=1e-6)
    clipped_value = 2.0 / math.sqrt(100_000)
    residual = out["x"].astype(np.float64) - clipped_value
    assert float(residual.std()) == pytest.approx(0.02, rel=0.02)
    assert abs(float(residual.mean())) < 0.001


def test_effective_noise_multiplier_spends_exactly_the_budget_with_the_count() -> None:
    sigma, count_std = 1.0, 2.0
    update_sigma = effective_noise_multiplier(sigma, count_std)
    assert update_sigma**-2 + (2 * count_std) ** -2 == pytest.approx(sigma**-2)
    assert update_sigma > sigma
    with pytest.raises(ValueError):
        effective_noise_multiplier(1.0, 0.5)
    assert effective_noise_multiplier(0.0, 1.0) == 0.0


def test_adaptive_clip_moves_towards_the_target_quantile() -> None:
    rule = AdaptiveClip(target_quantile=0.5, learning_rate=0.2)
    rng = np.random.default_rng(RNG_SEED)
    down, fraction = rule.next_clip(1.0, count=10, unclipped=10, rng=rng)  # everyone under C: C is too large
    assert fraction == 1.0 and down == pytest.approx(math.exp(-0.1))
    up, _ = rule.next_clip(1.0, count=10, unclipped=0, rng=rng)
    assert up == pytest.approx(math.exp(0.1))
    steady, _ = rule.next_clip(1.0, count=10, unclipped=5, rng=rng)
    assert steady == pytest.approx(1.0)
    # converges to the median of a fixed set of norms
    norms, clip = np.linspace(0.1, 10.0, 101), 0.01
    for _ in range(400):
        clip, _ = rule.next_clip(clip, count=len(norms), unclipped=int((norms <= clip).sum()), rng=rng)
    assert clip == pytest.approx(float(np.median(norms)), rel=0.1)


# ------------------------------------------------------------------ accounting


def test_epsilon_matches_the_library_and_grows_with_rounds_and_shrinks_with_noise() -> None:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.5), 20)
    direct = accountant.get_epsilon(1e-5)
    assert epsilon_of([PrivacyEvent(1.5, count=20)], 1e-5) == pytest.approx(direct, rel=0.02)
    by_rounds = [epsilon_of([PrivacyEvent(1.5, count=r)], 1e-5) for r in (1, 2, 5, 10, 50)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds)
    by_noise = [epsilon_of([PrivacyEvent(s, count=10)], 1e-5) for s in (0.8, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True)
    sampled = epsilon_of([PrivacyEvent(1.5, 0.1, 20)], 1e-5)
    assert sampled < direct  # amplification by (Poisson) subsampling
    assert epsilon_of([], 1e-5) == 0.0
    assert epsilon_of([PrivacyEvent(0.0)], 1e-5) == math.inf


# ------------------------------------------------------------------ local DP on the device


def test_local_dp_follows_the_round_config_and_records_what_it_did() -> None:
    base, update = _base(), _update(3.0)
    passthrough, record = apply_local_dp(base, update, {"epochs": "1"})
    assert record is None and passthrough["a"] is update["a"]
    config = PrivacySettings(local=LocalDpSettings(clip=0.5, noise_multiplier=0.0)).round_config()
    clipped, record = apply_local_dp(base, update, config, rng=np.random.default_rng(RNG_SEED))
    assert record == {"mechanism": "gaussian", "clip": 0.5, "noise_multiplier": 0.0}
    assert delta_norm(base, clipped) == pytest.approx(0.5, rel=1e-6)
    # a partial update: only the tensors sent are clipped, the norm is theirs
    partial, _ = apply_local_dp(base, update, config, tensors=["a"])
    assert delta_norm({"a": base["a"]}, {"a": partial["a"]}) == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(InvalidInput):
        LocalDp.from_round_config({"dp_clip": "nan"})
    with pytest.raises(InvalidInput):
        LocalDp.from_round_config({"dp_clip": "1", "dp_noise_multiplier": "x"})


def test_privacy_settings_refuse_incoherent_values() -> None:
    with pytest.raises(ConfigError):
        LocalDpSettings(clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError):
        CentralDpSettings(clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError):
        CentralDpSettings(clip=1.0, noise_multiplier=1.0, adaptive=True, clipped_count_stddev=0.4)
    with pytest.raises(ConfigError):
        PrivacySettings(delta=0.0)


# ------------------------------------------------------------------ central DP and the budget in a RoundManager


class PrivateRounds(Rounds):
    def __init__(self, tmp_path: Path, privacy: PrivacySettings, **settings) -> None:
        super().__init__(tmp_path, privacy=privacy, **settings)

    def submit_declared(self, agent: str, value: float, dp: dict | None) -> None:
        """A device update with its own signed manifest, declaring `dp` (None: no local DP)."""
        current = self.manager.current
        base_manifest, _ = load_model(self.store, current.model_cid)
        pending, blob = local_update(
            {"w": np.full(2, value, np.float32)},
            base=base_manifest,
            federation="digits",
            round=current.round,
            agent_id=agent,
            key=KeyPair.generate(),
            num_samples=10,
            dp=dp,
        )
        self.manager.intake.submit(
            Submission(
                agent_id=agent,
                round=current.round,
                base_cid=current.model_cid,
                num_samples=10,
                weights=blob,
                federation="digits",
                manifest=pending.manifest.encode(),
            )
        )


def _private(tmp_path: Path, *, strategy: Strategy | None = None, **central) -> PrivateRounds:
    return PrivateRounds(
        tmp_path,
        PrivacySettings(target_epsilon=central.pop("target_epsilon", 0.0), central=CentralDpSettings(**central)),
        strategy=strategy,
        quorum=1.0,
        min_updates=1,
    )


def test_central_dp_around_a_robust_rule_takes_the_median_of_the_clipped_deltas(tmp_path: Path) -> None:
    # the median reads updates back from the store unless told otherwise: under DP it must see
    # the clipped deltas, not the stored (unclipped) blobs
    rounds = _private(tmp_path, strategy=make_strategy("median", {}), clip=1.0, noise_multiplier=0.0, seed=7)
    try:
        rounds.submit("a1", 0.1)
        rounds.submit("a2", 5.0)  # clipped to 1/√2 per coordinate
        rounds.submit("a3", 6.0)  # likewise: the unclipped median would be 5
        cluster = rounds.manager.maybe_close(active_trainers=3)
        assert cluster is not None
        np.testing.assert_allclose(rounds.tensors(cluster.cid), 1 / math.sqrt(2), rtol=1e-5)
        assert cluster.algorithm["name"] == "median" and "dp" in cluster.algorithm
    finally:
        rounds.close()


def test_a_server_optimizer_is_not_combined_with_central_dp() -> None:
    with pytest.raises(ConfigError, match="server_opt cannot be combined with central DP"):
        AggregatorConfig(server_opt="fedadam", privacy=PrivacySettings(central=CentralDpSettings(clip=1.0, noise_multiplier=1.0)))


def test_central_dp_clips_each_delta_weighs_devices_equally_and_records_epsilon(tmp_path: Path) -> None:
    rounds = _private(tmp_path, clip=1.0, noise_multiplier=0.0, seed=7)
    try:
        rounds.submit("a1", 10.0, num_samples=1000)  # delta norm 14.1: clipped to 1
        rounds.submit("a2", 0.1, num_samples=1)  # delta norm 0.14: kept
        cluster = rounds.manager.maybe_close(active_trainers=2)
        assert cluster is not None
        # uniform weights over clipped deltas: (1/√2 + 0.1) / 2 per coordinate, whatever the claimed samples
        np.testing.assert_allclose(rounds.tensors(cluster.cid), (1 / math.sqrt(2) + 0.1) / 2, rtol=1e-5)
        record = cluster.extra["privacy"]
        assert record["central"]["clip"] == 1.0 and record["central"]["updates"] == 2
        assert record["epsilon"] is None  # clipping without noise is no DP, and says so (null: no finite ε)
        assert cluster.algorithm["dp"]["central"]["clip"] == 1.0
        (closed,) = rounds.manager.closed_rounds()
        assert closed.extra["privacy"]["central"]["rounds"] == 1
    finally:
        rounds.close()


def test_central_noise_on_the_cluster_sum_has_std_sigma_clip_over_n(tmp_path: Path) -> None:
    rounds = _private(tmp_path, clip=1.0, noise_multiplier=2.0, seed=11)
    try:
        samples: list[float] = []
        for _ in range(50):
            # each update is its base unchanged (delta 0): the cluster model minus its base is the noise alone
            base = rounds.tensors(rounds.manager.current.model_cid)
            for agent in ("a1", "a2"):
                rounds.manager.intake.submit(
                    Submission(
                        agent_id=agent,
                        round=rounds.manager.current.round,
                        base_cid=rounds.manager.current.model_cid,
                        num_samples=10,
                        weights=encode_tensors({"w": base}),
                        federation="digits",
                    )
                )
            cluster = rounds.manager.maybe_close(active_trainers=2)
            assert cluster is not None
            samples.extend((rounds.tensors(cluster.cid).astype(np.float64) - base).tolist())
        # σ·C on the sum of n = 2 deltas: σ·C/n = 1 per coordinate of the mean
        assert float(np.mean(samples)) == pytest.approx(0.0, abs=0.25)
        assert float(np.std(samples)) == pytest.approx(1.0, rel=0.25)
        eps = [r.extra["privacy"]["central"]["epsilon"] for r in rounds.manager.closed_rounds()]
        assert eps == sorted(eps) and eps[0] > 0
        assert eps[-1] == pytest.approx(epsilon_of([PrivacyEvent(2.0, count=50)], 1e-5))
    finally:
        rounds.close()


def test_the_budget_stops_training_with_a_log_line_and_refuses_further_updates(tmp_path: Path, caplog) -> None:
    one_round = epsilon_of([PrivacyEvent(1.0, count=1)], 1e-5)
    two_rounds = epsilon_of([PrivacyEvent(1.0, count=2)], 1e-5)
    rounds = _private(tmp_path, clip=1.0, noise_multiplier=1.0, target_epsilon=(one_round + two_rounds) / 2, seed=3)
    try:
        rounds.submit("a1", 0.1)
        assert rounds.manager.maybe_close(active_trainers=1) is not None
        rounds.submit("a1", 0.1)
        with caplog.at_level(logging.WARNING, logger="strata.aggregator.privacy"):
            assert rounds.manager.maybe_close(active_trainers=1) is None
        # only warnings count: whether INFO lines are captured depends on what set up logging earlier
        assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == ["privacy_budget_spent"]
        assert rounds.manager.current.round == 1 and len(rounds.manager.closed_rounds()) == 1
        with pytest.raises(UpdateRefused) as refused:
            rounds.submit("a2", 0.1)
        assert refused.value.reason == Refusal.PRIVACY_BUDGET_SPENT
        # the ledger comes back from the journal after a restart: still one round spent, still stopped
        rounds.clock.now += 100
        rounds.restart()
        with pytest.raises(UpdateRefused):
            rounds.submit("a3", 0.1)
        assert rounds.manager.maybe_close(active_trainers=1) is None
        assert len(rounds.manager.closed_rounds()) == 1
    finally:
        rounds.close()


def test_adaptive_clip_is_journaled_and_restored(tmp_path: Path) -> None:
    rounds = _private(tmp_path, clip=1.0, noise_multiplier=0.0, adaptive=True, clip_learning_rate=0.5, seed=5)
    try:
        rounds.submit("a1", 0.01)
        rounds.submit("a2", 0.01)
        cluster = rounds.manager.maybe_close(active_trainers=2)
        assert cluster is not None
        central = cluster.extra["privacy"]["central"]
        assert central["next_clip"] < 1.0  # every update was under C, the target is the median
        rounds.restart()
        assert rounds.manager._privacy is not None and rounds.manager._privacy.clip == pytest.approx(central["next_clip"])
    finally:
        rounds.close()


LOCAL = {"mechanism": "gaussian", "clip": 1.0, "noise_multiplier": 1.5}


def test_local_dp_is_counted_per_device(tmp_path: Path) -> None:
    rounds = PrivateRounds(
        tmp_path, PrivacySettings(local=LocalDpSettings(clip=1.0, noise_multiplier=1.5)), quorum=1.0, min_updates=1
    )
    try:
        for agents in (["a1", "a2"], ["a1"], ["a1", "a3"]):
            for agent in agents:
                rounds.submit_declared(agent, 0.1, LOCAL)
            cluster = rounds.manager.maybe_close(active_trainers=len(agents))
            assert cluster is not None
        local = cluster.extra["privacy"]["local"]
        assert local["device_epsilon"]["a1"] == pytest.approx(epsilon_of([PrivacyEvent(1.5, count=3)], 1e-5))
        assert local["device_epsilon"]["a3"] == pytest.approx(epsilon_of([PrivacyEvent(1.5, count=1)], 1e-5))
        assert local["max_device_epsilon"] == local["device_epsilon"]["a1"] == cluster.extra["privacy"]["epsilon"]
        rounds.restart()
        guard = rounds.manager._privacy
        assert guard is not None and len(guard._device["a1"]) == 3 and len(guard._device["a2"]) == 1
    finally:
        rounds.close()


@pytest.mark.parametrize(
    "declared",
    [None, {**LOCAL, "clip": 2.0}, {**LOCAL, "noise_multiplier": 0.5}, {"mechanism": "gaussian"}],
    ids=["none", "larger_clip", "less_noise", "no_numbers"],
)
def test_an_update_without_the_required_local_dp_is_refused(tmp_path: Path, declared: dict | None) -> None:
    rounds = PrivateRounds(
        tmp_path, PrivacySettings(local=LocalDpSettings(clip=1.0, noise_multiplier=1.5)), quorum=1.0, min_updates=1
    )
    try:
        with pytest.raises(UpdateRefused) as refused:
            rounds.submit_declared("a1", 0.1, declared)
        assert refused.value.reason == Refusal.LOCAL_DP_REQUIRED
        with pytest.raises(UpdateRefused) as unsigned:
            rounds.submit("a2", 0.1)  # no manifest at all declares nothing either
        assert unsigned.value.reason == Refusal.LOCAL_DP_REQUIRED
        rounds.submit_declared("a3", 0.1, {**LOCAL, "clip": 0.5, "noise_multiplier": 2.0})  # stronger is fine
        assert rounds.manager.accepted_count == 1
    finally:
        rounds.close()
