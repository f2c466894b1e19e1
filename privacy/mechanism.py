"""The DP mechanisms on model updates: clip the delta to an L2 ball, add Gaussian noise, adapt the clip.

Pure functions over ``dict[str, np.ndarray]``: no I/O, inputs never mutated. Norms are taken
over the whole update (every tensor it sends), as one vector, in float64; all work is whole-array
numpy, never a Python loop over elements.

An update is sent as full weights; its *delta* is ``update - base``. Clipping scales the delta
by ``min(1, C / ‖delta‖)`` so that one device moves the aggregate by at most C (the
sensitivity the Gaussian mechanism is calibrated to). Integer tensors (counters, buffers) are
passed through unclipped and unnoised: they are not trained parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Tensors = Mapping[str, np.ndarray]


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def delta_norm(base: Tensors, update: Tensors) -> float:
    """‖update − base‖₂ over every float tensor the update carries, as one vector."""
    total = 0.0
    for name, array in update.items():
        if not _is_float(array):
            continue
        delta = array.astype(np.float64, copy=False) - base[name].astype(np.float64, copy=False)
        total += float(np.vdot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def clip_delta(base: Tensors, update: Tensors, clip: float) -> tuple[dict[str, np.ndarray], float]:
    """(base + delta · min(1, clip/‖delta‖), ‖delta‖): the update with its delta clipped to norm `clip`."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip norm must be finite and > 0, got {clip!r}")
    norm = delta_norm(base, update)
    scale = 1.0 if norm <= clip else clip / norm
    if scale == 1.0:
        return {name: np.array(array, copy=True) for name, array in update.items()}, norm
    out: dict[str, np.ndarray] = {}
    for name, array in update.items():
        if not _is_float(array):
            out[name] = np.array(array, copy=True)
            continue
        b = base[name].astype(np.float64, copy=False)
        out[name] = (b + (array.astype(np.float64, copy=False) - b) * scale).astype(array.dtype)
    return out, norm


def add_gaussian_noise(tensors: Tensors, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each float tensor plus independent N(0, std²) per coordinate (a new dict; inputs untouched)."""
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be finite and >= 0, got {std!r}")
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if std == 0 or not _is_float(array):
            out[name] = np.array(array, copy=True)
            continue
        noise = rng.standard_normal(array.shape, dtype=np.float64) * std
        out[name] = (array.astype(np.float64, copy=False) + noise).astype(array.dtype)
    return out


def privatize_update(
    base: Tensors, update: Tensors, *, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], float]:
    """Local DP (the Gaussian mechanism on one device's delta): clip to `clip`, add N(0, (σ·clip)²).

    Returns the privatized update and the delta's norm before clipping (for the device's own logs;
    it is not sent: the norm itself is not private)."""
    clipped, norm = clip_delta(base, update, clip)
    return add_gaussian_noise(clipped, noise_multiplier * clip, rng), norm


def effective_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The noise multiplier left for the updates when adaptive clipping also releases a noised count.

    Andrew et al. 2021 ("Differentially private learning with adaptive clipping", Thm 1): releasing
    the sum of updates with multiplier σ_Δ and the count of unclipped updates with std σ_b costs as
    much as one Gaussian release with σ where σ⁻² = σ_Δ⁻² + (2σ_b)⁻². Given the budgeted σ, the
    updates get σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2). (Flower's server-side adaptive clipping does the same.)
    """
    if noise_multiplier <= 0:
        return 0.0
    rest = noise_multiplier**-2 - (2.0 * clipped_count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"clipped_count_stddev {clipped_count_stddev} is too small for noise multiplier {noise_multiplier}: "
            "the count would spend the whole budget"
        )
    return rest**-0.5


@dataclass(frozen=True, kw_only=True)
class AdaptiveClip:
    """Geometric update of the clip norm towards the `target_quantile` of the update norms.

    After a round with n updates of which `unclipped` had norm <= C, the released fraction
    b̃ = (unclipped + N(0, σ_b²)) / n, and C ← C · exp(−lr · (b̃ − γ)) (Andrew et al. 2021).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    clipped_count_stddev: float = 0.0

    def next_clip(self, clip: float, *, count: int, unclipped: int, rng: np.random.Generator) -> tuple[float, float]:
        """(the next round's clip norm, the noised unclipped fraction it was set from)."""
        if count <= 0:
            return clip, float("nan")
        noised = (unclipped + rng.normal(0.0, self.clipped_count_stddev) if self.clipped_count_stddev > 0 else unclipped) / count
        return clip * math.exp(-self.learning_rate * (noised - self.target_quantile)), noised
