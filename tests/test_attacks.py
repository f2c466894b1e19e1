"""The simulator's attacks: each transform's known answer on small arrays, who is hostile, and the
label flip inside a real task."""

from __future__ import annotations

import numpy as np
import pytest

from agent.sim import SimOptions
from agent.sim.attacks import (
    MAX_CLAIM,
    AttackOptions,
    FleetAttack,
    alie_z,
    gaussian_update,
    inflate_samples,
    little_is_enough,
    poison_model,
    scale_update,
    sign_flip,
)
from agent.sim.schedule import plan_fleet
from agent.sim.trainers import make_trainer
from proto.errors import ConfigError

BASE = {"w": np.array([1.0, 2.0, 3.0], np.float32), "count": np.array([5], np.int64)}
HONEST = {"w": np.array([1.5, 1.0, 3.0], np.float32), "count": np.array([6], np.int64)}


def test_sign_flip_reverses_the_delta_and_leaves_inputs_alone() -> None:
    flipped = sign_flip(BASE, HONEST)
    np.testing.assert_allclose(flipped["w"], [0.5, 3.0, 3.0])
    assert flipped["w"].dtype == np.float32 and flipped["count"].tolist() == [6]
    np.testing.assert_array_equal(HONEST["w"], [1.5, 1.0, 3.0])


@pytest.mark.parametrize("factor", [10.0, 100.0])
def test_scale_multiplies_the_delta(factor: float) -> None:
    scaled = scale_update(BASE, HONEST, factor)
    np.testing.assert_allclose(scaled["w"] - BASE["w"], factor * (HONEST["w"] - BASE["w"]), rtol=1e-6)


def test_gaussian_replaces_the_update_with_noise_of_the_given_std() -> None:
    base = {"w": np.zeros(50_000, np.float32)}
    noised = gaussian_update(base, {"w": np.ones(50_000, np.float32)}, 2.0, np.random.default_rng(0))
    assert float(noised["w"].mean()) == pytest.approx(0.0, abs=0.05)
    assert float(noised["w"].std()) == pytest.approx(2.0, rel=0.02)


def test_little_is_enough_sends_mean_minus_z_std_of_honest_deltas() -> None:
    base = {"w": np.zeros(2, np.float32)}
    honest = [{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([3.0, 0.0], np.float32)}]
    shifted = little_is_enough(base, honest, z=1.5)
    np.testing.assert_allclose(shifted["w"], [2.0 - 1.5 * 1.0, 0.0])
    # it stays inside the honest spread: its delta norm is no larger than the largest honest one
    assert np.linalg.norm(shifted["w"]) <= max(np.linalg.norm(h["w"]) for h in honest)
    with pytest.raises(ValueError):
        little_is_enough(base, [], 1.0)


def test_alie_z_follows_baruch_et_al() -> None:
    # n = 50, m = 12: s = 26 - 12 = 14, z = Φ⁻¹(36/50) ≈ 0.583
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)
    assert alie_z(10, 0) == 0.0


def test_inflated_claims_multiply_and_stay_a_valid_wire_value() -> None:
    assert inflate_samples(100, 1000) == 100_000
    assert inflate_samples(2**40, 2.0**40) == MAX_CLAIM < 2**63


def test_a_malicious_aggregator_flips_and_scales_its_cluster_delta() -> None:
    poisoned = poison_model(BASE, HONEST, factor=10.0)
    np.testing.assert_allclose(poisoned["w"] - BASE["w"], -10.0 * (HONEST["w"] - BASE["w"]), rtol=1e-6)


def test_fleet_attack_applies_the_named_transform_and_inflates_the_claim() -> None:
    attack = FleetAttack(AttackOptions(name="inflate_samples", share=0.2, scale=50.0), devices=10, attackers=2)
    weights, claimed = attack.apply(index=3, base_cid="Qm1", base=BASE, weights=HONEST, num_samples=20)
    np.testing.assert_allclose(weights["w"], sign_flip(BASE, HONEST)["w"])
    assert claimed == 1000
    colluding = FleetAttack(AttackOptions(name="little_is_enough", share=0.2, z=1.0), devices=10, attackers=2)
    first, _ = colluding.apply(index=1, base_cid="Qm1", base=BASE, weights=HONEST, num_samples=1)
    np.testing.assert_allclose(first["w"], HONEST["w"])  # alone in the pool: σ = 0
    other = {"w": np.array([0.5, 3.0, 3.0], np.float32), "count": HONEST["count"]}
    second, _ = colluding.apply(index=2, base_cid="Qm1", base=BASE, weights=other, num_samples=1)
    np.testing.assert_allclose(second["w"], little_is_enough(BASE, [HONEST, other], 1.0)["w"])


def test_the_hostile_share_of_a_fleet_is_exact_and_the_rest_of_the_plan_unchanged() -> None:
    plain = plan_fleet(SimOptions(agents=50, seed=4))
    hostile = plan_fleet(SimOptions(agents=50, seed=4, attack=AttackOptions(name="sign_flip", share=0.2)))
    assert sum(p.hostile for p in hostile) == 10 and not any(p.hostile for p in plain)
    assert [(p.start_s, p.straggler) for p in plain] == [(p.start_s, p.straggler) for p in hostile]


def test_attack_options_are_validated() -> None:
    with pytest.raises(ConfigError):
        AttackOptions(name="backdoor", share=0.1)
    with pytest.raises(ConfigError):
        AttackOptions(share=0.1)
    with pytest.raises(ConfigError):
        SimOptions(attack=AttackOptions(name="label_flip", share=0.1))  # the noise trainer has no labels


@pytest.mark.slow
def test_label_flip_trains_the_hostile_devices_on_flipped_labels() -> None:
    options = SimOptions(agents=4, trainer="digits", partition="iid", attack=AttackOptions(name="label_flip", share=0.5))
    plans = plan_fleet(options)
    trainer = make_trainer(options)
    hostile = next(p for p in plans if p.hostile)
    task = trainer.for_device(hostile)._get()  # type: ignore[attr-defined]
    assert task.label_flip
    honest = trainer.for_device(next(p for p in plans if not p.hostile))._get()  # type: ignore[attr-defined]
    assert not honest.label_flip
    weights = task.initial_weights()
    for _ in range(3):
        weights, _, _ = task.train(weights, {"epochs": 2})
    # trained on c → 9 - c, it mostly predicts the flipped class of its own held-out data
    metrics = task.evaluate(weights)
    assert metrics["accuracy"] < 0.3, metrics
