"""Aggregation kernels and FedAvg, with known answers on small arrays: no processes, no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.rules import make_strategy
from aggregator.strategies import (
    AggregationError,
    FedAvg,
    check_compatible,
    check_weight,
    weighted_average,
    weighted_means,
)
from proto.errors import InvalidInput

W, B = "layer.weight", "layer.bias"


def _base() -> dict[str, np.ndarray]:
    return {W: np.zeros((2, 2), np.float32), B: np.zeros(2, np.float32)}


def test_fedavg_is_the_sample_weighted_mean() -> None:
    aggregation = FedAvg().start(_base())
    aggregation.add({W: np.full((2, 2), 1.0, np.float32), B: np.array([1, 1], np.float32)}, 1.0)
    aggregation.add({W: np.full((2, 2), 4.0, np.float32), B: np.array([3, 5], np.float32)}, 3.0)
    result = aggregation.result()
    np.testing.assert_allclose(result[W], np.full((2, 2), (1 * 1 + 3 * 4) / 4))
    np.testing.assert_allclose(result[B], [(1 + 9) / 4, (1 + 15) / 4])
    assert result[W].dtype == np.float32 and aggregation.count == 2


def test_fedavg_matches_the_reference_average_on_random_data() -> None:
    rng = np.random.default_rng(7)
    updates = [{W: rng.normal(size=(2, 2)).astype(np.float32), B: rng.normal(size=2).astype(np.float32)} for _ in range(5)]
    weights = [1.0, 2.0, 0.5, 7.0, 3.0]
    aggregation = FedAvg().start(_base())
    for update, weight in zip(updates, weights, strict=True):
        aggregation.add(update, weight)
    result = aggregation.result()
    for name in (W, B):
        np.testing.assert_allclose(result[name], weighted_average([u[name] for u in updates], weights), rtol=1e-6)


def test_partial_updates_average_per_tensor_and_untrained_tensors_keep_the_base() -> None:
    base = {W: np.full((2, 2), 9.0, np.float32), B: np.array([2, 2], np.float32)}
    aggregation = FedAvg().start(base)
    aggregation.add({B: np.array([4, 4], np.float32)}, 1.0)  # head only
    aggregation.add({B: np.array([1, 1], np.float32)}, 2.0)
    result = aggregation.result()
    np.testing.assert_array_equal(result[W], base[W])  # nobody trained it
    np.testing.assert_allclose(result[B], [2.0, 2.0])  # (4 + 2) / 3
    assert result[W] is not base[W]  # a copy, never the caller's array


def test_fedavg_never_mutates_its_inputs() -> None:
    base, update = _base(), {W: np.ones((2, 2), np.float32), B: np.ones(2, np.float32)}
    snapshot = {k: v.copy() for k, v in update.items()}
    aggregation = FedAvg().start(base)
    aggregation.add(update, 2.0)
    aggregation.result()
    for name in update:
        np.testing.assert_array_equal(update[name], snapshot[name])
    np.testing.assert_array_equal(base[W], 0)


def test_a_tensor_whose_weights_sum_to_less_than_one_is_still_averaged() -> None:
    aggregation = FedAvg().start(_base())
    aggregation.add({B: np.array([4, 8], np.float32)}, 0.25)
    aggregation.add({B: np.array([2, 2], np.float32)}, 0.25)
    np.testing.assert_allclose(aggregation.result()[B], [3, 5])


def test_wide_tensors_are_summed_without_losing_their_precision() -> None:
    """int64 and float64 tensors keep their precision through the fold (float32 sums would round them)."""
    big = 2**40
    base = {"steps": np.array([0], np.int64), "scale": np.array([1.0], np.float64)}
    aggregation = FedAvg().start(base)
    aggregation.add({"steps": np.array([big + 1], np.int64), "scale": np.array([1.0 + 2e-12])}, 1.0)
    aggregation.add({"steps": np.array([big + 3], np.int64), "scale": np.array([1.0 + 4e-12])}, 1.0)
    result = aggregation.result()
    assert result["steps"][0] == big + 2
    assert result["scale"].dtype == np.float64 and abs(result["scale"][0] - (1.0 + 3e-12)) < 1e-15


def test_integer_tensors_are_averaged_and_rounded_back() -> None:
    base = {"steps": np.array([0], np.int64)}
    aggregation = FedAvg().start(base)
    aggregation.add({"steps": np.array([10], np.int64)}, 1.0)
    aggregation.add({"steps": np.array([20], np.int64)}, 1.0)
    result = aggregation.result()
    assert result["steps"].dtype == np.int64 and result["steps"][0] == 15


def test_a_result_is_given_once() -> None:
    aggregation = FedAvg().start(_base())
    aggregation.add(_base(), 1.0)
    aggregation.result()
    with pytest.raises(AggregationError) as info:
        aggregation.result()
    assert info.value.reason == "aggregation_finished" and "already gave its result" in str(info.value)
    with pytest.raises(AggregationError) as info:
        aggregation.add(_base(), 1.0)
    assert info.value.reason == "aggregation_finished" and "already gave its result" in str(info.value)


@pytest.mark.parametrize(
    ("update", "says"),
    [
        ({"other": np.zeros(2, np.float32)}, "tensors not in the base model: ['other']"),
        ({W: np.zeros((3, 2), np.float32)}, "shape (3, 2) != base (2, 2)"),
        ({W: np.zeros((2, 2), np.float64)}, "dtype float64 != base float32"),
        ({}, "no tensors"),
    ],
    ids=["unknown name", "shape", "dtype", "empty"],
)
def test_mismatched_updates_are_refused_before_averaging(update: dict, says: str) -> None:
    aggregation = FedAvg().start(_base())
    with pytest.raises(AggregationError):
        aggregation.add(update, 1.0)
    assert aggregation.count == 0
    with pytest.raises(AggregationError) as info:
        check_compatible(_base(), update)
    assert info.value.reason == "shape_mismatch" and says in str(info.value)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_weights_must_be_finite_and_positive(weight: float) -> None:
    with pytest.raises(AggregationError) as info:
        check_weight(weight)
    assert info.value.reason == "bad_weight" and repr(weight) in str(info.value)
    with pytest.raises(AggregationError):
        weighted_average([np.zeros(1)], [weight])


def test_weighted_average_needs_one_weight_per_array() -> None:
    with pytest.raises(AggregationError, match="as many weights as arrays"):
        weighted_average([np.zeros(1), np.zeros(1)], [1.0])
    with pytest.raises(AggregationError, match="at least one"):
        weighted_average([], [])


def test_weighted_average_keeps_the_inputs_dtype() -> None:
    one = np.array([1.5, -2.0], np.float32)
    only = weighted_average([one], [3.0])
    np.testing.assert_array_equal(only, one)
    assert only.dtype == np.float32
    pair = weighted_average([one, np.zeros(2, np.float32)], [1.0, 3.0])
    np.testing.assert_allclose(pair, [0.375, -0.5])
    assert pair.dtype == np.float32


def test_weighted_means_weigh_by_samples_over_the_items_reporting_each_key() -> None:
    means = weighted_means([({"loss": 1.0, "acc": 0.5}, 1), ({"loss": 3.0}, 3), ({"loss": float("nan")}, 100)])
    assert means == {"loss": 2.5, "acc": 0.5}
    assert weighted_means([]) == {}
    assert weighted_means([({"loss": 1.0}, 0)]) == {}  # no weight behind it: no mean


def test_make_strategy_knows_every_rule_and_refuses_the_rest() -> None:
    assert make_strategy("fedavg").describe() == {"name": "fedavg", "params": {}}
    assert make_strategy("krum", {"f": 2}).describe() == {"name": "krum", "params": {"f": 2}}
    with pytest.raises(InvalidInput) as info:
        make_strategy("zeno")
    assert info.value.reason == "bad_config"
    assert "'zeno'" in str(info.value) and "'fedavg', 'geomed', 'krum'" in str(info.value)
    with pytest.raises(InvalidInput) as info:
        make_strategy("fedavg", {"beta": 0.1})
    assert info.value.reason == "bad_config" and "beta" in str(info.value)


def test_weighted_means_keep_the_most_reported_keys_within_a_manifests_bound() -> None:
    items = [({f"rare{i}": 1.0}, 1) for i in range(300)] + [({"loss": 2.0}, 50)]
    means = weighted_means(items, limit=10)
    assert len(means) == 10 and means["loss"] == 2.0
