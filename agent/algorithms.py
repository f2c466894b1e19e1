"""The non-IID algorithms a federation's round config may ask the local objective to follow.

Kept apart from ``agent.trainer`` (which re-exports them) so the built-in tasks can use them
without importing the module that loads tasks. No torch here: users' trainers may not have it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from proto.errors import InvalidInput
from storage.control import SCAFFOLD, scaffold_enabled

Weights = dict[str, np.ndarray]

PROX_MU = "prox_mu"
# what the agent adds to the round config handed to a trainer when SCAFFOLD is on: c - c_i per trained tensor
SCAFFOLD_CORRECTION = "scaffold_correction"
# the metrics a SCAFFOLD trainer reports: K local steps of (effective) step size eta
SCAFFOLD_STEPS = "scaffold_steps"
SCAFFOLD_LR = "scaffold_lr"


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


def scaffold_correction(round_config: Mapping[str, Any]) -> Weights | None:
    """SCAFFOLD's gradient correction ``c - c_i`` per trained tensor, as the agent put it in the round
    config handed to the trainer; None when the federation does not ask for SCAFFOLD."""
    correction = round_config.get(SCAFFOLD_CORRECTION)
    if correction is None:
        return None
    if not isinstance(correction, Mapping):
        raise InvalidInput(f"round config {SCAFFOLD_CORRECTION} must map tensor names to arrays", reason="bad_round_config")
    return {name: np.asarray(value, dtype=np.float32) for name, value in correction.items()}


def momentum_step_size(lr: float, momentum: float, steps: int) -> float:
    """The step size eta that makes ``steps`` heavy-ball steps (lr, momentum, buffer starting at the first
    gradient) of a constant gradient g move the weights by ``steps * eta * g``: what SCAFFOLD's option II
    divides by, so a momentum trainer's variate is an average gradient, not 1/(1 - momentum) of one."""
    if steps <= 0:
        return lr
    if not momentum:
        return lr
    # sum over k = 1..K of (1 - m^k) / (1 - m)
    total = (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (1 - momentum)
    return lr * total / steps


def variate_update(
    base: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    server: Mapping[str, np.ndarray],
    client: Mapping[str, np.ndarray],
    *,
    steps: int,
    lr: float,
) -> tuple[Weights, Weights]:
    """SCAFFOLD's option II after K = ``steps`` local steps of size eta = ``lr`` from x = ``base`` to
    y = ``trained``: c_i+ = c_i - c + (x - y) / (K eta). Returns (delta_c = c_i+ - c_i, c_i+) over
    ``trained``'s tensors; a tensor missing from ``server`` or ``client`` counts as zeros."""
    if not (steps > 0 and np.isfinite(lr) and lr > 0):
        raise InvalidInput(f"SCAFFOLD needs K > 0 local steps of a positive step size, got K={steps} eta={lr}",
                           reason="bad_scaffold_metrics")
    scale = np.float32(1.0 / (steps * lr))
    delta: Weights = {}
    updated: Weights = {}
    for name, y in trained.items():
        x = np.asarray(base[name], dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        c = np.asarray(server[name], dtype=np.float32) if name in server else np.zeros_like(x)
        c_i = np.asarray(client[name], dtype=np.float32) if name in client else np.zeros_like(x)
        delta[name] = ((x - y) * scale - c).astype(np.float32)
        updated[name] = (c_i + delta[name]).astype(np.float32)
    return delta, updated


def requested_algorithms(round_config: Mapping[str, Any]) -> set[str]:
    """The non-IID algorithms a round config asks the local objective to follow."""
    wanted = {"fedprox"} if prox_mu(round_config) > 0 else set()
    if scaffold_enabled(round_config):
        wanted.add(SCAFFOLD)
    return wanted


def unsupported_algorithms(trainer: object, round_config: Mapping[str, Any]) -> set[str]:
    """The algorithms ``round_config`` asks for that ``trainer`` does not declare in ``round_algorithms``."""
    return requested_algorithms(round_config) - set(getattr(trainer, "round_algorithms", ()))
