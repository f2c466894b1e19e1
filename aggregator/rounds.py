"""Rounds: accept updates, fold them into the round's aggregate, close, and hand out the next base.

`RoundManager` is the aggregator's core object. The gRPC service turns protobuf
into a `Submission` and calls `submit`; a ticker calls `maybe_close`. It never
imports grpc.

Round r starts from base model B_r. Agents train on B_r and submit updates naming
it. An update trained on an older base B_s is accepted while r - s <=
max_staleness, weighted by num_samples x discount(r - s). The round closes on
quorum (ceil(quorum x active trainers) updates, at least min_updates), or at its
deadline with >= min_updates; otherwise the deadline extends. Closing writes the
cluster model, then asks the synthesizer (the fleet's semi-global step) for the
next base B_{r+1}; with no synthesizer the cluster model is the next base.

Durability: an update is acknowledged only after its weights and manifest are in
the store and the journal has recorded it; on start the open round is rebuilt by
folding exactly the journaled updates back in from the store.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from aggregator.config import RoundSettings
from aggregator.journal import AcceptedUpdate, Journal, RoundRecord
from aggregator.staleness import make_discount
from aggregator.strategies import Aggregation, Strategy
from aggregator.validation import Refusal, UpdateLimits, UpdateRefused, check_size, validate_update
from proto.errors import StrataError
from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from storage.models import load_model, save_model
from storage.store import ContentStore

log = logging.getLogger("strata.aggregator.rounds")


@dataclass(frozen=True, kw_only=True)
class Submission:
    """An update as the service hands it over: header fields plus the weight bytes."""

    agent_id: str
    round: int
    base_cid: str
    num_samples: int
    weights: bytes
    federation: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    base_metrics: Mapping[str, float] = field(default_factory=dict)
    tensors: tuple[str, ...] = ()
    weights_cid: str = ""
    kind: str = "local"
    parents: tuple[str, ...] = ()
    manifest: bytes = b""
    # the CID the receiving service computed from these bytes as they arrived (saves a pass)
    received_cid: str = ""


@dataclass(frozen=True, kw_only=True)
class SubmitResult:
    update_cid: str
    round: int
    duplicate: bool


@dataclass(frozen=True, kw_only=True)
class BaseModel:
    model_cid: str
    round: int
    weights_cid: str
    federation: str


class Synthesizer(Protocol):
    """The seam where the fleet turns a cluster model into the next base (a semi-global model)."""

    def __call__(self, cluster: Manifest, tensors: Mapping[str, np.ndarray]) -> Manifest: ...


class RoundManager:
    def __init__(
        self,
        *,
        aggregator_id: str,
        federation: str,
        settings: RoundSettings,
        store: ContentStore,
        journal: Journal,
        strategy: Strategy,
        key: KeyPair,
        initial_base: str | Callable[[], str],
        synthesize: Synthesizer | None = None,
        on_new_base: Callable[[BaseModel], None] | None = None,
        on_model: Callable[[Manifest], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.aggregator_id = aggregator_id
        self.federation = federation
        self.settings = settings
        self._store = store
        self._journal = journal
        self._strategy = strategy
        self._key = key
        self._initial_base = initial_base
        self._synthesize = synthesize
        self._on_new_base = on_new_base
        self._on_model = on_model
        self._clock = clock
        self._discount = make_discount(settings.staleness_discount, **settings.staleness_params)
        self._limits = UpdateLimits(
            max_update_bytes=settings.max_update_bytes,
            max_relative_norm=settings.max_relative_norm or None,
        )
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="strata-blob-writer")
        self._round: RoundRecord | None = None
        self._base: BaseModel | None = None
        self._base_tensors: dict[str, np.ndarray] = {}
        self._aggregation: Aggregation | None = None
        self._accepted: list[AcceptedUpdate] = []
        self._deadline = 0.0
        self._version = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BaseModel:
        """Open round 0 on a fresh journal, or rebuild the open round after a restart."""
        with self._lock:
            record = self._journal.current_round()
            if record is None:
                initial = self._initial_base() if callable(self._initial_base) else self._initial_base
                self._journal.open_round(0, initial, now=self._clock())
                record = self._journal.current_round()
                assert record is not None
            self._enter_round(record)
            accepted = self._journal.updates_for_round(record.round)
            for update in accepted:
                _, weights = load_model(self._store, update.update_cid)
                self._fold(update, decode_tensors(weights))
            if accepted:
                log.info(
                    "round_recovered",
                    extra={"fields": {"round": record.round, "updates": len(accepted), "base": record.base_cid}},
                )
            return self.current

    def _enter_round(self, record: RoundRecord) -> None:
        manifest, weights = load_model(self._store, record.base_cid)
        if manifest.federation != self.federation:
            raise StrataError(
                f"base model {record.base_cid} is federation {manifest.federation!r}, not {self.federation!r}",
                reason="bad_base",
            )
        self._round = record
        self._base = BaseModel(
            model_cid=record.base_cid, round=record.round, weights_cid=manifest.weights, federation=self.federation
        )
        self._base_tensors = decode_tensors(weights)
        self._aggregation = self._strategy.start(self._base_tensors)
        self._accepted = []
        self._deadline = max(record.opened_at, self._clock() if record.opened_at == 0 else record.opened_at) + (
            self.settings.deadline_s
        )
        self._version += 1
        self._changed.notify_all()

    def close(self) -> None:
        """Wait for blob writes in flight; idempotent."""
        self._writer.shutdown(wait=True)

    @property
    def current(self) -> BaseModel:
        with self._lock:
            if self._base is None:
                raise StrataError("round manager not started", reason="not_started")
            return self._base

    @property
    def base_tensors(self) -> Mapping[str, np.ndarray]:
        return self._base_tensors

    @property
    def accepted_count(self) -> int:
        with self._lock:
            return len(self._accepted)

    def wait_for_new_base(self, known_cid: str, timeout: float) -> BaseModel:
        """Block until the base differs from `known_cid` or `timeout` passes; return the current base."""
        with self._changed:
            self._changed.wait_for(lambda: self._base is not None and self._base.model_cid != known_cid, timeout)
            return self.current

    # ------------------------------------------------------------------ submit

    def submit(self, submission: Submission) -> SubmitResult:
        """Validate, store, journal and fold one update. Raises UpdateRefused with a reason code."""
        try:
            return self._submit(submission)
        except UpdateRefused as refusal:
            self.record_refusal(submission.agent_id, refusal)
            raise

    def record_refusal(self, agent_id: str, refusal: UpdateRefused) -> None:
        """Journal and log a refused submission, including ones refused before `submit` (bad streams)."""
        round_ = self._round.round if self._round else 0
        self._journal.record_refusal(round_, agent_id, refusal.reason, refusal.message)
        log.info("update_refused", extra={"fields": {"agent": agent_id, "round": round_, "reason": refusal.reason}})

    def _submit(self, sub: Submission) -> SubmitResult:
        if sub.federation and sub.federation != self.federation:
            raise UpdateRefused(
                f"this aggregator trains {self.federation!r}, not {sub.federation!r}", reason=Refusal.UNKNOWN_FEDERATION
            )
        weights_cid = check_submission(sub, self._limits, kinds=("local", "relay"))

        previous = self._journal.find_update(sub.agent_id, sub.round)
        if previous is not None:
            return self._resend(previous, weights_cid, sub)

        base_round = self._journal.base_round(sub.base_cid)
        if base_round is None:
            raise UpdateRefused(f"base model {sub.base_cid} is not one this aggregator served", reason=Refusal.UNKNOWN_BASE)
        if base_round != sub.round:
            raise UpdateRefused(
                f"header round {sub.round} but base {sub.base_cid} is the base of round {base_round}",
                reason=Refusal.BAD_HEADER,
            )
        self._check_staleness(base_round)

        # The durable blob write overlaps validation (both mostly outside the GIL); a refused
        # update's blob is removed again unless the store held it before.
        held_before = self._store.has(weights_cid)
        blob_written = self._writer.submit(self._store.put, sub.weights, cid=weights_cid)
        try:
            tensors = validate_update(
                sub.weights, base=self._base_tensors, declared_tensors=sub.tensors, limits=self._limits
            )
            manifest = self._update_manifest(sub, weights_cid)
        except UpdateRefused:
            blob_written.result()
            if not held_before:
                self._store.delete(weights_cid, force=True)
            raise
        # stored before journaled, journaled before acknowledged
        blob_written.result()
        self._store.put(manifest.to_bytes(), cid=manifest.cid)

        with self._lock:
            assert self._round is not None
            staleness = self._check_staleness(base_round)
            update = AcceptedUpdate(
                agent_id=sub.agent_id,
                trained_round=sub.round,
                counted_round=self._round.round,
                base_cid=sub.base_cid,
                update_cid=manifest.cid,
                weights_cid=weights_cid,
                num_samples=sub.num_samples,
                weight=sub.num_samples * self._discount(staleness),
                staleness=staleness,
                tensors=tuple(sorted(tensors)),
                metrics=dict(sub.metrics),
                base_metrics=dict(sub.base_metrics),
                kind=sub.kind,
                accepted_at=self._clock(),
            )
            if not self._journal.record_update(update):
                # a concurrent resend of the same (agent, round) won the race
                previous = self._journal.find_update(sub.agent_id, sub.round)
                assert previous is not None
                return self._resend(previous, weights_cid, sub)
            self._fold(update, tensors)
            self._emit(manifest)
            log.info(
                "update_accepted",
                extra={
                    "fields": {
                        "agent": sub.agent_id,
                        "round": update.counted_round,
                        "staleness": staleness,
                        "num_samples": sub.num_samples,
                        "update": manifest.cid,
                        "accepted": len(self._accepted),
                    }
                },
            )
            return SubmitResult(update_cid=manifest.cid, round=update.counted_round, duplicate=False)

    def _resend(self, previous: AcceptedUpdate, weights_cid: str, sub: Submission) -> SubmitResult:
        if previous.weights_cid == weights_cid and previous.num_samples == sub.num_samples:
            return SubmitResult(update_cid=previous.update_cid, round=previous.counted_round, duplicate=True)
        raise UpdateRefused(
            f"agent {sub.agent_id} already submitted a different update for round {sub.round} "
            f"({previous.update_cid})",
            reason=Refusal.CONFLICT,
        )

    def _check_staleness(self, base_round: int) -> int:
        assert self._round is not None
        staleness = self._round.round - base_round
        if staleness > self.settings.max_staleness:
            raise UpdateRefused(
                f"update trained on round {base_round}, {staleness} rounds behind round {self._round.round} "
                f"(max_staleness {self.settings.max_staleness})",
                reason=Refusal.STALE,
            )
        return staleness

    def _update_manifest(self, sub: Submission, weights_cid: str) -> Manifest:
        return update_manifest(
            sub, weights_cid, federation=self.federation, recorder=self.aggregator_id, key=self._key, clock=self._clock
        )

    def _fold(self, update: AcceptedUpdate, tensors: Mapping[str, np.ndarray]) -> None:
        assert self._aggregation is not None
        self._aggregation.add(tensors, update.weight)
        self._accepted.append(update)

    # ------------------------------------------------------------------ close

    def quorum_target(self, active_trainers: int) -> int:
        return max(self.settings.min_updates, math.ceil(self.settings.quorum * active_trainers))

    def maybe_close(self, active_trainers: int) -> Manifest | None:
        """Close the round if quorum is met, or the deadline passed with >= min_updates.

        Returns the next base's manifest when the round closed. Extends the deadline
        (and logs it) when it passed without enough updates.
        """
        with self._lock:
            if self._round is None:
                return None
            count, now = len(self._accepted), self._clock()
            target = self.quorum_target(active_trainers)
            if count >= target and count > 0:
                return self._close(trigger="quorum")
            if now < self._deadline:
                return None
            if count >= self.settings.min_updates:
                return self._close(trigger="deadline")
            self._deadline = now + self.settings.deadline_s
            log.info(
                "round_extended",
                extra={
                    "fields": {
                        "round": self._round.round,
                        "accepted": count,
                        "min_updates": self.settings.min_updates,
                        "quorum_target": target,
                        "extended_by_s": self.settings.deadline_s,
                    }
                },
            )
            return None

    def _close(self, *, trigger: str) -> Manifest:
        assert self._round is not None and self._aggregation is not None and self._base is not None
        started = time.perf_counter()
        round_, accepted = self._round.round, list(self._accepted)
        result = self._aggregation.result()
        total = sum(u.num_samples for u in accepted)
        cluster = save_model(
            self._store,
            weights=encode_tensors(result),
            kind="cluster",
            federation=self.federation,
            round=round_,
            producer=Producer(role="aggregator", id=self.aggregator_id),
            key=self._key,
            parents=tuple(sorted(u.update_cid for u in accepted)),
            base=self._base.model_cid,
            num_samples=total,
            metrics=weighted_means([(u.metrics, u.num_samples) for u in accepted]),
            algorithm={
                **self._strategy.describe(),
                "weighting": "num_samples x staleness discount",
                "staleness_discount": {
                    "name": self.settings.staleness_discount,
                    "params": dict(self.settings.staleness_params),
                },
            },
            extra={
                "base_metrics": weighted_means([(u.base_metrics, u.num_samples) for u in accepted]),
                "trigger": trigger,
            },
        )
        aggregation_s = time.perf_counter() - started
        self._emit(cluster)
        next_base = self._synthesize(cluster, result) if self._synthesize else cluster
        if next_base.cid != cluster.cid:
            self._emit(next_base)
        closed_at = self._clock()
        record = RoundRecord(
            round=round_,
            base_cid=self._base.model_cid,
            opened_at=self._round.opened_at,
            closed_at=closed_at,
            participants=len(accepted),
            num_samples=total,
            cluster_cid=cluster.cid,
            next_base_cid=next_base.cid,
            aggregation_s=aggregation_s,
            metrics=dict(cluster.metrics),
            base_metrics=dict(cluster.extra.get("base_metrics", {})),
            refusals=self._journal.refusal_counts(round_),
            extra={"trigger": trigger, "next_base_kind": next_base.kind, "stale_updates": sum(u.staleness > 0 for u in accepted)},
        )
        self._journal.close_round(record, next_round=round_ + 1, next_base_cid=next_base.cid)
        log.info(
            "round_closed",
            extra={
                "fields": {
                    "round": round_,
                    "trigger": trigger,
                    "participants": len(accepted),
                    "num_samples": total,
                    "cluster": cluster.cid,
                    "next_base": next_base.cid,
                    "aggregation_s": round(aggregation_s, 4),
                    **{f"metric_{k}": round(v, 4) for k, v in record.metrics.items()},
                }
            },
        )
        opened = self._journal.current_round()
        assert opened is not None and opened.round == round_ + 1
        self._enter_round(opened)
        if self._on_new_base is not None:
            self._on_new_base(self.current)
        return next_base

    def history(self) -> list[RoundRecord]:
        return self._journal.history()

    def closed_rounds(self) -> list[RoundRecord]:
        return [record for record in self._journal.history() if record.closed_at is not None]

    def _emit(self, manifest: Manifest) -> None:
        if self._on_model is None:
            return
        try:
            self._on_model(manifest)
        except Exception:  # a listener's failure must not fail the round
            log.exception("model_listener_failed")


def check_submission(sub: Submission, limits: UpdateLimits, *, kinds: tuple[str, ...]) -> str:
    """The header checks every receiver of updates makes first; returns the weights' CID."""
    if not sub.agent_id:
        raise UpdateRefused("agent_id is empty", reason=Refusal.BAD_HEADER)
    if sub.num_samples <= 0:
        raise UpdateRefused("num_samples must be > 0", reason=Refusal.BAD_HEADER)
    if sub.kind not in kinds:
        raise UpdateRefused(f"update kind must be one of {list(kinds)}, got {sub.kind!r}", reason=Refusal.BAD_HEADER)
    check_size(len(sub.weights), limits)
    weights_cid = sub.received_cid or cid_of(sub.weights)
    if sub.weights_cid and sub.weights_cid != weights_cid:
        raise UpdateRefused(f"weights hash to {weights_cid}, header says {sub.weights_cid}", reason=Refusal.HASH_MISMATCH)
    return weights_cid


