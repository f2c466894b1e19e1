"""Server optimizers on top of any aggregation rule: FedAvgM, FedAdam, FedYogi (Reddi et al. 2021).

The rule's aggregate x̄ and the round's base x give a pseudo-gradient Δ = x̄ − x; the optimizer
turns it into the next cluster model, with the update rules of Flower's strategies:

- ``fedavgm`` (lr η, momentum μ): v ← μ·v + (x − x̄);  x' = x − η·v
- ``fedadam`` (lr η, beta1, beta2, tau): m ← β₁m + (1−β₁)Δ;  v ← β₂v + (1−β₂)Δ²;
  x' = x + η·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + τ)
- ``fedyogi`` (same parameters): m as Adam;  v ← v − (1−β₂)Δ²·sign(v − Δ²);  x' = x + η·m / (√v + τ)

Only floating tensors are stepped; others take the rule's aggregate. The optimizer's state
(step t, m, v) is per cluster: after each step it is written to the store as a safetensors
blob (durably, like every blob) and its CID goes into the cluster manifest
(`extra.aggregation.server_opt`), so a restarted aggregator resumes from the last closed
round's manifest (`Strategy.resume`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from aggregator.strategies import Aggregation, Strategy, TensorDict
from proto.errors import InvalidInput
from storage.codec import decode_tensors, encode_tensors
from storage.store import ContentStore


class ServerOptimizer:
    """The state and step of one server optimizer; `step` is a pure function of (state, base, aggregate)."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, float]]

    def __init__(self, **params: float) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise InvalidInput(f"server_opt {self.name!r} takes {sorted(self.defaults)}, not {unknown}", reason="bad_config")
        self.hyper = {**self.defaults, **{k: float(v) for k, v in params.items()}}
        if not all(math.isfinite(v) for v in self.hyper.values()) or self.hyper["lr"] <= 0:
            raise InvalidInput(f"server_opt {self.name!r}: parameters must be finite and lr > 0, got {self.hyper}", reason="bad_config")
        for beta in ("beta1", "beta2", "momentum"):
            if beta in self.hyper and not 0 <= self.hyper[beta] < 1:
                raise InvalidInput(f"server_opt {self.name!r}: {beta} must be in [0, 1)", reason="bad_config")
        self.t = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}  # slot ("m", "v") -> tensor name -> array

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.hyper)}

    def step(self, base: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> TensorDict:
        self.t += 1
        out: TensorDict = {}
        for name, reference in base.items():
            if reference.dtype.kind != "f":
                out[name] = np.array(aggregate[name], copy=True)
                continue
            x = reference.astype(np.float32)
            delta = aggregate[name].astype(np.float32) - x
            out[name] = self._apply(name, x, delta).astype(reference.dtype, copy=False)
        return out

    def _slot(self, slot: str, name: str, like: np.ndarray) -> np.ndarray:
        return self.state.setdefault(slot, {}).get(name, np.zeros_like(like))

    def _apply(self, name: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ---------------------------------------------------------------- persistence

    def save(self, store: ContentStore) -> str:
        tensors = {f"{slot}/{name}": array for slot, arrays in self.state.items() for name, array in arrays.items()}
        tensors["t"] = np.array([self.t], np.int64)
        return store.put(encode_tensors(tensors))

    def load(self, store: ContentStore, cid: str) -> None:
        tensors = decode_tensors(store.get(cid))
        self.t = int(tensors.pop("t")[0])
        self.state = {}
        for key, array in tensors.items():
            slot, name = key.split("/", 1)
            self.state.setdefault(slot, {})[name] = array


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    defaults: ClassVar[dict[str, float]] = {"lr": 1.0, "momentum": 0.9}

    def _apply(self, name: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        velocity = self.hyper["momentum"] * self._slot("v", name, x) - delta  # pseudo-gradient x - x̄ = -Δ
        self.state["v"][name] = velocity
        return x - self.hyper["lr"] * velocity


class FedAdam(ServerOptimizer):
    name = "fedadam"
    defaults: ClassVar[dict[str, float]] = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9}

    def _moments(self, name: str, x: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b1 = self.hyper["beta1"]
        m = b1 * self._slot("m", name, x) + (1 - b1) * delta
        self.state["m"][name] = m
        return m, self._slot("v", name, x)

    def _apply(self, name: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        m, v = self._moments(name, x, delta)
        b1, b2 = self.hyper["beta1"], self.hyper["beta2"]
        v = b2 * v + (1 - b2) * delta * delta
        self.state.setdefault("v", {})[name] = v
        lr = self.hyper["lr"] * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        return x + lr * m / (np.sqrt(v) + self.hyper["tau"])


class FedYogi(FedAdam):
    name = "fedyogi"
    defaults: ClassVar[dict[str, float]] = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}

    def _apply(self, name: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        m, v = self._moments(name, x, delta)
        squared = delta * delta
        v = v - (1 - self.hyper["beta2"]) * squared * np.sign(v - squared)
        self.state.setdefault("v", {})[name] = v
        return x + self.hyper["lr"] * m / (np.sqrt(v) + self.hyper["tau"])


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {opt.name: opt for opt in (FedAvgM, FedAdam, FedYogi)}


class _Optimized(Aggregation):
    def __init__(self, inner: Aggregation, optimizer: ServerOptimizer, base: Mapping[str, np.ndarray], store: ContentStore | None) -> None:
        self._inner, self._optimizer, self._base, self._store = inner, optimizer, base, store
        self._record: dict[str, Any] = {}

    @property
    def count(self) -> int:
        return self._inner.count

    def add(self, update: Mapping[str, np.ndarray], weight: float, *, label: str = "", weights_cid: str = "") -> None:
        self._inner.add(update, weight, label=label, weights_cid=weights_cid)

    def result(self) -> TensorDict:
        stepped = self._optimizer.step(self._base, self._inner.result())
        self._record = {"name": self._optimizer.name, "step": self._optimizer.t}
        if self._store is not None:
            self._record["state"] = self._optimizer.save(self._store)
        return stepped

    def report(self) -> dict[str, Any]:
        return {**self._inner.report(), "server_opt": dict(self._record)}


class ServerOptimized(Strategy):
    """Any rule, then a server optimizer step; describes itself as the rule plus `server_opt`."""

    def __init__(self, rule: Strategy, optimizer: ServerOptimizer) -> None:
        self.rule, self.optimizer = rule, optimizer
        self.name = rule.name  # type: ignore[misc]

    def params(self) -> dict[str, Any]:
        return self.rule.params()

    def describe(self) -> dict[str, Any]:
        return {**self.rule.describe(), "server_opt": self.optimizer.describe()}

    def start(self, base: Mapping[str, np.ndarray], *, store: ContentStore | None = None) -> Aggregation:
        return _Optimized(self.rule.start(base, store=store), self.optimizer, base, store)

    def resume(self, store: ContentStore, report: Mapping[str, Any]) -> None:
        record = report.get("server_opt")
        if isinstance(record, Mapping) and record.get("name") == self.optimizer.name and record.get("state"):
            self.optimizer.load(store, str(record["state"]))
