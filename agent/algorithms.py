"""The non-IID algorithms a federation's round config may ask the local objective to follow.

Kept apart from ``agent.trainer`` (which re-exports them) so the built-in tasks can use them
without importing the module that loads tasks. No torch here: users' trainers may not have it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from proto.errors import InvalidInput

Weights = dict[str, np.ndarray]

PROX_MU = "prox_mu"


def prox_mu(round_config: Mapping[str, Any]) -> float:
    """FedProx's proximal weight from a round config: 0.0 (plain FedAvg) unless ``prox_mu`` is set."""
    raw = round_config.get(PROX_MU, 0.0)
    try:
        if isinstance(raw, bool):
            raise ValueError
        mu = float(raw)
    except (TypeError, ValueError):
        raise InvalidInput(f"round config {PROX_MU} must be a number, got {raw!r}", reason="bad_round_config") from None
    if not np.isfinite(mu) or mu < 0:
        raise InvalidInput(f"round config {PROX_MU} must be finite and >= 0, got {raw!r}", reason="bad_round_config")
    return mu


def proximal_gradient(weights: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], mu: float) -> Weights:
    """FedProx's term in the gradient of the local objective: ``mu * (w - w_base)`` per tensor."""
    return {name: (np.float32(mu) * (np.asarray(w, dtype=np.float32) - np.asarray(base[name], dtype=np.float32)))
            for name, w in weights.items()}


def requested_algorithms(round_config: Mapping[str, Any]) -> set[str]:
    """The non-IID algorithms a round config asks the local objective to follow."""
    return {"fedprox"} if prox_mu(round_config) > 0 else set()


def unsupported_algorithms(trainer: object, round_config: Mapping[str, Any]) -> set[str]:
    """The algorithms ``round_config`` asks for that ``trainer`` does not declare in ``round_algorithms``."""
    return requested_algorithms(round_config) - set(getattr(trainer, "round_algorithms", ()))
