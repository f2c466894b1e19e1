"""The Trainer protocol, trainer loading, partitioning and the built-in tasks."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agent.tasks import BUILTIN_TASKS, DigitsTask, MnistTask, builtin_task, make_task
from agent.tasks._torch import MomentumSGD
from agent.tasks.partition import client_owners, partition_indices
from agent.trainer import Trainer, has_evaluate, load_trainer
from proto.errors import InvalidInput

# --- trainers loaded by spec from this very module -----------------------------------------


class TinyTrainer:
    """Adds ``step`` to every tensor; proves "module:object" loading and option passing."""

    def __init__(self, step: float = 1.0) -> None:
        self.step = step

    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any]
              ) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        return {k: v + np.float32(self.step) for k, v in weights.items()}, 3, {"loss": 0.0}


def make_tiny(step: float = 2.0) -> TinyTrainer:
    return TinyTrainer(step=step)


TINY_INSTANCE = TinyTrainer(step=5.0)
NOT_CALLABLE = 42


class NoTrain:
    def fit(self) -> None: ...


# --- partitioning ---------------------------------------------------------------------------


def _labels(n: int = 2000, classes: int = 10, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@pytest.mark.parametrize("scheme", ["dirichlet", "shards", "iid"])
def test_partition_is_deterministic_disjoint_and_covering(scheme: str) -> None:
    labels = _labels()
    parts = [partition_indices(labels, scheme=scheme, alpha=0.3, index=i, count=7, seed=4) for i in range(7)]
    again = [partition_indices(labels, scheme=scheme, alpha=0.3, index=i, count=7, seed=4) for i in range(7)]
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
    joined = np.concatenate(parts)
    assert joined.shape[0] == labels.shape[0]
    np.testing.assert_array_equal(np.sort(joined), np.arange(labels.shape[0]))
    assert min(p.shape[0] for p in parts) > 0
    other_seed = partition_indices(labels, scheme=scheme, alpha=0.3, index=0, count=7, seed=5)
    assert not np.array_equal(parts[0], other_seed)


def test_dirichlet_small_alpha_is_skewed_and_iid_is_not() -> None:
    labels = _labels(5000)

    def top2_share(scheme: str) -> float:
        owner = client_owners(labels, scheme=scheme, alpha=0.1, count=10, seed=0)
        shares = []
        for client in range(10):
            counts = np.bincount(labels[owner == client], minlength=10)
            shares.append(np.sort(counts)[-2:].sum() / counts.sum())
        return float(np.mean(shares))

    assert top2_share("dirichlet") > 0.7
    assert top2_share("shards") > 0.85  # two label-sorted shards: mostly two classes
    assert top2_share("iid") < 0.3


def test_dirichlet_never_leaves_a_client_empty() -> None:
    labels = _labels(400)
    owner = client_owners(labels, scheme="dirichlet", alpha=0.01, count=40, seed=1)
    assert np.bincount(owner, minlength=40).min() >= 10


def test_two_level_groups_are_disjoint_covering_and_class_skewed() -> None:
    labels = _labels(6000)
    slices = {
        (g, i): partition_indices(labels, scheme="iid", index=i, count=10, seed=2,
                                  groups=3, group=g, group_alpha=0.2)
        for g in range(3) for i in range(10)
    }
    joined = np.concatenate(list(slices.values()))
    np.testing.assert_array_equal(np.sort(joined), np.arange(labels.shape[0]))
    group_mix = np.stack([
        np.bincount(labels[np.concatenate([slices[(g, i)] for i in range(10)])], minlength=10) for g in range(3)
    ]).astype(float)
    group_mix /= group_mix.sum(axis=1, keepdims=True)
    # Each group's class mix differs markedly from the uniform 0.1 per class.
    assert np.abs(group_mix - 0.1).sum(axis=1).min() > 0.4


@pytest.mark.parametrize("kwargs", [
    {"index": 3, "count": 3},
    {"index": -1, "count": 3},
    {"index": 0, "count": 0},
    {"index": 0, "count": 2, "scheme": "zipf"},
    {"index": 0, "count": 2, "alpha": 0.0},
    {"index": 0, "count": 2, "seed": -1},
    {"index": 0, "count": 2, "groups": 2},
    {"index": 0, "count": 2, "groups": 2, "group": 2},
    {"index": 0, "count": 5000},
])
def test_partition_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        partition_indices(_labels(100), **kwargs)


def test_partition_rejects_non_integer_labels() -> None:
    with pytest.raises(InvalidInput):
        partition_indices(np.zeros(10, dtype=np.float32), index=0, count=2)


# --- loading trainers -----------------------------------------------------------------------


def test_load_builtin_tasks_by_name() -> None:
    assert set(BUILTIN_TASKS) == {"digits", "mnist", "fashion_mnist"}
    task = load_trainer("digits", {"partition": {"index": 1, "count": 4}, "seed": 3})
    assert isinstance(task, DigitsTask)
    assert isinstance(task, Trainer)
    assert task.partition["index"] == 1 and task.seed == 3
    assert has_evaluate(task)


def test_load_module_object_specs() -> None:
    weights = {"w": np.zeros(2, dtype=np.float32)}
    by_class = load_trainer("tests.test_tasks:TinyTrainer", {"step": 0.5})
    assert isinstance(by_class, TinyTrainer)
    assert by_class.train(weights, {})[0]["w"][0] == np.float32(0.5)
    by_factory = load_trainer("tests.test_tasks:make_tiny", {})
    assert by_factory.step == 2.0
    assert load_trainer("tests.test_tasks:TINY_INSTANCE", {}) is TINY_INSTANCE
    assert not has_evaluate(by_class)


@pytest.mark.parametrize(("spec", "options", "reason"), [
    ("", {}, "bad_trainer_spec"),
    ("resnet9000", {}, "bad_trainer_spec"),
    (":TinyTrainer", {}, "bad_trainer_spec"),
    ("tests.test_tasks:", {}, "bad_trainer_spec"),
    ("no_such_module_anywhere:Trainer", {}, "trainer_module_not_found"),
    ("tests.test_tasks:Missing", {}, "trainer_object_not_found"),
    ("tests.test_tasks:NOT_CALLABLE", {}, "trainer_without_train"),
    ("tests.test_tasks:NoTrain", {}, "trainer_without_train"),
    ("tests.test_tasks:TinyTrainer", {"stride": 1}, "bad_trainer_options"),
    ("tests.test_tasks:TINY_INSTANCE", {"step": 1}, "bad_trainer_options"),
    ("digits", {"learning_rate": 0.1}, "bad_trainer_options"),
    ("digits", {"epochs": "many"}, "bad_task_option"),
    ("digits", {"partition": {"index": 2, "count": 2}}, "bad_partition"),
    ("digits", {"partition": {"shape": "dirichlet"}}, "bad_task_option"),
])
def test_bad_specs_raise_invalid_input(spec: str, options: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        load_trainer(spec, options)
    assert info.value.reason == reason


def test_make_task_rejects_unknown_name() -> None:
    with pytest.raises(InvalidInput) as info:
        make_task("cifar")
    assert info.value.reason == "unknown_task"


def test_builtin_task_is_the_one_lookup_by_name() -> None:
    assert builtin_task("digits") is DigitsTask and builtin_task("mnist") is MnistTask
    with pytest.raises(InvalidInput) as info:
        builtin_task("cifar")
    assert info.value.reason == "unknown_task"
    assert "'cifar'" in str(info.value) and "['digits', 'fashion_mnist', 'mnist']" in str(info.value)


def _agent_imports(path: Path) -> set[str]:
    """Every `agent.*` module `path` imports, function-level imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("agent.")}