def update_manifest(
    sub: Submission,
    weights_cid: str,
    *,
    federation: str,
    recorder: str,
    key: KeyPair,
    clock: Callable[[], float] = time.time,
) -> Manifest:
    """The sender's own signed manifest, checked against the header; or, when it sent none,
    one recorded under the receiver's key (with `extra.recorded_by`)."""
    if sub.manifest:
        try:
            manifest = Manifest.from_bytes(sub.manifest)
            manifest.verify_signature()
        except StrataError as exc:
            raise UpdateRefused(f"update manifest: {exc}", reason=Refusal.BAD_MANIFEST) from None
        expected = (sub.kind, federation, sub.round, weights_cid, sub.base_cid, sub.num_samples, sub.agent_id)
        actual = (
            manifest.kind,
            manifest.federation,
            manifest.round,
            manifest.weights,
            manifest.base,
            manifest.num_samples,
            manifest.producer.id,
        )
        names = ("kind", "federation", "round", "weights", "base", "num_samples", "producer.id")
        wrong = [name for name, want, got in zip(names, expected, actual, strict=True) if want != got]
        if wrong:
            raise UpdateRefused(f"update manifest disagrees with the header on {wrong}", reason=Refusal.BAD_MANIFEST)
        return manifest
    return Manifest(
        kind=sub.kind,
        federation=federation,
        round=sub.round,
        producer=Producer(role="agent" if sub.kind == "local" else "relay", id=sub.agent_id),
        weights=weights_cid,
        tensors=summarize(sub.weights),
        parents=tuple(sub.parents),
        base=sub.base_cid,
        num_samples=sub.num_samples,
        metrics=dict(sub.metrics),
        extra={"recorded_by": recorder},
        created_at=_rfc3339(clock()),
    ).signed(key)


def weighted_means(items: list[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Per-key means weighted by sample counts, over the items that report each key."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight in items:
        for name, value in metrics.items():
            if math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + value * weight
                weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sums if weights[name] > 0}


def _rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"
