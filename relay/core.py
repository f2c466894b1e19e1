"""The relay's core: device updates in, one combined update per upstream round out.

`Relay` never imports grpc. The service turns protobuf into a `Submission` and
calls `submit`; the daemon's ticker calls `maybe_close`; the upstream link calls
`adopt_base` when the home aggregator announces a new base.

Windows. Accepted device updates are folded, as they arrive, into one streaming
FedAvg (aggregator.strategies, sample-weighted, per tensor). The open window
closes when it holds `max_devices` updates (capped by the training devices
active, so inference-only devices never count) or `max_wait_s` after its first
update. Closing writes one combined update of kind "relay": only the tensors at
least one device trained, num_samples the sum, metrics the sample-weighted
means, parents the device updates' IDs, base the current upstream base, signed
with the relay's key. The aggregator takes one update per agent per round, so a
window closes at most once per upstream base; updates that arrive after it
closed wait for the next base (within `forward.max_staleness`).

Durability: an update is acknowledged only after its blob and manifest are
stored and the journal recorded it; a restarted relay folds the open window back
in from the store. Device updates and their manifests stay in the relay's store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from aggregator.strategies import Aggregation, FedAvg, weighted_means
from intake.accept import Intake, IntakePolicy, OpenRound
from intake.claims import credit_claims
from intake.home import BaseModel
from intake.journal import AcceptedUpdate
from intake.submission import Submission
from intake.validation import UpdateLimits, squared_norms
from proto.errors import Refusal, Unavailable, UpdateRefused
from relay.cache import ModelCache
from relay.config import RelayConfig
from relay.journal import RelayJournal, WindowRecord
from storage.codec import decode_tensors, encode_tensors
from storage.encodings import FLOAT32, Encoding
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, now_rfc3339
from storage.models import load_model, save_model
from storage.store import ContentStore

log = logging.getLogger("strata.relay")

STALE_AFTER_OUTAGE = "stale_after_outage"


@dataclass(frozen=True, kw_only=True)
class CombinedUpdate:
    """A closed window, ready to go upstream."""

    manifest: Manifest
    tensors: tuple[str, ...]
    base_metrics: dict[str, float]
    record: WindowRecord


class Relay:
    def __init__(
        self,
        *,
        relay_id: str,
        config: RelayConfig,
        store: ContentStore,
        journal: RelayJournal,
        cache: ModelCache,
        key: KeyPair,
        encoding: Callable[[], Encoding] = lambda: FLOAT32,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.relay_id = relay_id
        self.federation = config.federation
        self.config = config
        self.store = store
        self.journal = journal
        self.cache = cache
        self._key = key
        self._clock = clock
        self._strategy = FedAvg()
        self._lock = threading.RLock()
        self._base: BaseModel | None = None
        self._base_tensors: dict[str, np.ndarray] = {}
        self._base_squared_norms: dict[str, float] = {}
        self._pool: list[AcceptedUpdate] = []
        self._pool_tensors: set[str] = set()
        self._aggregation: Aggregation | None = None
        self._pool_opened_at = 0.0
        self.intake = Intake(
            receiver_id=relay_id,
            policy=IntakePolicy(
                federation=config.federation,
                kinds=("local",),
                limits=UpdateLimits(
                    max_update_bytes=config.max_update_bytes, max_relative_norm=config.max_relative_norm or None
                ),
                max_staleness=config.forward.max_staleness,
                # a window is plain sample-weighted FedAvg; upstream discounts the combined update's age
                discount=lambda age: 1.0,
                # devices encode as the upstream federation asks (the round config the relay hands them)
                encoding=encoding,
            ),
            receiver=self,
            store=store,
            journal=journal,
            key=key,
            admit=self._admit,
            clock=clock,
        )

    # ------------------------------------------------------------------ bases

    def start(self) -> BaseModel | None:
        """Restore the last upstream base and the open window from the journal and the store."""
        latest = self.journal.latest_base()
        if latest is None:
            return None
        model_cid, round_ = latest
        if not self.store.has(model_cid):
            log.warning("base_missing_after_restart", extra={"fields": {"model": model_cid}})
            return None
        self._set_base(model_cid, round_)
        with self._lock:
            for update in self.journal.open_updates():
                self.fold(update, self.intake.read_accepted(update))
            if self._pool:
                self._pool_opened_at = min(u.accepted_at for u in self._pool)
                log.info("window_recovered", extra={"fields": {"updates": len(self._pool), "base": model_cid}})
        return self._base

    def adopt_base(self, model_cid: str, round_: int) -> BaseModel:
        """Make an upstream base the one devices get: cached (fetched once), journaled, announced."""
        self.cache.ensure(model_cid)
        self.journal.record_base(model_cid, round_, now=self._clock())
        base = self._set_base(model_cid, round_)
        log.info("new_base", extra={"fields": {"round": round_, "model": model_cid}})
        return base

    def _set_base(self, model_cid: str, round_: int) -> BaseModel:
        manifest, weights = load_model(self.store, model_cid)
        tensors = decode_tensors(weights)
        with self._lock:
            self._base = BaseModel(
                model_cid=model_cid, round=round_, weights_cid=manifest.weights, federation=self.federation
            )
            self._base_tensors = tensors
            self._base_squared_norms = squared_norms(tensors)
            self.cache.protect([model_cid])
            if self._aggregation is None:
                self._aggregation = self._strategy.start(tensors)
            return self._base

    @property
    def current(self) -> BaseModel:
        # read without the lock: devices' calls on the serving loop must never wait for a window closing
        base = self._base
        if base is None:
            raise Unavailable("the relay has no model from upstream yet", reason="no_base")
        return base

    @property
    def has_base(self) -> bool:
        return self._base is not None

    # ------------------------------------------------------------------ the intake's receiver

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def open_round(self) -> OpenRound:
        """Device updates are checked against the current upstream base and its round."""
        with self._lock:
            if self._base is None:
                raise Unavailable("the relay has no model from upstream yet", reason="no_base")
            return OpenRound(
                round=self._base.round, base_tensors=self._base_tensors, base_squared_norms=self._base_squared_norms
            )

    def _admit(self, sub: Submission) -> None:
        """Back-pressure: refuse devices while too much waits to be forwarded upstream."""
        held, held_bytes = self.journal.held()
        forward = self.config.forward
        if held >= forward.max_pending_updates or held_bytes + len(sub.weights) > forward.max_pending_bytes:
            raise UpdateRefused(
                f"the relay holds {held} updates ({held_bytes} bytes) not yet forwarded upstream; its limit is "
                f"{forward.max_pending_updates} updates / {forward.max_pending_bytes} bytes",
                reason=Refusal.UPSTREAM_UNAVAILABLE,
            )

    def fold(self, update: AcceptedUpdate, tensors: Mapping[str, np.ndarray]) -> int:
        assert self._aggregation is not None
        if not self._pool:
            self._pool_opened_at = update.accepted_at
        self._aggregation.add(tensors, update.weight)
        self._pool.append(update)
        self._pool_tensors.update(tensors)
        return len(self._pool)

    # ------------------------------------------------------------------ windows

    @property
    def window_size(self) -> int:
        with self._lock:
            return len(self._pool)

    def window_target(self, active_trainers: int) -> int:
        return max(1, min(self.config.window.max_devices, active_trainers))

    def maybe_close(self, active_trainers: int) -> CombinedUpdate | None:
        """Close the open window when it holds enough devices or waited long enough, once per upstream base."""
        with self._lock:
            if not self._pool or self._base is None:
                return None
            if self.journal.has_window_for(self._base.model_cid):
                return None  # upstream takes one update per agent per round: the rest waits for the next base
            if len(self._pool) >= self.window_target(active_trainers):
                trigger = "devices"
            elif self._clock() - self._pool_opened_at >= self.config.window.max_wait_s:
                trigger = "max_wait"
            else:
                return None
            return self._close(trigger)

    def _close(self, trigger: str) -> CombinedUpdate:
        assert self._base is not None and self._aggregation is not None
        pool, base = list(self._pool), self._base
        # sample counts are claims: each is credited with at most max_claim_ratio x the window's median
        claims = credit_claims([u.num_samples for u in pool], ratio=self.config.window.max_claim_ratio)
        if claims.capped:
            # FedAvg's running sums cannot take a weight back exactly: fold the window again
            self._aggregation = self._strategy.start(self._base_tensors)
            for update, samples in zip(pool, claims.credited, strict=True):
                self._aggregation.add(self.intake.read_accepted(update), update.weight * samples / update.num_samples)
        result = self._aggregation.result()
        trained = tuple(sorted(self._pool_tensors))
        combined = {name: result[name] for name in trained}
        total = sum(claims.credited)
        credited = list(zip(pool, claims.credited, strict=True))
        base_metrics = weighted_means([(u.base_metrics, n) for u, n in credited])
        rescaled: dict[str, object] = {}
        if claims.capped:
            rescaled = claims.record([u.update_cid for u in pool], [u.num_samples for u in pool])
            agents = {u.update_cid: u.agent_id for u in pool}
            for cid, entry in rescaled["claims"].items():  # type: ignore[union-attr]
                entry["agent"] = agents[cid]
        stats = self.cache.stats()
        manifest = save_model(
            self.store,
            weights=encode_tensors(combined),
            kind="relay",
            federation=self.federation,
            round=base.round,
            producer=Producer(role="relay", id=self.relay_id),
            key=self._key,
            parents=tuple(sorted(u.update_cid for u in pool)),
            base=base.model_cid,
            num_samples=total,
            metrics=weighted_means([(u.metrics, n) for u, n in credited]),
            algorithm={**self._strategy.describe(), "weighting": "num_samples (rescaled against the window's median)"},
            extra={
                "base_metrics": base_metrics,
                "trigger": trigger,
                "devices": len(pool),
                **({"rescaled_num_samples": rescaled} if rescaled else {}),
            },
            created_at=now_rfc3339(),
        )
        record = WindowRecord(
            update_cid=manifest.cid,
            round=base.round,
            base_cid=base.model_cid,
            devices=len(pool),
            num_samples=total,
            tensors=trained,
            metrics=dict(manifest.metrics),
            base_metrics=base_metrics,
            size=self.store.size(manifest.weights),
            trigger=trigger,
            bytes_saved=stats.bytes_saved,
            created_at=self._clock(),
        )
        self.journal.close_window(record, pool)
        self._pool, self._pool_tensors = [], set()
        self._aggregation = self._strategy.start(self._base_tensors)
        log.info(
            "window_closed",
            extra={
                "fields": {
                    "round": base.round,
                    "trigger": trigger,
                    "devices": len(pool),
                    "num_samples": total,
                    "tensors": len(trained),
                    "update": manifest.cid,
                    "bytes_saved": stats.bytes_saved,
                    "bytes_served": stats.bytes_served,
                    "bytes_fetched_upstream": stats.bytes_fetched_upstream,
                }
            },
        )
        return CombinedUpdate(manifest=manifest, tensors=trained, base_metrics=base_metrics, record=record)

    # ------------------------------------------------------------------ reporting

    def status(self) -> dict[str, object]:
        with self._lock:
            base = self._base
            window = len(self._pool)
        held, held_bytes = self.journal.held()
        history = self.journal.history()
        return {
            "id": self.relay_id,
            "federation": self.federation,
            "round": base.round if base else None,
            "base": base.model_cid if base else None,
            "window": window,
            "held_updates": held,
            "held_bytes": held_bytes,
            "windows": {
                status: sum(1 for w in history if w.status == status) for status in ("pending", "forwarded", "dropped")
            },
            "dropped": {w.update_cid: w.reason for w in history if w.status == "dropped"},
            "refusals": self.journal.refusal_counts(),
            "cache": self.cache.stats().to_json(),
        }
