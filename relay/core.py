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

from aggregator.rounds import (
    BaseModel,
    Submission,
    SubmitResult,
    check_submission,
    update_manifest,
    weighted_means,
)
from aggregator.strategies import Aggregation, FedAvg
from aggregator.validation import Refusal, UpdateLimits, UpdateRefused, validate_update
from proto.errors import Unavailable
from relay.cache import ModelCache
from relay.config import RelayConfig
from relay.journal import DeviceUpdate, RelayJournal, WindowRecord
from storage.codec import decode_tensors, encode_tensors
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
        self._limits = UpdateLimits(
            max_update_bytes=config.max_update_bytes, max_relative_norm=config.max_relative_norm or None
        )
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._base: BaseModel | None = None
        self._base_tensors: dict[str, np.ndarray] = {}
        self._pool: list[DeviceUpdate] = []
        self._pool_tensors: set[str] = set()
        self._aggregation: Aggregation | None = None
        self._pool_opened_at = 0.0

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
                _, weights = load_model(self.store, update.update_cid)
                self._fold(update, decode_tensors(weights))
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
            self.cache.protect([model_cid])
            if self._aggregation is None:
                self._aggregation = self._strategy.start(tensors)
            self._changed.notify_all()
            return self._base

    @property
    def current(self) -> BaseModel:
        with self._lock:
            if self._base is None:
                raise Unavailable("the relay has no model from upstream yet", reason="no_base")
            return self._base

    @property
    def has_base(self) -> bool:
        with self._lock:
            return self._base is not None

    def wait_for_new_base(self, known_cid: str, timeout: float) -> BaseModel | None:
        """Block until the base differs from `known_cid` or `timeout` passes; the current base (None before any)."""
        with self._changed:
            self._changed.wait_for(lambda: self._base is not None and self._base.model_cid != known_cid, timeout)
            return self._base

    # ------------------------------------------------------------------ submit

    def submit(self, submission: Submission) -> SubmitResult:
        """Validate, store, journal and fold one device update. Raises UpdateRefused with a reason code."""
        try:
            return self._submit(submission)
        except UpdateRefused as refusal:
            self.journal.record_refusal(submission.agent_id, refusal.reason, refusal.message)
            log.info(
                "update_refused",
                extra={"fields": {"agent": submission.agent_id, "reason": refusal.reason, "message": refusal.message}},
            )
            raise

    def _submit(self, sub: Submission) -> SubmitResult:
        if sub.federation and sub.federation != self.federation:
            raise UpdateRefused(
                f"this relay serves {self.federation!r}, not {sub.federation!r}", reason=Refusal.UNKNOWN_FEDERATION
            )
        weights_cid = check_submission(sub, self._limits, kinds=("local",))
        previous = self.journal.find_update(sub.agent_id, sub.base_cid)
        if previous is not None:
            return self._resend(previous, weights_cid, sub)
        base_round = self.journal.base_round(sub.base_cid)
        if base_round is None:
            raise UpdateRefused(f"base model {sub.base_cid} is not one this relay served", reason=Refusal.UNKNOWN_BASE)
        if base_round != sub.round:
            raise UpdateRefused(
                f"header round {sub.round} but base {sub.base_cid} is the base of round {base_round}",
                reason=Refusal.BAD_HEADER,
            )
        current = self.current
        self._check_staleness(base_round, current.round)
        held, held_bytes = self.journal.held()
        forward = self.config.forward
        if held >= forward.max_pending_updates or held_bytes + len(sub.weights) > forward.max_pending_bytes:
            raise UpdateRefused(
                f"the relay holds {held} updates ({held_bytes} bytes) not yet forwarded upstream; its limit is "
                f"{forward.max_pending_updates} updates / {forward.max_pending_bytes} bytes",
                reason=Refusal.UPSTREAM_UNAVAILABLE,
            )
        with self._lock:
            base_tensors = self._base_tensors
        tensors = validate_update(sub.weights, base=base_tensors, declared_tensors=sub.tensors, limits=self._limits)
        manifest = self._device_manifest(sub, weights_cid)
        # stored before journaled, journaled before acknowledged
        self.store.put(sub.weights, cid=weights_cid)
        self.store.put(manifest.to_bytes())
        update = DeviceUpdate(
            agent_id=sub.agent_id,
            base_cid=sub.base_cid,
            round=sub.round,
            update_cid=manifest.cid,
            weights_cid=weights_cid,
            num_samples=sub.num_samples,
            size=len(sub.weights),
            tensors=tuple(sorted(tensors)),
            metrics=dict(sub.metrics),
            base_metrics=dict(sub.base_metrics),
            accepted_at=self._clock(),
        )
        with self._lock:
            if not self.journal.record_update(update):
                previous = self.journal.find_update(sub.agent_id, sub.base_cid)
                assert previous is not None
                return self._resend(previous, weights_cid, sub)
            self._fold(update, tensors)
            pooled = len(self._pool)
        log.info(
            "update_accepted",
            extra={
                "fields": {
                    "agent": sub.agent_id,
                    "round": sub.round,
                    "num_samples": sub.num_samples,
                    "tensors": len(tensors),
                    "update": manifest.cid,
                    "window": pooled,
                }
            },
        )
        return SubmitResult(update_cid=manifest.cid, round=sub.round, duplicate=False)

    def _resend(self, previous: DeviceUpdate, weights_cid: str, sub: Submission) -> SubmitResult:
        if previous.weights_cid == weights_cid and previous.num_samples == sub.num_samples:
            return SubmitResult(update_cid=previous.update_cid, round=previous.round, duplicate=True)
        raise UpdateRefused(
            f"device {sub.agent_id} already submitted a different update on base {sub.base_cid} "
            f"({previous.update_cid})",
            reason=Refusal.CONFLICT,
        )

    def _check_staleness(self, base_round: int, upstream_round: int) -> int:
        staleness = upstream_round - base_round
        if staleness > self.config.forward.max_staleness:
            raise UpdateRefused(
                f"update trained on round {base_round}, {staleness} rounds behind upstream round {upstream_round} "
                f"(max_staleness {self.config.forward.max_staleness})",
                reason=Refusal.STALE,
            )
        return staleness

    def _device_manifest(self, sub: Submission, weights_cid: str) -> Manifest:
        return update_manifest(sub, weights_cid, federation=self.federation, recorder=self.relay_id, key=self._key)

    def _fold(self, update: DeviceUpdate, tensors: Mapping[str, np.ndarray]) -> None:
        assert self._aggregation is not None
        if not self._pool:
            self._pool_opened_at = update.accepted_at
        self._aggregation.add(tensors, float(update.num_samples))
        self._pool.append(update)
        self._pool_tensors.update(tensors)

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
        result = self._aggregation.result()
        trained = tuple(sorted(self._pool_tensors))
        combined = {name: result[name] for name in trained}
        total = sum(u.num_samples for u in pool)
        base_metrics = weighted_means([(u.base_metrics, u.num_samples) for u in pool])
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
            metrics=weighted_means([(u.metrics, u.num_samples) for u in pool]),
            algorithm={**self._strategy.describe(), "weighting": "num_samples"},
            extra={"base_metrics": base_metrics, "trigger": trigger, "devices": len(pool)},
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
        self.journal.close_window(record, [(u.agent_id, u.base_cid) for u in pool])
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
