"""Robust rules with known answers on small arrays, and the same rules read back from a real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator import robust
from aggregator.robust import (
    coordinate_median,
    krum_select,
    pairwise_squared_distances,
    trimmed_mean,
    weiszfeld,
)
from aggregator.rules import make_strategy, strategy_names
from aggregator.strategies import AggregationError
from proto.errors import IntegrityError, InvalidInput
from storage.codec import encode_tensors
from storage.store import LocalStore

# five updates of one coordinate each: three honest, two far outliers
FIVE = [1.0, 2.0, 3.0, 100.0, -100.0]


def _aggregate(name: str, values: list[list[float]], weights: list[float] | None = None, **params: object) -> tuple[np.ndarray, dict]:
    base = {"w": np.zeros(len(values[0]), np.float32)}
    aggregation = make_strategy(name, params).start(base)
    for i, value in enumerate(values):
        aggregation.add({"w": np.array(value, np.float32)}, 1.0 if weights is None else weights[i], label=f"u{i}")
    return aggregation.result()["w"], aggregation.report()


def test_every_rule_has_a_name() -> None:
    assert strategy_names() == ["bulyan", "clipped_fedavg", "fedavg", "geomed", "krum", "median", "multi_krum", "trimmed_mean"]


def test_the_median_of_five_with_two_outliers_is_the_honest_middle() -> None:
    result, _ = _aggregate("median", [[v, -v] for v in FIVE])
    np.testing.assert_array_equal(result, [2.0, -2.0])
    # an even count averages the two middle values
    np.testing.assert_array_equal(coordinate_median(np.array([[20.0], [1.0], [10.0], [2.0]])), [6.0])


def test_trimmed_mean_drops_beta_k_at_each_end() -> None:
    result, report = _aggregate("trimmed_mean", [[v] for v in FIVE], beta=0.2)
    np.testing.assert_allclose(result, [2.0])  # drops -100 and 100, averages 1, 2, 3
    assert report == {"trimmed_per_side": 1}
    np.testing.assert_allclose(trimmed_mean(np.array([[4.0], [1.0], [3.0], [2.0]]), 0.0), [2.5])
    # beta close to 0.5 still leaves one value
    np.testing.assert_allclose(trimmed_mean(np.array([[9.0], [1.0], [5.0]]), 0.49), [5.0])


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    # K=5, f=1: score = summed squared distance to the 2 nearest others; 2.0 scores 1 + 1
    result, report = _aggregate("krum", [[v, v] for v in FIVE], f=1)
    np.testing.assert_array_equal(result, [2.0, 2.0])
    assert report["selected"] == ["u1"]
    assert {r["cid"] for r in report["refused"]} == {"u0", "u2", "u3", "u4"}
    assert all(r["reason"] == "krum_not_selected" for r in report["refused"])


def test_multi_krum_averages_the_m_best_by_weight() -> None:
    result, report = _aggregate("multi_krum", [[v] for v in FIVE], weights=[1, 1, 2, 50, 50], f=2, m=3)
    np.testing.assert_allclose(result, [(1 * 1 + 2 * 1 + 3 * 2) / 4])
    assert sorted(report["selected"]) == ["u0", "u1", "u2"]
    # m = 0 keeps K - f
    gram = np.array([[v * w for w in FIVE] for v in FIVE])
    assert sorted(krum_select(pairwise_squared_distances(gram), 2, 3)) == [0, 1, 2]


def test_weiszfeld_converges_to_a_known_geometric_median() -> None:
    # the geometric median of the corners of a square plus its centre is the centre
    points = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [1, 1]], np.float64)
    gram = points @ points.T
    coefficients, objective = weiszfeld(gram, np.ones(5), iterations=50, nu=1e-9)
    np.testing.assert_allclose(coefficients @ points, [1, 1], atol=1e-6)
    assert all(a >= b - 1e-12 for a, b in zip(objective, objective[1:], strict=False))  # never worse
    # three points of an equilateral triangle: the Fermat point, its centroid
    triangle = np.array([[0, 0], [1, 0], [0.5, np.sqrt(3) / 2]])
    c, _ = weiszfeld(triangle @ triangle.T, np.ones(3), iterations=200, nu=1e-12)
    np.testing.assert_allclose(c @ triangle, [0.5, np.sqrt(3) / 6], atol=1e-6)


def test_geomed_resists_outliers_that_drag_the_mean() -> None:
    values = [[0, 0], [2, 0], [0, 2], [2, 2], [1, 1], [1000, 1000]]
    result, report = _aggregate("geomed", values, iterations=100)
    assert np.linalg.norm(result - np.array([1.0, 1.0])) < 0.5  # the mean would be about [168, 168]
    assert report["coefficients"]["u5"] < 0.01


def test_clipped_fedavg_clips_changes_to_tau_times_the_median_norm() -> None:
    # change norms 1, 2, 3, 100, 100 -> median 3, tau 1: bound 3; the two big ones scaled by 3/100
    result, report = _aggregate("clipped_fedavg", [[1], [2], [3], [100], [-100]], tau=1.0)
    np.testing.assert_allclose(result, [(1 + 2 + 3 + 3 - 3) / 5], rtol=1e-6)
    assert report["clip_bound"] == pytest.approx(3.0)
    assert {d["cid"] for d in report["down_weighted"]} == {"u3", "u4"}
    # with a bound nobody reaches it is FedAvg
    result, _ = _aggregate("clipped_fedavg", [[1], [2], [6]], weights=[1, 1, 2], tau=100.0)
    np.testing.assert_allclose(result, [(1 + 2 + 12) / 4])


def test_bulyan_chooses_by_krum_then_averages_the_values_closest_to_the_median() -> None:
    # K = 7, f = 1: θ = 5 chosen one by one by Krum (3, then 2, 4, 1, 5; the outliers never),
    # then per coordinate the β = 3 of them closest to their median 3: 2, 3, 4
    seven = [1.0, 2.0, 3.0, 4.0, 5.0, 100.0, -100.0]
    result, report = _aggregate("bulyan", [[v, -v] for v in seven], f=1)
    np.testing.assert_allclose(result, [3.0, -3.0])
    assert report["f_used"] == 1
    assert report["selected"] == ["u2", "u1", "u3", "u0", "u4"]
    assert {r["cid"] for r in report["refused"]} == {"u5", "u6"}
    assert all(r["reason"] == "bulyan_not_selected" for r in report["refused"])


def test_bulyans_coordinate_step_is_the_mean_of_the_run_nearest_the_median() -> None:
    stack = np.array([[1.0, 5.0], [2.0, 6.0], [10.0, 7.0], [11.0, 50.0], [12.0, 60.0]])
    # column 0: median 10, nearest three 10, 11, 12; column 1: median 7, nearest three 5, 6, 7
    np.testing.assert_allclose(robust.mean_around_median(stack.copy(), 3), [11.0, 6.0])
    np.testing.assert_allclose(robust.mean_around_median(stack.copy(), 1), [10.0, 7.0])  # the median itself


def test_bulyan_with_too_few_updates_for_f_lowers_f_and_says_so() -> None:
    assert [robust.bulyan_f(k, 2) for k in (2, 3, 6, 7, 10, 11, 50)] == [0, 0, 0, 1, 1, 2, 2]
    # 5 updates cannot tolerate f = 1 (4f + 3 = 7): f = 0 chooses all and averages all
    result, report = _aggregate("bulyan", [[v] for v in FIVE], f=1)
    np.testing.assert_allclose(result, [sum(FIVE) / 5])
    assert report["f_used"] == 0 and report["refused"] == []


def test_partial_updates_and_integer_tensors() -> None:
    base = {"body": np.full(2, 5.0, np.float32), "head": np.zeros(2, np.float32), "steps": np.array([0], np.int64)}
    aggregation = make_strategy("median").start(base)
    aggregation.add({"head": np.array([1, 1], np.float32), "steps": np.array([3])}, 1.0)
    aggregation.add({"head": np.array([3, 3], np.float32), "steps": np.array([4])}, 1.0)
    result = aggregation.result()
    np.testing.assert_array_equal(result["body"], base["body"])  # nobody trained it
    np.testing.assert_array_equal(result["head"], [2, 2])
    assert result["steps"].dtype == np.int64 and result["steps"][0] in (3, 4)


def test_rules_never_mutate_inputs_and_give_one_result() -> None:
    base = {"w": np.zeros(3, np.float32)}
    update = {"w": np.ones(3, np.float32)}
    for name in strategy_names():
        aggregation = make_strategy(name).start(base)
        aggregation.add(update, 1.0)
        aggregation.result()
        with pytest.raises(AggregationError):
            aggregation.result()
        np.testing.assert_array_equal(update["w"], 1)
        np.testing.assert_array_equal(base["w"], 0)


@pytest.mark.parametrize(
    ("name", "params"),
    [("trimmed_mean", {"beta": 0.5}), ("krum", {"f": -1}), ("multi_krum", {"m": 1.5}), ("geomed", {"iterations": 0}),
     ("clipped_fedavg", {"tau": 0.0}), ("median", {"beta": 0.1}), ("bulyan", {"f": 0.5}), ("nope", {})],
)  # fmt: skip
def test_bad_parameters_are_refused_as_bad_config(name: str, params: dict) -> None:
    with pytest.raises(InvalidInput) as info:
        make_strategy(name, params)
    assert info.value.reason == "bad_config"


def _store_backed(store: LocalStore, name: str, updates: list[dict[str, np.ndarray]], base: dict[str, np.ndarray], **params: object) -> dict:
    aggregation = make_strategy(name, params).start(base, store=store)
    for i, update in enumerate(updates):
        aggregation.add(update, float(i + 1), label=f"u{i}", weights_cid=store.put(encode_tensors(update)))
    return aggregation.result()


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum", "geomed", "clipped_fedavg", "bulyan"])
def test_reading_back_from_the_store_in_slices_gives_the_in_memory_answer(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(robust, "SLICE_BUDGET_BYTES", 1)  # the smallest slices: many per tensor
    monkeypatch.setattr(robust, "_MIN_SLICE_ELEMENTS", 7)
    rng = np.random.default_rng(3)
    base = {"a": rng.normal(size=(10, 5)).astype(np.float32), "b": rng.normal(size=33).astype(np.float64)}
    updates = [{k: v + rng.normal(scale=0.1, size=v.shape).astype(v.dtype) for k, v in base.items()} for _ in range(6)]
    updates.append({"a": base["a"] + 50})  # a partial outlier
    store = LocalStore(tmp_path / "store")
    from_store = _store_backed(store, name, updates, base)
    in_memory = make_strategy(name).start(base)
    for i, update in enumerate(updates):
        in_memory.add(update, float(i + 1))
    expected = in_memory.result()
    for key in base:
        np.testing.assert_allclose(from_store[key], expected[key], rtol=1e-5, atol=1e-6)
        assert from_store[key].dtype == base[key].dtype


def test_a_blob_changed_in_the_store_is_refused_before_it_counts(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    base = {"w": np.zeros(4, np.float32)}
    aggregation = make_strategy("median").start(base, store=store)
    cids = []
    for value in (1.0, 2.0, 3.0):
        update = {"w": np.full(4, value, np.float32)}
        cids.append(store.put(encode_tensors(update)))
        aggregation.add(update, 1.0, weights_cid=cids[-1])
    path = store.path_of(cids[1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        aggregation.result()


# ------------------------------------------------------------------ server optimizers, one step by hand


def _one_step(server_opt: str, params: dict, base: float, aggregate: float, steps: int = 1) -> float:
    strategy = make_strategy("fedavg", server_opt=server_opt, server_opt_params=params)
    model = base
    for _ in range(steps):
        aggregation = strategy.start({"w": np.array([model], np.float64)})
        aggregation.add({"w": np.array([model + (aggregate - base)], np.float64)}, 1.0)
        model = float(aggregation.result()["w"][0])
    return model


def test_fedavgm_with_no_momentum_and_lr_one_is_fedavg_and_momentum_accumulates() -> None:
    assert _one_step("fedavgm", {"lr": 1.0, "momentum": 0.0}, 1.0, 3.0) == pytest.approx(3.0)
    # delta 2 each round: v1 = -2 -> x = 1 + 2 = 3; v2 = 0.5 * -2 - 2 = -3 -> x = 3 + 3 = 6
    assert _one_step("fedavgm", {"lr": 1.0, "momentum": 0.5}, 1.0, 3.0, steps=2) == pytest.approx(6.0)


def test_fedadam_first_step_by_hand() -> None:
    # delta 2: m = 0.1 * 2 = 0.2; v = 0.01 * 4 = 0.04; lr_t = 0.1 * sqrt(0.01) / 0.1 = 0.1
    # x' = 1 + 0.1 * 0.2 / (0.2 + 1e-9) = 1.1
    assert _one_step("fedadam", {}, 1.0, 3.0) == pytest.approx(1.1, rel=1e-6)


def test_fedyogi_first_step_by_hand() -> None:
    # delta 2: m = 0.2; v = 0 - 0.01 * 4 * sign(0 - 4) = 0.04; x' = 1 + 0.01 * 0.2 / (0.2 + 1e-3)
    assert _one_step("fedyogi", {}, 1.0, 3.0) == pytest.approx(1 + 0.01 * 0.2 / 0.201, rel=1e-6)


def test_server_opt_state_survives_in_the_store_and_is_described(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first = make_strategy("median", server_opt="fedadam", server_opt_params={"lr": 0.5})
    assert first.describe() == {
        "name": "median", "params": {}, "server_opt": {"name": "fedadam", "params": {"lr": 0.5, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9}}
    }  # fmt: skip
    base = {"w": np.zeros(2, np.float32)}
    aggregation = first.start(base, store=store)
    aggregation.add({"w": np.ones(2, np.float32)}, 1.0)
    aggregation.result()
    report = aggregation.report()
    assert report["server_opt"]["step"] == 1 and store.has(report["server_opt"]["state"])
    # a restarted aggregator's fresh strategy resumes from the recorded state: step 2 matches
    resumed = make_strategy("median", server_opt="fedadam", server_opt_params={"lr": 0.5})
    resumed.resume(store, report)
    outcomes = []
    for strategy in (first, resumed):
        aggregation = strategy.start(base, store=store)
        aggregation.add({"w": np.full(2, 2.0, np.float32)}, 1.0)
        outcomes.append(aggregation.result()["w"])
        assert aggregation.report()["server_opt"]["step"] == 2
    np.testing.assert_array_equal(outcomes[0], outcomes[1])


@pytest.mark.parametrize(
    ("server_opt", "params"), [("sgd", {}), ("fedadam", {"lr": -1}), ("fedadam", {"eta": 1}), ("none", {"lr": 1}), ("fedavgm", {"momentum": 1.0})]
)
def test_bad_server_opt_is_refused_as_bad_config(server_opt: str, params: dict) -> None:
    with pytest.raises(InvalidInput) as info:
        make_strategy("fedavg", server_opt=server_opt, server_opt_params=params)
    assert info.value.reason == "bad_config"


def test_config_knows_the_same_names_as_the_rules() -> None:
    from aggregator.config import (
        SERVER_OPT_NAMES,
        STRATEGY_NAMES,
        AggregatorConfig,
        SynthesisSettings,
    )
    from aggregator.rules import server_opt_names
    from proto.errors import ConfigError

    assert sorted(STRATEGY_NAMES) == strategy_names()
    assert sorted(SERVER_OPT_NAMES) == sorted(server_opt_names())
    for build in (lambda: AggregatorConfig(strategy="zeno"), lambda: SynthesisSettings(strategy="mean"),
                  lambda: AggregatorConfig(server_opt="sgd")):  # fmt: skip
        with pytest.raises(ConfigError):
            build()