def test_tasks_never_import_the_trainer_module() -> None:
    # trainer imports agent.tasks (lazily, for built-in names); the reverse would be a cycle
    tasks = Path(__file__).resolve().parent.parent / "agent" / "tasks"
    assert [p.name for p in tasks.glob("*.py") if "agent.trainer" in _agent_imports(p)] == []


# --- digits -----------------------------------------------------------------------------------


def _digits(**options: Any) -> DigitsTask:
    options.setdefault("partition", {"index": 0, "count": 5, "alpha": 0.5})
    return DigitsTask(**options)


def test_digits_initial_weights_are_named_float32_and_deterministic() -> None:
    task = _digits()
    weights = task.initial_weights()
    assert {k: v.shape for k, v in weights.items()} == {
        "fc1.weight": (128, 64), "fc1.bias": (128,), "head.weight": (10, 128), "head.bias": (10,),
    }
    assert all(v.dtype == np.float32 for v in weights.values())
    again = _digits().initial_weights()
    assert all(np.array_equal(weights[k], again[k]) for k in weights)
    other = _digits(seed=1).initial_weights()
    assert not np.array_equal(weights["fc1.weight"], other["fc1.weight"])


def test_digits_local_split_is_disjoint_and_capped() -> None:
    task = _digits()
    assert np.intersect1d(task.train_indices, task.eval_indices).size == 0
    total = task.train_indices.shape[0] + task.eval_indices.shape[0]
    assert abs(task.eval_indices.shape[0] - 0.2 * total) <= 1
    capped = _digits(max_samples=50)
    assert capped.num_train_samples == 50
    np.testing.assert_array_equal(capped.eval_indices, task.eval_indices)


