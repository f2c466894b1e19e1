"""Cluster-level (central) DP and the federation's privacy ledger.

`PrivacyGuard` is the one object a `RoundManager` consults about privacy:

- `wrap(strategy)` returns the strategy with central DP around it (DP wraps a rule rather than
  being one, as Flower's DP strategies do): every update's delta is clipped to the current clip
  norm C and counts with weight 1 (DP-FedAvg: a device's weight must not depend on its own
  claims, or its sensitivity is unbounded); the aggregate gets N(0, (σ_Δ·C/n)²) per coordinate,
  i.e. noise σ_Δ·C on the cluster *sum* of n clipped deltas.
- With `adaptive`, C follows the `target_quantile` of the update norms (Andrew et al. 2021; Flower's
  DifferentialPrivacyServerSideAdaptiveClipping): the count of unclipped updates is released with
  noise σ_b, and σ_Δ is set so that sum and count together cost exactly the budgeted σ.
- The ledger: every closed round records what it released in its journal record
  (`extra.privacy`); on start the guard rebuilds the history from the journal, so ε is always
  recomputable. Per device, local-DP releases are counted from the journaled updates.
- The budget: a round whose release would take ε past `target_epsilon` is not released; the
  federation stops training here (logged once as `privacy_budget_spent`) and refuses further
  updates with reason `privacy_budget_spent`.

See docs/privacy.md for how the guarantees compose from clusters to semi-global models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.journal import RoundRecord
from aggregator.strategies import Aggregation, Strategy, TensorDict, check_compatible
from intake.journal import AcceptedUpdate
from privacy.accounting import PrivacyEvent, epsilon_of, merge
from privacy.config import PrivacySettings
from privacy.mechanism import (
    AdaptiveClip,
    add_gaussian_noise,
    clip_delta,
    effective_noise_multiplier,
)
from storage.manifest import Manifest
from storage.store import ContentStore

log = logging.getLogger("strata.aggregator.privacy")


class PrivacyGuard:
    def __init__(self, settings: PrivacySettings, *, federation: str) -> None:
        self.settings = settings
        self.federation = federation
        central = settings.central
        self.clip = central.clip
        self._rng = np.random.default_rng(central.seed or None)
        self._adaptive = (
            AdaptiveClip(
                target_quantile=central.target_quantile,
                learning_rate=central.clip_learning_rate,
                clipped_count_stddev=central.clipped_count_stddev,
            )
            if central.adaptive
            else None
        )
        # the central releases so far (one event per closed round) and, per device, its local-DP releases
        self._central: list[PrivacyEvent] = []
        self._device: dict[str, list[PrivacyEvent]] = {}
        # what the round being aggregated observed: (updates, unclipped, update noise multiplier)
        self._observed: tuple[int, int, float] | None = None
        self.exhausted = False

    # ------------------------------------------------------------------ restore

    def restore(self, history: Sequence[RoundRecord], updates: Iterable[AcceptedUpdate]) -> None:
        """Rebuild the ledger and the clip norm from the journal's closed rounds."""
        self._central, self._device = [], {}
        local_noise: dict[int, float] = {}
        for record in history:
            spent = record.extra.get("privacy") if record.closed_at is not None else None
            if not isinstance(spent, Mapping):
                continue
            central = spent.get("central")
            if isinstance(central, Mapping):
                self._central.append(PrivacyEvent(float(central["noise_multiplier"])))
                self.clip = float(central.get("next_clip", self.clip))
            local = spent.get("local")
            if isinstance(local, Mapping):
                local_noise[record.round] = float(local["noise_multiplier"])
        for update in updates:
            noise = local_noise.get(update.counted_round)
            if noise is not None:
                self._device.setdefault(update.agent_id, []).append(PrivacyEvent(noise))
        if self.settings.central.enabled and self._central:
            # a federation that stopped before a restart stays stopped: the next release is as unaffordable as it was
            self.affordable(len(self._central), [])

    def local_dp_problem(self, kind: str, raw_manifest: bytes) -> str | None:
        """Why a device update does not meet the federation's local DP (None when it does, or none is asked).

        The device's own signed declaration (`extra.dp`) is all there is to check: noise cannot be
        detected in an update. An update without a manifest declares nothing. A relay's combined
        update is one contribution and is not checked. A manifest that does not parse is left to
        the intake's validation, which refuses it with its own reason."""
        local = self.settings.local
        if not local.enabled or kind != "local":
            return None
        declared = None
        if raw_manifest:
            try:
                manifest = Manifest.from_bytes(raw_manifest)
            except Exception:
                return None
            declared = manifest.extra.get("dp") if isinstance(manifest.extra, Mapping) else None
        if not isinstance(declared, Mapping):
            return f"federation {self.federation} requires local DP (clip {local.clip}, noise {local.noise_multiplier}); the update declares none"
        clip, noise = declared.get("clip"), declared.get("noise_multiplier")
        if not (isinstance(clip, int | float) and isinstance(noise, int | float)):
            return "the update's extra.dp lacks numeric clip and noise_multiplier"
        if clip > local.clip or noise < local.noise_multiplier:
            return (
                f"the update declares local DP clip {clip}, noise {noise}; "
                f"federation {self.federation} requires clip <= {local.clip}, noise >= {local.noise_multiplier}"
            )
        return None

    # ------------------------------------------------------------------ central DP

    def wrap(self, strategy: Strategy) -> Strategy:
        """`strategy` with central DP around it; `strategy` itself when central DP is off."""
        return _CentralDp(strategy, self) if self.settings.central.enabled else strategy

    def _count_stddev(self, count: int) -> float:
        configured = self.settings.central.clipped_count_stddev
        # Flower's default is n/20; never below σ, so the count can never take the whole budget
        return configured if configured > 0 else max(count / 20.0, self.settings.central.noise_multiplier)

    def update_noise_multiplier(self, count: int) -> float:
        """σ_Δ: the multiplier the update sum gets (all of σ without adaptive clipping)."""
        sigma = self.settings.central.noise_multiplier
        if self._adaptive is None or sigma <= 0:
            return sigma
        return effective_noise_multiplier(sigma, self._count_stddev(count))

    def noise(self, aggregate: TensorDict, *, count: int, unclipped: int, clip: float) -> TensorDict:
        """The noised aggregate of `count` updates clipped to `clip` (their mean): std σ_Δ·C/n per coordinate."""
        update_sigma = self.update_noise_multiplier(count)
        self._observed = (count, unclipped, update_sigma)
        return add_gaussian_noise(aggregate, update_sigma * clip / max(count, 1), self._rng)

    # ------------------------------------------------------------------ ledger and budget

    def _epsilons(self, accepted: Sequence[AcceptedUpdate]) -> tuple[float | None, dict[str, float]]:
        """(federation ε under central DP, each contributing device's ε under local DP) if this round is released."""
        delta = self.settings.delta
        central = None
        if self.settings.central.enabled:
            central = epsilon_of(merge([*self._central, PrivacyEvent(self.settings.central.noise_multiplier)]), delta)
        devices: dict[str, float] = {}
        if self.settings.local.enabled:
            step = PrivacyEvent(self.settings.local.noise_multiplier)
            for agent in sorted({u.agent_id for u in accepted}):
                devices[agent] = epsilon_of(merge([*self._device.get(agent, []), step]), delta)
        return central, devices

    @staticmethod
    def _federation_epsilon(central: float | None, devices: Mapping[str, float]) -> float:
        # each bound holds on its own; the central one covers every device, the local one each device
        local = max(devices.values(), default=0.0) if devices else None
        bounds = [b for b in (central, local) if b is not None]
        return min(bounds) if bounds else math.inf

    def affordable(self, round_: int, accepted: Sequence[AcceptedUpdate]) -> bool:
        """Whether releasing this round keeps ε within the budget; False marks the federation exhausted (logged once)."""
        if self.exhausted:
            return False
        target = self.settings.target_epsilon
        if target <= 0 or not self.settings.enabled:
            return True
        central, devices = self._epsilons(accepted)
        epsilon = self._federation_epsilon(central, devices)
        if epsilon <= target:
            return True
        self.exhausted = True
        log.warning(
            "privacy_budget_spent",
            extra={
                "fields": {
                    "federation": self.federation,
                    "round": round_,
                    "epsilon_if_released": round(epsilon, 4),
                    "target_epsilon": target,
                    "delta": self.settings.delta,
                    "action": "training stopped: this round is not released and further updates are refused",
                }
            },
        )
        return False

    def spend(self, round_: int, accepted: Sequence[AcceptedUpdate]) -> dict[str, Any]:
        """Charge this round's release to the ledger; the record for its manifest and journal entry."""
        central_eps, devices = self._epsilons(accepted)
        record: dict[str, Any] = {"delta": self.settings.delta, "target_epsilon": self.settings.target_epsilon}
        if self.settings.central.enabled:
            count, unclipped, update_sigma = self._observed or (len(accepted), len(accepted), 0.0)
            central: dict[str, Any] = {
                "mechanism": "gaussian",
                "clip": self.clip,
                "noise_multiplier": self.settings.central.noise_multiplier,
                "update_noise_multiplier": update_sigma,
                "updates": count,
                "weighting": "uniform (clipped deltas)",
                "rounds": len(self._central) + 1,
                "epsilon": _finite_or_none(central_eps),
            }
            if self._adaptive is not None:
                next_clip, fraction = self._adaptive.next_clip(self.clip, count=count, unclipped=unclipped, rng=self._rng)
                central.update(
                    adaptive={
                        "target_quantile": self._adaptive.target_quantile,
                        "learning_rate": self._adaptive.learning_rate,
                        "clipped_count_stddev": self._count_stddev(count),
                        "unclipped_fraction": _finite_or_none(fraction),
                    },
                    next_clip=next_clip,
                )
            else:
                next_clip = self.clip
            record["central"] = central
            self._central.append(PrivacyEvent(self.settings.central.noise_multiplier))
            self.clip = next_clip
        if self.settings.local.enabled:
            record["local"] = {
                "mechanism": "gaussian",
                "clip": self.settings.local.clip,
                "noise_multiplier": self.settings.local.noise_multiplier,
                "devices": len(devices),
                "max_device_epsilon": _finite_or_none(max(devices.values(), default=0.0)),
                "device_epsilon": {agent: _finite_or_none(eps) for agent, eps in devices.items()},
            }
            for agent in devices:
                self._device.setdefault(agent, []).append(PrivacyEvent(self.settings.local.noise_multiplier))
        # null ε: no noise (clipping alone), so no finite guarantee; canonical JSON has no infinity
        record["epsilon"] = _finite_or_none(self._federation_epsilon(central_eps, devices))
        self._observed = None
        return record

    @property
    def central_epsilon(self) -> float:
        """ε of the central releases so far (0.0 before the first)."""
        return epsilon_of(merge(self._central), self.settings.delta)

    def describe(self) -> dict[str, Any]:
        """The DP parameters, for the cluster manifest's `algorithm`."""
        out: dict[str, Any] = {"delta": self.settings.delta, "target_epsilon": self.settings.target_epsilon}
        if self.settings.central.enabled:
            c = self.settings.central
            out["central"] = {"clip": self.clip, "noise_multiplier": c.noise_multiplier, "adaptive": c.adaptive}
        if self.settings.local.enabled:
            out["local"] = {"clip": self.settings.local.clip, "noise_multiplier": self.settings.local.noise_multiplier}
        return out


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class _CentralDp(Strategy):
    """Any strategy with central DP around it: clipped deltas in, noise on the aggregate out."""

    def __init__(self, inner: Strategy, guard: PrivacyGuard) -> None:
        self._inner = inner
        self._guard = guard
        self.name = inner.name  # type: ignore[misc]  # the rule is still the inner one; DP is in describe()

    def params(self) -> dict[str, Any]:
        return self._inner.params()

    def describe(self) -> dict[str, Any]:
        return {**self._inner.describe(), "dp": self._guard.describe()}

    def resume(self, store: ContentStore, report: Mapping[str, Any]) -> None:
        self._inner.resume(store, report)

    def start(self, base: Mapping[str, np.ndarray], *, store: ContentStore | None = None) -> Aggregation:
        # no store: the inner rule must see the clipped deltas, which a read-back of the stored
        # (unclipped) blobs would bypass, so a store-backed rule keeps them in memory under DP
        return _CentralDpAggregation(self._inner.start(base), base, self._guard)


class _CentralDpAggregation(Aggregation):
    def __init__(self, inner: Aggregation, base: Mapping[str, np.ndarray], guard: PrivacyGuard) -> None:
        self._inner = inner
        self._base = base
        self._guard = guard
        self._clip = guard.clip  # fixed for the round: the adaptive step happens when it closes
        self._unclipped = 0

    @property
    def count(self) -> int:
        return self._inner.count

    def add(self, update: Mapping[str, np.ndarray], weight: float, *, label: str = "", weights_cid: str = "") -> None:
        check_compatible(self._base, update)
        clipped, norm = clip_delta(self._base, update, self._clip)
        self._unclipped += norm <= self._clip
        # weight 1: under DP a device's weight may not follow its own claims (num_samples); no
        # weights_cid: the stored blob is the unclipped update
        self._inner.add(clipped, 1.0, label=label)

    def report(self) -> dict[str, Any]:
        return self._inner.report()

    def result(self) -> TensorDict:
        return self._guard.noise(self._inner.result(), count=self._inner.count, unclipped=self._unclipped, clip=self._clip)
