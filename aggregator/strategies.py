"""Aggregation strategies: a small template over pure numeric kernels.

A `Strategy` names a rule and its parameters and starts an `Aggregation` for one
round from the round's base tensors. Updates are folded in one at a time as they
arrive (`add`), and `result()` gives the aggregate. Memory therefore grows with
the model, not with the number of updates.

Kernels are module-level functions over per-tensor arrays and weights: no I/O,
and they never mutate their inputs. Aggregation is per tensor with per-tensor
weight sums, so partial updates (a device that trained only the head) average
correctly and a tensor nobody trained keeps its base value.

FedAvg streams. Rules that need every update at once (median, trimmed mean, Krum,
geometric median, clipped FedAvg) live in `aggregator.robust` and read the accepted
updates back from the store, tensor by tensor; `aggregator.server_opt` puts a server
optimizer on top of any of them, and `aggregator.rules.make_strategy` knows them all.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from intake.validation import mismatch
from proto.errors import InvalidInput
from storage.manifest import MAX_METRICS
from storage.store import ContentStore

TensorDict = dict[str, np.ndarray]


class AggregationError(InvalidInput):
    """An update that cannot be aggregated with the others (names, shapes, dtypes, weights)."""

    reason = "shape_mismatch"


# ------------------------------------------------------------------ kernels


def check_compatible(base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> None:
    """Refuse an update that is not a non-empty subset of the base's tensors with their shapes and dtypes."""
    problem = mismatch(base, update)
    if problem is not None:
        raise AggregationError(problem)


def check_weight(weight: float) -> float:
    if not (math.isfinite(weight) and weight > 0):
        raise AggregationError(f"aggregation weight must be finite and > 0, got {weight!r}", reason="bad_weight")
    return float(weight)


def weighted_average(arrays: Iterable[np.ndarray], weights: Iterable[float]) -> np.ndarray:
    """Σ wᵢ·xᵢ / Σ wᵢ, computed in float64 and returned in the inputs' dtype. Reference
    implementation for tests and small inputs; the streaming fold is `_axpy_`."""
    arrays, weights = list(arrays), [check_weight(w) for w in weights]
    if not arrays or len(arrays) != len(weights):
        raise AggregationError("weighted_average needs as many weights as arrays, at least one")
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    for array, weight in zip(arrays, weights, strict=True):
        total += weight * array.astype(np.float64, copy=False)
    return (total / sum(weights)).astype(arrays[0].dtype)


def weighted_means(items: list[tuple[Mapping[str, float], int]], *, limit: int = MAX_METRICS) -> dict[str, float]:
    """Per-key means weighted by sample counts, over the items that report each key; at most
    `limit` keys (those with the most weight behind them), so a manifest stays within its bound."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight in items:
        for name, value in metrics.items():
            if math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + value * weight
                weights[name] = weights.get(name, 0.0) + weight
    kept = sorted((name for name in sums if weights[name] > 0), key=lambda name: (-weights[name], name))[:limit]
    return {name: sums[name] / weights[name] for name in sorted(kept)}


def _axpy_(accumulator: torch.Tensor, x: np.ndarray, alpha: float) -> None:
    # accumulator += alpha * x in one fused, multi-threaded pass over x's memory; x is only read,
    # so a read-only view of an update's bytes needs no copy (torch would warn that it could write)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(x))
    accumulator.add_(source, alpha=alpha)


# ------------------------------------------------------------------ template


class Aggregation(ABC):
    """One round's aggregation in progress."""

    @abstractmethod
    def add(self, update: Mapping[str, np.ndarray], weight: float, *, label: str = "", weights_cid: str = "") -> None:
        """Fold in one update. `label` names it in `report()`; `weights_cid` lets a rule that
        needs every update at once read it back from the store instead of keeping it."""

    def report(self) -> dict[str, Any]:
        """What the rule did to individual updates (refused, down-weighted), for the manifest."""
        return {}

    @abstractmethod
    def result(self) -> TensorDict: ...

    @property
    @abstractmethod
    def count(self) -> int: ...


class Strategy(ABC):
    """An aggregation rule: its name, its parameters, and how a round aggregates."""

    name: ClassVar[str]

    def params(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params()}

    def resume(self, store: ContentStore, report: Mapping[str, Any]) -> None:  # noqa: B027 - most rules keep no state
        """Pick up state kept across rounds from the last closed round's `report()` (after a restart)."""

    @abstractmethod
    def start(self, base: Mapping[str, np.ndarray], *, store: ContentStore | None = None) -> Aggregation:
        """A round's aggregation from its base; `store` holds the updates' blobs, for rules that read them back."""


class _FedAvgAggregation(Aggregation):
    def __init__(self, base: Mapping[str, np.ndarray]) -> None:
        self._base = base
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._count = 0
        self._finished = False

    @property
    def count(self) -> int:
        return self._count

    def add(self, update: Mapping[str, np.ndarray], weight: float, *, label: str = "", weights_cid: str = "") -> None:
        if self._finished:
            raise AggregationError("this aggregation already gave its result", reason="aggregation_finished")
        weight = check_weight(weight)
        check_compatible(self._base, update)
        for name, array in update.items():
            accumulator = self._sums.get(name)
            if accumulator is None:
                accumulator = self._sums[name] = torch.zeros(array.shape, dtype=_accumulator_dtype(array.dtype))
            _axpy_(accumulator, array, weight)
            self._weights[name] = self._weights.get(name, 0.0) + weight
        self._count += 1

    def result(self) -> TensorDict:
        """The aggregate. Divides the running sums in place (no second model-sized buffer),
        so an aggregation gives its result once."""
        if self._finished:
            raise AggregationError("this aggregation already gave its result", reason="aggregation_finished")
        self._finished = True
        out: TensorDict = {}
        for name, base_array in self._base.items():
            total = self._weights.get(name, 0.0)
            if total <= 0:
                out[name] = np.array(base_array, copy=True)
                continue
            out[name] = self._sums.pop(name).div_(total).numpy().astype(base_array.dtype, copy=False)
        return out


def _accumulator_dtype(dtype: np.dtype) -> torch.dtype:
    # float32 sums keep the fold memory-bound; integer tensors (counters, buffers)
    # are averaged in float64 and rounded back by astype.
    if dtype == np.float32 or dtype == np.float16:
        return torch.float32
    return torch.float64


class FedAvg(Strategy):
    """Sample-weighted federated averaging (McMahan et al.), folded in as updates arrive."""

    name = "fedavg"

    def start(self, base: Mapping[str, np.ndarray], *, store: ContentStore | None = None) -> Aggregation:
        return _FedAvgAggregation(base)


STRATEGIES: dict[str, Callable[..., Strategy]] = {FedAvg.name: FedAvg}
