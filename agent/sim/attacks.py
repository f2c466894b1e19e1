"""Hostile devices for `strata simulate` and the attack bench: what a poisoning device sends.

A share of the fleet (`--attackers`) is hostile; each hostile device trains like the others and
then turns its honest update into the attack's (`--attack`):

- `sign_flip`: the delta reversed, base − Δ (gradient ascent);
- `scale`: the delta times `scale` (×10, ×100: model replacement);
- `gaussian`: the update replaced by the base plus N(0, scale²) noise per coordinate;
- `label_flip`: honest training on flipped labels (c → classes − 1 − c); needs a task trainer;
- `little_is_enough` (Baruch et al., NeurIPS 2019): the colluders send the same μ − z·σ, where μ and
  σ are the per-coordinate mean and std of their honest deltas: small, coordinated, and within the
  spread of honest updates, so it stays under norm bounds and outlier screens;
- `inflate_samples`: a sign-flipped update that claims `scale` × its sample count, to outweigh
  honest devices wherever the count is a weight.

The transforms are pure functions over ``dict[str, np.ndarray]`` (inputs never mutated), shared by
the simulator and bench/attacks.py. A malicious *aggregator* is bench-only (`poison_model`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from proto.errors import ConfigError

Weights = dict[str, np.ndarray]
Tensors = Mapping[str, np.ndarray]

ATTACKS = ("sign_flip", "scale", "gaussian", "label_flip", "little_is_enough", "inflate_samples")
# the wire caps num_samples below 2^63; an inflated claim stays a valid (if absurd) number
MAX_CLAIM = 2**62


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _combine(base: Tensors, weights: Tensors, fn) -> Weights:
    """{name: fn(base, weights)} over float tensors in float64, cast back; other tensors copied."""
    out: Weights = {}
    for name, array in weights.items():
        if not _is_float(array):
            out[name] = np.array(array, copy=True)
            continue
        value = fn(base[name].astype(np.float64, copy=False), array.astype(np.float64, copy=False))
        out[name] = value.astype(array.dtype)
    return out


def sign_flip(base: Tensors, weights: Tensors) -> Weights:
    """base − (weights − base)."""
    return _combine(base, weights, lambda b, w: 2.0 * b - w)


def scale_update(base: Tensors, weights: Tensors, factor: float) -> Weights:
    """base + factor · (weights − base)."""
    return _combine(base, weights, lambda b, w: b + factor * (w - b))


def gaussian_update(base: Tensors, weights: Tensors, std: float, rng: np.random.Generator) -> Weights:
    """base + N(0, std²) per coordinate: the honest update thrown away."""
    return _combine(base, weights, lambda b, w: b + rng.standard_normal(b.shape) * std)


def alie_z(devices: int, attackers: int) -> float:
    """Baruch et al.'s z_max: the largest shift that still leaves the attackers inside the majority.

    s = ⌊n/2 + 1⌋ − m devices must be "won over"; z = Φ⁻¹((n − s) / n)."""
    if devices <= 0 or attackers <= 0:
        return 0.0
    supporters = math.floor(devices / 2 + 1) - attackers
    quantile = (devices - supporters) / devices
    quantile = min(max(quantile, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(quantile)


def little_is_enough(base: Tensors, honest: Sequence[Tensors], z: float) -> Weights:
    """base + μ − z·σ, with μ, σ the per-coordinate mean and (population) std of the honest deltas."""
    if not honest:
        raise ValueError("little_is_enough needs at least one honest update")

    def shifted(name: str, b: np.ndarray) -> np.ndarray:
        deltas = np.stack([h[name].astype(np.float64, copy=False) - b for h in honest])
        return b + deltas.mean(axis=0) - z * deltas.std(axis=0)

    out: Weights = {}
    for name, array in honest[0].items():
        if not _is_float(array):
            out[name] = np.array(array, copy=True)
            continue
        out[name] = shifted(name, base[name].astype(np.float64, copy=False)).astype(array.dtype)
    return out


def inflate_samples(num_samples: int, factor: float) -> int:
    """The claimed sample count: `factor` × the true one, kept a valid wire value."""
    return int(min(max(1, round(num_samples * factor)), MAX_CLAIM))


def poison_model(base: Tensors, model: Tensors, *, kind: str = "sign_flip", factor: float = 10.0) -> Weights:
    """A malicious aggregator's cluster model (bench-only): its honest model's delta flipped and scaled."""
    if kind == "sign_flip":
        return scale_update(base, model, -factor)
    if kind == "scale":
        return scale_update(base, model, factor)
    raise ValueError(f"unknown aggregator poisoning {kind!r}")


# ------------------------------------------------------------------ the fleet's hostile devices


@dataclass(frozen=True, kw_only=True)
class AttackOptions:
    """Which attack, on what share of the fleet, how strong."""

    name: str = ""
    share: float = 0.0
    # scale: the factor; gaussian: the noise std; inflate_samples: the claim multiplier
    scale: float = 10.0
    # little_is_enough's z; 0 derives Baruch et al.'s z_max from the fleet size and the attackers
    z: float = 0.0

    def __post_init__(self) -> None:
        if self.name and self.name not in ATTACKS:
            raise ConfigError(f"attack must be one of {list(ATTACKS)}, got {self.name!r}", reason="bad_attack")
        if not 0 <= self.share <= 1:
            raise ConfigError("attackers must be a share in [0, 1]", reason="bad_attack")
        if self.share > 0 and not self.name:
            raise ConfigError("attackers > 0 needs an --attack", reason="bad_attack")
        if not (math.isfinite(self.scale) and self.scale > 0) or not (math.isfinite(self.z) and self.z >= 0):
            raise ConfigError("attack scale must be > 0 and z >= 0", reason="bad_attack")

    @property
    def active(self) -> bool:
        return bool(self.name) and self.share > 0


class FleetAttack:
    """The hostile devices' shared side: the transform, and the colluders' pool for little_is_enough.

    Colluders share their honest deltas per base model; each one sends μ − z·σ over the pool as it
    stands when it has trained (itself included), so the first colluder of a round sends its
    honest mean and later ones the coordinated shift. The bench's variant sees every honest update.
    """

    def __init__(self, options: AttackOptions, *, devices: int, attackers: int, seed: int = 0) -> None:
        self.options = options
        self._z = options.z or alie_z(devices, attackers)
        self._lock = threading.Lock()
        self._pools: OrderedDict[str, list[Weights]] = OrderedDict()
        self._seed = seed

    def apply(
        self, *, index: int, base_cid: str, base: Tensors, weights: Tensors, num_samples: int
    ) -> tuple[Weights, int]:
        """The hostile device `index`'s (weights, claimed samples) from its honest ones."""
        name, scale = self.options.name, self.options.scale
        if name == "sign_flip":
            return sign_flip(base, weights), num_samples
        if name == "scale":
            return scale_update(base, weights, scale), num_samples
        if name == "gaussian":
            rng = np.random.default_rng([self._seed, index, len(base_cid)])
            return gaussian_update(base, weights, scale, rng), num_samples
        if name == "label_flip":
            return dict(weights), num_samples  # the poison is in the training data (the task's label_flip)
        if name == "inflate_samples":
            return sign_flip(base, weights), inflate_samples(num_samples, scale)
        with self._lock:
            pool = self._pools.setdefault(base_cid, [])
            pool.append({k: np.array(v, copy=True) for k, v in weights.items()})
            while len(self._pools) > 2:  # only the current bases' pools are of use
                self._pools.popitem(last=False)
            honest = list(pool)
        return little_is_enough(base, honest, self._z), num_samples
