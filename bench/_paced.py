"""A slower MNIST agent for the fleet-scale convergence bench: one aggregator whose agents
take `slowdown` times as long per round, as a cluster of weaker devices would.

The agent trains for real (same data, same steps), then sleeps (slowdown - 1) x the time
that training took, so the pace follows the machine's load instead of a fixed guess.
Loaded by the agent as the custom trainer "_paced:PacedMnistTask" (bench/ is on sys.path
when a bench script runs).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.tasks import MnistTask


class PacedMnistTask(MnistTask):
    def __init__(self, *, slowdown: float = 1.0, **options: Any) -> None:
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown must be >= 1, got {slowdown!r}")
        super().__init__(**options)
        self.slowdown = float(slowdown)

    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any] | None = None) -> Any:
        started = time.monotonic()
        result = super().train(weights, round_config)
        time.sleep((self.slowdown - 1.0) * (time.monotonic() - started))
        return result
