"""Device-level (local) DP: what the agent does to an update before it leaves the device.

The home asks for it in the round config (`dp_clip`, `dp_noise_multiplier`; see
`privacy.config`). The update's delta against the base it was trained from is clipped to norm C
and Gaussian noise of std σ·C is added to it, on the device, so neither the home nor anyone
after it sees the raw update. The values applied are named in the update's manifest
(`extra.dp`), which is how the aggregator's accountant and an operator reading lineage know.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privacy.config import LocalDp
from privacy.mechanism import privatize_update
from proto.errors import InvalidInput

log = logging.getLogger("strata.agent.privacy")


def apply_local_dp(
    base: Mapping[str, np.ndarray],
    weights: Mapping[str, np.ndarray],
    round_config: Mapping[str, Any],
    *,
    tensors: Sequence[str] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """(the weights to upload, the manifest's DP record or None) under the home's round config.

    `tensors` limits DP to a partial update's tensors (the others are not sent). Without a local-DP
    request the weights pass through unchanged and the record is None."""
    request = LocalDp.from_round_config(round_config)
    if request is None:
        return dict(weights), None
    names = list(tensors) if tensors else sorted(weights)
    sent = {name: weights[name] for name in names if name in weights}
    unknown = sorted(set(sent) - set(base))
    if unknown:
        raise InvalidInput(f"weights carry tensors the base lacks: {unknown[:5]}", reason="bad_update")
    noised, norm = privatize_update(
        {name: base[name] for name in sent},
        sent,
        clip=request.clip,
        noise_multiplier=request.noise_multiplier,
        # fresh OS entropy: a device's noise must not be predictable from anything it shares
        rng=rng if rng is not None else np.random.default_rng(),
    )
    log.debug("local_dp_applied", extra={"fields": {"delta_norm": round(norm, 6), "clip": request.clip, "clipped": norm > request.clip}})
    return {**weights, **noised}, request.record()
