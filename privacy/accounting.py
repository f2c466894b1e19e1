"""Privacy accounting: (ε, δ) of a history of Gaussian releases, by Google's `dp-accounting` RDP accountant.

A history is a list of `PrivacyEvent`s (noise multiplier, sampling rate, how many releases); the
accountant composes them in Rényi DP and converts to (ε, δ). Nothing here is stored: callers keep
the history (the aggregator keeps it in its journal), so ε is always recomputable.

Sampling rate 1.0 means every device counted is in every release it is charged for: no
amplification by subsampling is claimed (Strata's selection is not Poisson sampling).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import dp_accounting

# the RDP orders the accountant evaluates: dp-accounting's default grid, extended for large ε
_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]


@dataclass(frozen=True)
class PrivacyEvent:
    """`count` releases of the Gaussian mechanism with `noise_multiplier` (std / sensitivity),
    each over a population sampled with probability `sample_rate`."""

    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1


def epsilon_of(events: Iterable[PrivacyEvent], delta: float) -> float:
    """ε such that the composed events are (ε, δ)-DP; 0.0 for no events, inf if any event has no noise."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    accountant = dp_accounting.rdp.RdpAccountant(_ORDERS)
    composed = False
    for event in events:
        if event.count <= 0:
            continue
        if event.noise_multiplier <= 0 or not math.isfinite(event.noise_multiplier):
            return math.inf
        gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
        sampled = gaussian if event.sample_rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(event.sample_rate, gaussian)
        accountant.compose(sampled, event.count)
        composed = True
    return float(accountant.get_epsilon(delta)) if composed else 0.0


def merge(events: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """Equal (noise multiplier, sample rate) events summed into one each: a short history to compose."""
    counts: dict[tuple[float, float], int] = {}
    for event in events:
        key = (event.noise_multiplier, event.sample_rate)
        counts[key] = counts.get(key, 0) + event.count
    return [PrivacyEvent(noise, rate, count) for (noise, rate), count in counts.items()]
