"""Buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022): the pure parts.

In `round.mode: buffered` an aggregator has no round barrier. Its open round is a
buffer: it takes updates from whoever is ready and applies a server step once
`buffer_size` (K) of them are in; each step is one round number, so "staleness"
is the number of steps between the base an update was trained on and the base it
is folded into. An agent that submitted trains again on the newest base at once.

The step is FedBuff's: the buffer's deltas, each taken against the base its
update was trained on, are averaged with weights num_samples x discount(staleness)
and applied to the current base, optionally through a server optimizer (FedAvgM
with momentum 0 and lr η is FedBuff's server learning rate η):

    x' = x + η · Σ_i w_i (y_i − x_{s_i}) / Σ_i w_i

The rules and optimizers take whole models, so a stale update y_i trained on
x_{s_i} enters the rule *rebased* onto the current base, x + (y_i − x_{s_i});
a fresh update is unchanged. Then FedAvg of the rebased updates is exactly
x + Σ w_i Δ_i / Σ w_i, and every rule (median, Krum, ...) compares deltas on a
common footing.

Synthesis with peers runs on its own cadence: after `every_steps` steps or at
the first step `every_s` seconds after the last synthesis, whichever comes first.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def rebase(
    update: Mapping[str, np.ndarray], trained_on: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """`update` trained on `trained_on`, moved onto `current`: current + (update - trained_on).

    Floating tensors only (a counter or an index tensor is no delta: it is taken as sent). The
    inputs are not modified; the result has each tensor's dtype of `update`."""
    out: dict[str, np.ndarray] = {}
    for name, value in update.items():
        if value.dtype.kind != "f":
            out[name] = value
            continue
        delta = value.astype(np.float64) - trained_on[name].astype(np.float64)
        out[name] = (current[name].astype(np.float64) + delta).astype(value.dtype)
    return out


def synthesis_due(*, steps_since: int, seconds_since: float, every_steps: int, every_s: float) -> bool:
    """Whether a buffered aggregator blends with its peers at this step (0 disables a trigger)."""
    return (every_steps > 0 and steps_since >= every_steps) or (every_s > 0 and seconds_since >= every_s)
