"""Held-out evaluation: an aggregator measures the models it makes on a held-out split.

Agents report the base model's metrics on their own data (personalized evaluation); that
says how well a semi-global model serves the agents, not how well it generalizes. When the
federation's model comes from a built-in task, the aggregator can also evaluate its cluster
and semi-global models on the task's held-out split (opt-in: the `evaluation` config key;
`strata/` wires the task in, since the aggregator never imports the agent's tasks).

The results go into the model's manifest metrics as `heldout_<name>`. That prefix is the
aggregator's own: the same keys in an agent's metrics, or averaged from peers' cluster models,
would be claims nobody measured here, so they are dropped before averaging (`without_heldout`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np

log = logging.getLogger("strata.aggregator.evaluation")

HELDOUT_PREFIX = "heldout_"

Evaluate = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]
"""A model's weights in, its metrics on the held-out split out (e.g. accuracy, loss)."""


def heldout_metrics(evaluate: Evaluate | None, tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`evaluate(tensors)` as heldout_<name> metrics; {} without an evaluator, or if it fails
    (an evaluation is a report: its failure is logged and must never fail a round)."""
    if evaluate is None:
        return {}
    try:
        metrics = evaluate(tensors)
    except Exception:
        log.exception("heldout_evaluation_failed")
        return {}
    return {f"{HELDOUT_PREFIX}{name}": float(value) for name, value in metrics.items() if math.isfinite(value)}


def without_heldout(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` minus heldout_* keys: only this aggregator's own evaluation may name them."""
    return {name: value for name, value in metrics.items() if not name.startswith(HELDOUT_PREFIX)}


def heldout_of(metrics: Mapping[str, float]) -> dict[str, float]:
    """The heldout_* metrics of a manifest, without the prefix."""
    return {name.removeprefix(HELDOUT_PREFIX): value for name, value in metrics.items() if name.startswith(HELDOUT_PREFIX)}