def test_digits_train_returns_same_tensors_and_is_deterministic() -> None:
    task = _digits()
    start = task.initial_weights()
    new, n, metrics = task.train(start, {"round": 0})
    assert n == task.num_train_samples
    assert set(new) == set(start)
    assert all(new[k].shape == start[k].shape and new[k].dtype == np.float32 for k in start)
    assert not np.array_equal(new["fc1.weight"], start["fc1.weight"])
    assert set(metrics) >= {"loss", "accuracy"} and all(isinstance(v, float) for v in metrics.values())
    again, _, _ = _digits().train(start, {"round": 0})
    assert all(np.array_equal(new[k], again[k]) for k in new)
    # Inputs are not mutated.
    assert all(np.array_equal(start[k], task.initial_weights()[k]) for k in start)


def test_digits_round_config_strings_are_coerced_and_bad_values_refused() -> None:
    task = _digits()
    start = task.initial_weights()
    _, _, metrics = task.train(start, {"epochs": "1", "batch_size": "1000", "lr": "0.1", "max_batches": "none"})
    assert metrics["batches"] == 1.0
    _, _, metrics = task.train(start, {"epochs": 3, "max_batches": "2"})
    assert metrics["batches"] == 2.0
    for bad in ({"epochs": "0"}, {"lr": "fast"}, {"batch_size": 1.5}):
        with pytest.raises(InvalidInput):
            task.train(start, bad)


def test_digits_lr_decay_scales_each_round_step() -> None:
    # One full-batch step without momentum moves the weights by -lr * gradient, so round 2
    # with lr_decay 0.5 moves them by exactly a quarter of round 0's step.
    task = _digits()
    start = task.initial_weights()
    config = {"epochs": 1, "batch_size": 10_000, "momentum": 0, "lr": 0.1, "lr_decay": "0.5"}
    first, _, _ = task.train(start, {**config, "round": 0})
    third, _, _ = task.train(start, {**config, "round": 2})
    for name in start:
        np.testing.assert_allclose(third[name] - start[name], (first[name] - start[name]) / 4, rtol=1e-3, atol=1e-7)
    for bad in ("0", "1.5", "-0.5"):
        with pytest.raises(InvalidInput):
            task.train(start, {**config, "lr_decay": bad})


def test_digits_refuses_mismatched_weights() -> None:
    task = _digits()
    start = task.initial_weights()
    missing = {k: v for k, v in start.items() if k != "head.bias"}
    reshaped = {**start, "head.bias": np.zeros(11, dtype=np.float32)}
    nan = {**start, "head.bias": np.full(10, np.nan, dtype=np.float32)}
    for weights in (missing, reshaped, nan):
        with pytest.raises(InvalidInput):
            task.train(weights, {})


def test_digits_head_only_leaves_body_bit_identical() -> None:
    task = _digits(head_only=True)
    assert task.trainable_tensors() == ["head.weight", "head.bias"]
    assert _digits().trainable_tensors() is None
    start = task.initial_weights()
    for name in start:
        start[name].setflags(write=False)  # as if decoded from a safetensors buffer
    new, _, _ = task.train(start, {})
    assert new["fc1.weight"].tobytes() == start["fc1.weight"].tobytes()
    assert new["fc1.bias"].tobytes() == start["fc1.bias"].tobytes()
    assert not np.array_equal(new["head.weight"], start["head.weight"])


