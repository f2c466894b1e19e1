"""What a virtual device trains with: nothing, noise, or a built-in task on its own data slice.

- `none`: the device joins, watches and heartbeats, and never downloads or submits
  (a connected, idle fleet: what `bench/scale.py` holds open).
- `noise`: the base plus Gaussian noise; costs microseconds, so 10,000 devices
  can submit every round on two cores. Each device claims a fixed sample count.
- a built-in task (`digits`, `mnist`, `fashion_mnist`): the task's real training on a non-IID slice
  of its data (`agent.tasks.partition`), one task object per device, built on
  first use. The torch work runs in the simulator's thread pool, never on the loop.

`make_trainer(options)` picks one; `for_device(plan)` gives a device its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from agent.sim.options import TRAINER_NOISE, TRAINER_NONE, SimOptions
from agent.sim.schedule import DevicePlan

Weights = dict[str, np.ndarray]


class DeviceTrainer(Protocol):
    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any]) -> tuple[Weights, int, dict[str, float]]:
        ...

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        ...


class FleetTrainer(Protocol):
    name: str
    trains: bool

    def for_device(self, plan: DevicePlan) -> DeviceTrainer:
        ...


class NoTrainer:
    name = TRAINER_NONE
    trains = False

    def for_device(self, plan: DevicePlan) -> DeviceTrainer:
        raise AssertionError("devices of the 'none' trainer never train")


class _NoiseDevice:
    def __init__(self, *, seed: int, scale: float, num_samples: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._scale = np.float32(scale)
        self._num_samples = num_samples

    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any]) -> tuple[Weights, int, dict[str, float]]:
        updated = {
            name: (array + self._rng.standard_normal(array.shape, dtype=np.float32) * self._scale).astype(array.dtype)
            for name, array in weights.items()
        }
        return updated, self._num_samples, {"noise_scale": float(self._scale)}

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {}


class NoiseTrainer:
    """The base plus N(0, scale^2) noise per element."""

    name = TRAINER_NOISE
    trains = True

    def __init__(self, *, seed: int, scale: float) -> None:
        self._seed = seed
        self._scale = scale

    def for_device(self, plan: DevicePlan) -> DeviceTrainer:
        # a device's sample-count claim: 16..255, fixed for the run
        return _NoiseDevice(seed=self._seed * 1_000_003 + plan.index, scale=self._scale, num_samples=16 + plan.index * 37 % 240)


class _LazyTaskDevice:
    """One device's task object, built on first use (in the thread pool: partitioning and torch cost ms)."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self._name = name
        self._options = options
        self._task: Any = None

    def _get(self) -> Any:
        if self._task is None:
            from agent.tasks import make_task  # lazy: torch loads only for task trainers

            self._task = make_task(self._name, **self._options)
        return self._task

    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any]) -> tuple[Weights, int, dict[str, float]]:
        return self._get().train(weights, round_config)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self._get().evaluate(weights)


class TaskTrainer:
    """A built-in task; each device trains on its own partition of the task's training data."""

    trains = True

    def __init__(self, name: str, *, count: int, scheme: str, alpha: float, seed: int, flip_hostile: bool = False) -> None:
        from agent.tasks import builtin_task

        builtin_task(name)  # an unknown task fails here, before any device starts
        self.name = name
        self._count = count
        self._scheme = scheme
        self._alpha = alpha
        self._seed = seed
        self._flip_hostile = flip_hostile

    def for_device(self, plan: DevicePlan) -> DeviceTrainer:
        partition = {"scheme": self._scheme, "alpha": self._alpha, "index": plan.index, "count": self._count, "seed": self._seed}
        options: dict[str, Any] = {"partition": partition, "seed": plan.index, "torch_threads": 1}
        if self._flip_hostile and plan.hostile:
            options["label_flip"] = True
        return _LazyTaskDevice(self.name, options)


def make_trainer(options: SimOptions) -> FleetTrainer:
    if options.trainer == TRAINER_NONE:
        return NoTrainer()
    if options.trainer == TRAINER_NOISE:
        return NoiseTrainer(seed=options.seed, scale=options.noise_scale)
    return TaskTrainer(
        options.trainer,
        count=options.agents,
        scheme=options.partition,
        alpha=options.alpha,
        seed=options.seed,
        flip_hostile=options.attack.name == "label_flip",
    )
