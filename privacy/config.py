"""A federation's DP settings (the aggregator's `privacy:` section) and the round-config keys of local DP.

Local DP reaches devices the way every training setting does: in the round config the home hands
each agent when it joins (`dp_clip`, `dp_noise_multiplier`). The agent applies it before upload and
names the values in its update's manifest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proto.errors import ConfigError, InvalidInput

# the round-config keys that carry local DP to agents
ROUND_KEY_CLIP = "dp_clip"
ROUND_KEY_NOISE = "dp_noise_multiplier"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _finite_non_negative(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LocalDpSettings:
    clip: float = _help("device-level DP: each device clips its update's delta to this L2 norm; 0 disables", default=0.0)
    noise_multiplier: float = _help("device-level DP: Gaussian noise std = this x clip, added on the device", default=0.0)

    def __post_init__(self) -> None:
        _finite_non_negative(self.clip, "privacy.local.clip")
        _finite_non_negative(self.noise_multiplier, "privacy.local.noise_multiplier")
        if self.noise_multiplier > 0 and self.clip == 0:
            raise ConfigError("privacy.local.noise_multiplier needs privacy.local.clip > 0")

    @property
    def enabled(self) -> bool:
        return self.clip > 0


@dataclass(frozen=True, kw_only=True)
class CentralDpSettings:
    clip: float = _help("cluster-level DP: the aggregator clips each update's delta to this L2 norm (the initial norm when adaptive); 0 disables", default=0.0)
    noise_multiplier: float = _help("cluster-level DP: noise std on the cluster sum = this x clip (includes the adaptive count's share)", default=0.0)
    adaptive: bool = _help("adapt the clip norm each round towards target_quantile of the update norms", default=False)
    target_quantile: float = _help("adaptive clipping: the share of updates meant to fall under the clip norm", default=0.5)
    clip_learning_rate: float = _help("adaptive clipping: geometric step of the clip norm per round", default=0.2)
    clipped_count_stddev: float = _help("adaptive clipping: noise std on the unclipped count; 0: max(updates/20 as Flower, noise_multiplier)", default=0.0)
    seed: int = _help("seed of the aggregator's noise; 0: fresh OS entropy (use 0 in production)", default=0)

    def __post_init__(self) -> None:
        _finite_non_negative(self.clip, "privacy.central.clip")
        _finite_non_negative(self.noise_multiplier, "privacy.central.noise_multiplier")
        _finite_non_negative(self.clipped_count_stddev, "privacy.central.clipped_count_stddev")
        if not 0 < self.target_quantile < 1:
            raise ConfigError("privacy.central.target_quantile must be in (0, 1)")
        if not (math.isfinite(self.clip_learning_rate) and self.clip_learning_rate > 0):
            raise ConfigError("privacy.central.clip_learning_rate must be > 0")
        if (self.noise_multiplier > 0 or self.adaptive) and self.clip == 0:
            raise ConfigError("privacy.central.noise_multiplier and adaptive need privacy.central.clip > 0")
        if self.adaptive and 0 < self.clipped_count_stddev <= self.noise_multiplier / 2:
            # the noised count would cost the whole budget σ (privacy.mechanism.effective_noise_multiplier)
            raise ConfigError("privacy.central.clipped_count_stddev must be > noise_multiplier / 2")

    @property
    def enabled(self) -> bool:
        return self.clip > 0


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    target_epsilon: float = _help("the federation's privacy budget: training stops before ε would exceed it; 0: no budget", default=0.0)
    delta: float = _help("the δ of every (ε, δ) reported and enforced", default=1e-5)
    local: LocalDpSettings = field(default_factory=LocalDpSettings, metadata={"help": "device-level (local) DP"})
    central: CentralDpSettings = field(default_factory=CentralDpSettings, metadata={"help": "cluster-level (central) DP"})

    def __post_init__(self) -> None:
        _finite_non_negative(self.target_epsilon, "privacy.target_epsilon")
        if not 0 < self.delta < 1:
            raise ConfigError("privacy.delta must be in (0, 1)")

    @property
    def enabled(self) -> bool:
        return self.local.enabled or self.central.enabled

    def round_config(self) -> dict[str, str]:
        """The round-config entries that tell agents to apply local DP (none when it is off)."""
        if not self.local.enabled:
            return {}
        return {ROUND_KEY_CLIP: repr(self.local.clip), ROUND_KEY_NOISE: repr(self.local.noise_multiplier)}


@dataclass(frozen=True)
class LocalDp:
    """Local DP as a device reads it from its round config."""

    clip: float
    noise_multiplier: float

    @classmethod
    def from_round_config(cls, round_config: Mapping[str, Any]) -> LocalDp | None:
        """The home's local-DP request, or None when it asks for none. A malformed value is refused
        (never silently dropped: that would upload an update the federation meant to protect)."""
        if ROUND_KEY_CLIP not in round_config:
            return None
        try:
            clip = float(round_config[ROUND_KEY_CLIP])
            noise = float(round_config.get(ROUND_KEY_NOISE, 0.0))
        except (TypeError, ValueError):
            raise InvalidInput(f"round config {ROUND_KEY_CLIP}/{ROUND_KEY_NOISE} are not numbers", reason="bad_round_config") from None
        if not (math.isfinite(clip) and clip > 0 and math.isfinite(noise) and noise >= 0):
            raise InvalidInput(f"round config asks for local DP with clip {clip} and noise {noise}", reason="bad_round_config")
        return cls(clip=clip, noise_multiplier=noise)

    def record(self) -> dict[str, Any]:
        """What an update's manifest says about the DP applied to it."""
        return {"mechanism": "gaussian", "clip": self.clip, "noise_multiplier": self.noise_multiplier}