@pytest.mark.slow
def test_digits_fedavg_three_non_iid_clients_five_rounds() -> None:
    clients = [_digits(partition={"index": i, "count": 3, "alpha": 0.5}) for i in range(3)]
    weights = clients[0].initial_weights()
    chance = DigitsTask.evaluate_global(weights)["accuracy"]
    for round_number in range(5):
        updates = [c.train(weights, {"round": round_number}) for c in clients]
        total = sum(n for _, n, _ in updates)
        weights = {k: sum(w[k] * np.float32(n / total) for w, n, _ in updates).astype(np.float32)
                   for k in weights}
    result = DigitsTask.evaluate_global(weights)
    assert chance < 0.3
    assert result["accuracy"] > 0.6
    local = clients[0].evaluate(weights)
    assert 0.0 <= local["accuracy"] <= 1.0 and local["num_samples"] == clients[0].eval_indices.shape[0]
    test_x, test_y = DigitsTask.test_set()
    predicted = DigitsTask.predict(weights, test_x)
    assert predicted.shape == test_y.shape and predicted.dtype == np.int64
    assert np.mean(predicted == test_y) == pytest.approx(result["accuracy"])
    assert np.array_equal(DigitsTask.predict(weights, test_x.reshape(-1, 8, 8)), predicted)


@pytest.mark.slow
def test_digits_local_epoch_does_the_work_max_samples_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    """An epoch's cost is its optimizer steps: ceil(max_samples / batch_size), counted by wrapping
    the tasks' optimizer step. How long one takes is measured in bench/local_epoch.py."""
    steps: list[int] = []
    real_step = MomentumSGD.step

    def counted_step(self: MomentumSGD) -> None:
        steps.append(1)
        real_step(self)

    monkeypatch.setattr(MomentumSGD, "step", counted_step)
    task = _digits(partition={"count": 1}, max_samples=300)
    _, num_samples, metrics = task.train(task.initial_weights(), {"epochs": 1})
    one_epoch = len(steps)
    task.train(task.initial_weights(), {"epochs": 3, "batch_size": 100})
    assert num_samples == 300
    assert one_epoch == metrics["batches"] == 10  # ceil(300 / 32)
    assert len(steps) - one_epoch == 3 * 3  # 3 epochs of ceil(300 / 100)


# --- mnist ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mnist_dataset_has_70000_images() -> None:
    train_x = MnistTask._dataset().train_x
    test_x, test_y = MnistTask.test_set()
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == np.uint8
    assert np.array_equal(np.unique(test_y), np.arange(10))


@pytest.mark.slow
def test_mnist_quick_train_step() -> None:
    task = MnistTask(partition={"index": 2, "count": 10}, max_samples=128, max_batches=2)
    start = task.initial_weights()
    assert {"conv1.weight", "conv2.weight", "fc1.weight", "head.weight", "head.bias"} <= set(start)
    new, n, metrics = task.train(start, {"round": "0"})
    assert n == 128 and metrics["batches"] == 2.0
    assert all(new[k].shape == start[k].shape and new[k].dtype == np.float32 for k in start)
    test_x, _ = MnistTask.test_set()
    predicted = MnistTask.predict(new, test_x[:16])
    assert predicted.shape == (16,)
    assert np.array_equal(MnistTask.predict(new, test_x[:16].astype(np.float32) / 255.0), predicted)


def test_pooled_task_holds_the_union_of_the_clients_samples() -> None:
    clients = [_digits(partition={"index": i, "count": 3, "alpha": 0.5}) for i in range(3)]
    pooled = DigitsTask.pooled(clients)
    assert pooled.num_train_samples == sum(c.num_train_samples for c in clients)
    np.testing.assert_array_equal(pooled.train_indices, np.sort(np.concatenate([c.train_indices for c in clients])))
    start = clients[0].initial_weights()
    _, n, _ = pooled.train(start, {"epochs": 1})
    assert n == pooled.num_train_samples
    assert clients[0].num_train_samples < n  # the clients are untouched
    with pytest.raises(InvalidInput):
        DigitsTask.pooled([])


def test_momentum_sgd_matches_torch_sgd() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    ours = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    theirs = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    mine = MomentumSGD(ours, lr=0.1, momentum=0.9)
    reference = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    x = torch.randn(8, 5)
    for _ in range(4):
        for params, opt in ((ours, mine), (theirs, reference)):
            opt.zero_grad()
            torch.nn.functional.linear(x, params[0], params[1]).square().sum().backward()
            opt.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
