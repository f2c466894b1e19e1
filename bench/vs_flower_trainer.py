"""The trainer `strata agent run` loads in bench/vs_flower.py (task=vs_flower_trainer:NoiseTrainer).

The same trivial training as the Flower ClientApp in bench/flower_app: every tensor
received plus N(0, 1e-3) float32 noise, reported as 100 samples. No data, no framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

NOISE = 1e-3
NUM_SAMPLES = 100


class NoiseTrainer:
    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def train(
        self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        noisy = {
            name: array + self._rng.standard_normal(array.shape, dtype=np.float32) * np.float32(NOISE)
            for name, array in weights.items()
        }
        return noisy, NUM_SAMPLES, {"loss": 1.0}
