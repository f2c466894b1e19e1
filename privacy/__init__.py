"""Differential privacy shared by the agent (local DP) and the aggregator (central DP).

`mechanism`: clipping an update's delta, Gaussian noise, adaptive clipping (pure numpy).
`accounting`: (ε, δ) of a history of Gaussian releases, through Google's `dp-accounting` RDP accountant.
`config`: the federation's DP settings and the round-config keys that carry local DP to agents.
"""

from privacy.accounting import PrivacyEvent, epsilon_of
from privacy.config import CentralDpSettings, LocalDp, LocalDpSettings, PrivacySettings
from privacy.mechanism import (
    AdaptiveClip,
    add_gaussian_noise,
    clip_delta,
    delta_norm,
    effective_noise_multiplier,
    privatize_update,
)

__all__ = [
    "AdaptiveClip",
    "CentralDpSettings",
    "LocalDp",
    "LocalDpSettings",
    "PrivacyEvent",
    "PrivacySettings",
    "add_gaussian_noise",
    "clip_delta",
    "delta_norm",
    "effective_noise_multiplier",
    "epsilon_of",
    "privatize_update",
]
