"""A small, fast federated-learning loop for the privacy and attack benchmarks (in one process).

MNIST (the built-in task's dataset) split non-IID (Dirichlet α, `agent.tasks.partition`) over
devices; each device trains a softmax-regression model (784 → 10) with numpy SGD, so hundreds of
devices × tens of rounds fit in a minute on two cores. Aggregation is *the aggregator's own code*:
`aggregator.rules.make_strategy` for the rule (any registered one), `aggregator.privacy` for
central DP and `privacy.accounting` for ε. Only the transport (gRPC, the store) is left out: the
end-to-end tests cover that path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np

from agent.tasks.mnist import load_mnist_dataset
from agent.tasks.partition import client_owners
from privacy.accounting import PrivacyEvent, epsilon_of

Weights = dict[str, np.ndarray]
CLASSES = 10


@dataclass
class Data:
    train_x: np.ndarray  # float32 [N, 784] in [0, 1]
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    shards: list[np.ndarray]  # each device's sample indices


def load(devices: int, *, alpha: float = 0.5, seed: int = 0) -> Data:
    data = load_mnist_dataset()
    train_x = data.train_x.reshape(len(data.train_x), -1).astype(np.float32) / 255.0
    test_x = data.test_x.reshape(len(data.test_x), -1).astype(np.float32) / 255.0
    owners = client_owners(data.train_y, scheme="dirichlet", alpha=alpha, count=devices, seed=seed)
    order = np.argsort(owners, kind="stable")
    bounds = np.searchsorted(owners[order], np.arange(devices + 1))
    shards = [order[bounds[i] : bounds[i + 1]] for i in range(devices)]
    return Data(train_x, data.train_y.astype(np.int64), test_x, data.test_y.astype(np.int64), shards)


def initial_weights() -> Weights:
    return {"w": np.zeros((784, CLASSES), np.float32), "b": np.zeros(CLASSES, np.float32)}


def train(
    weights: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    rng: np.random.Generator,
    epochs: int = 1,
    batch: int = 32,
    lr: float = 0.1,
    flip_labels: bool = False,
) -> Weights:
    """Local SGD on softmax regression; labels c → 9 − c for a label-flipping device."""
    w, b = weights["w"].astype(np.float32).copy(), weights["b"].astype(np.float32).copy()
    if flip_labels:
        y = CLASSES - 1 - y
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            xb, yb = x[idx], y[idx]
            logits = xb @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1.0
            w -= lr * (xb.T @ p) / len(yb)
            b -= lr * p.mean(axis=0)
    return {"w": w, "b": b}


def accuracy(weights: Mapping[str, np.ndarray], data: Data) -> float:
    predicted = (data.test_x @ weights["w"] + weights["b"]).argmax(axis=1)
    return float((predicted == data.test_y).mean())


def noise_for_epsilon(epsilon: float, rounds: int, delta: float) -> float:
    """The Gaussian noise multiplier whose `rounds`-fold composition is (ε, δ)-DP (bisection on the accountant)."""
    low, high = 0.05, 500.0
    for _ in range(60):
        mid = (low * high) ** 0.5
        if epsilon_of([PrivacyEvent(mid, count=rounds)], delta) > epsilon:
            low = mid
        else:
            high = mid
    return high
