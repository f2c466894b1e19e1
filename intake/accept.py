"""The one path from "an update arrived" to "accepted, stored, journaled and folded".

`Intake.submit` runs the same steps for an aggregator's rounds and a relay's
windows, cheapest refusal first:

1. the federation, then the header (`check_header`): agent id, sample count,
   kind, size, the weights' CID against the header's;
2. a resend of an update already accepted for (agent, base) is acknowledged
   again as a duplicate; a different one is refused as a conflict;
3. the base must be one this receiver served, of the header's round, and no
   more than `max_staleness` rounds behind the receiver's current round;
4. the receiver's own admission check (a relay refuses while its backlog is full);
5. the tensors are validated against the current base while the blob is
   written to the store (a refused update's new blob is removed again), and the
   sender's manifest is checked against the header;
6. under the receiver's lock: the staleness is taken again (the round may have
   moved), the update is journaled with weight num_samples x discount(staleness),
   and only then folded in and acknowledged.

Every refusal is journaled with its reason and logged as one line. The
receiver supplies its current round and base tensors, a lock, and `fold`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from intake.journal import AcceptedUpdate, IntakeJournal
from intake.submission import Submission, SubmitResult, check_header, update_manifest
from intake.validation import UpdateLimits, validate_update
from proto.errors import FailedPrecondition, NotFound, Refusal, UpdateRefused
from storage.keys import KeyPair
from storage.manifest import Manifest
from storage.store import ContentStore

log = logging.getLogger("strata.intake")


@dataclass(frozen=True, kw_only=True)
class OpenRound:
    """What a receiver is folding into right now."""

    round: int
    base_tensors: Mapping[str, np.ndarray]
    # ||t||² of each base tensor (intake.validation.squared_norms), measured once per base
    base_squared_norms: Mapping[str, float] | None = None


class Receiver(Protocol):
    """The side of an aggregator or relay that the intake folds accepted updates into."""

    @property
    def lock(self) -> threading.RLock: ...

    def open_round(self) -> OpenRound:
        """The current round and base; raises Unavailable when there is none yet."""
        ...

    def fold(self, update: AcceptedUpdate, tensors: Mapping[str, np.ndarray]) -> int:
        """Fold a journaled update into the open batch; called under `lock`. Returns the batch's size."""
        ...


@dataclass(frozen=True, kw_only=True)
class IntakePolicy:
    """What a receiver accepts: its federation, the update kinds, limits and the staleness rule."""

    federation: str
    kinds: tuple[str, ...]
    limits: UpdateLimits
    max_staleness: int
    # weight multiplier for an update `staleness` rounds old; 1 at 0
    discount: Callable[[float], float]


class Intake:
    def __init__(
        self,
        *,
        receiver_id: str,
        policy: IntakePolicy,
        receiver: Receiver,
        store: ContentStore,
        journal: IntakeJournal,
        key: KeyPair,
        admit: Callable[[Submission], None] | None = None,
        on_accepted: Callable[[Manifest], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.receiver_id = receiver_id
        self.policy = policy
        self._receiver = receiver
        self._store = store
        self._journal = journal
        self._key = key
        self._admit = admit
        self._on_accepted = on_accepted
        self._clock = clock
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="strata-blob-writer")
        # submissions in flight per weights CID: a refused one leaves the blob to the others
        self._claims: collections.Counter[str] = collections.Counter()
        self._claims_lock = threading.Lock()

    def close(self) -> None:
        """Wait for blob writes in flight; idempotent."""
        self._writer.shutdown(wait=True)

    # ------------------------------------------------------------------ submit

    def submit(self, sub: Submission) -> SubmitResult:
        """Validate, store, journal and fold one update. Raises UpdateRefused with a reason code."""
        try:
            return self._accept(sub)
        except UpdateRefused as refusal:
            self.record_refusal(sub.agent_id, refusal)
            raise

    def record_refusal(self, agent_id: str, refusal: UpdateRefused) -> None:
        """Journal and log a refused submission, including ones refused before `submit` (bad streams)."""
        round_ = self._round_or_zero()
        self._journal.record_refusal(round_, agent_id, refusal.reason, refusal.message)
        log.info(
            "update_refused",
            extra={"fields": {"agent": agent_id, "round": round_, "reason": refusal.reason, "message": refusal.message}},
        )

    def _round_or_zero(self) -> int:
        try:
            return self._receiver.open_round().round
        except Exception:  # noqa: BLE001 - a relay with no base yet still records the refusal
            return 0

    def _accept(self, sub: Submission) -> SubmitResult:
        policy = self.policy
        if sub.federation and sub.federation != policy.federation:
            raise UpdateRefused(
                f"{self.receiver_id} serves {policy.federation!r}, not {sub.federation!r}",
                reason=Refusal.UNKNOWN_FEDERATION,
            )
        weights_cid = check_header(sub, policy.limits, kinds=policy.kinds)
        previous = self._journal.find_update(sub.agent_id, sub.base_cid)
        if previous is not None:
            return _resend(previous, weights_cid, sub)
        base_round = self._journal.base_round(sub.base_cid)
        if base_round is None:
            raise UpdateRefused(
                f"base model {sub.base_cid} is not one {self.receiver_id} served", reason=Refusal.UNKNOWN_BASE
            )
        if base_round != sub.round:
            raise UpdateRefused(
                f"header round {sub.round} but base {sub.base_cid} is the base of round {base_round}",
                reason=Refusal.BAD_HEADER,
            )
        current = self._receiver.open_round()
        self._staleness(base_round, current.round)
        if self._admit is not None:
            self._admit(sub)

        # The durable blob write overlaps validation (both mostly outside the GIL). A refused
        # update's blob is removed again, unless something else holds it (see _drop_blob).
        held_before = self._store.has(weights_cid)
        self._claim(weights_cid)
        try:
            blob_written = self._writer.submit(self._store_blob, sub, weights_cid)
            try:
                outcome = self._validate_and_journal(sub, weights_cid, base_round, current, blob_written)
            except UpdateRefused:
                blob_written.result()
                self._drop_blob(weights_cid, held_before)
                raise
        finally:
            self._release(weights_cid)
        if isinstance(outcome, SubmitResult):  # a concurrent resend of the same update won the race
            return outcome
        update, manifest, accepted = outcome
        if self._on_accepted is not None:
            self._on_accepted(manifest)
        log.info(
            "update_accepted",
            extra={
                "fields": {
                    "agent": sub.agent_id,
                    "round": update.counted_round,
                    "staleness": update.staleness,
                    "num_samples": sub.num_samples,
                    "tensors": len(update.tensors),
                    "update": manifest.cid,
                    "accepted": accepted,
                }
            },
        )
        return SubmitResult(update_cid=manifest.cid, round=update.counted_round, duplicate=False)

    def _validate_and_journal(
        self, sub: Submission, weights_cid: str, base_round: int, current: OpenRound, blob_written: Future[str]
    ) -> tuple[AcceptedUpdate, Manifest, int] | SubmitResult:
        """Validate; then, stored before journaled and journaled before acknowledged: store the manifest, and
        under the receiver's lock journal the update and fold it in (so no round closes between the two).
        Returns (the update, its manifest, the open batch's size), or the answer to a resend that won a race."""
        policy = self.policy
        tensors = validate_update(
            sub.weights,
            base=current.base_tensors,
            declared_tensors=sub.tensors,
            limits=policy.limits,
            base_squared_norms=current.base_squared_norms,
        )
        manifest = update_manifest(
            sub, weights_cid, federation=policy.federation, recorder=self.receiver_id, key=self._key, clock=self._clock
        )
        blob_written.result()
        self._store.put(manifest.to_bytes(), cid=manifest.cid)
        with self._receiver.lock:
            counted_round = self._receiver.open_round().round
            staleness = self._staleness(base_round, counted_round)
            weight = sub.num_samples * policy.discount(staleness)
            if not (math.isfinite(weight) and weight > 0):
                # a steep discount can round an old update's weight down to nothing: it cannot count
                raise UpdateRefused(
                    f"update trained {staleness} rounds ago weighs {weight!r} under the staleness discount",
                    reason=Refusal.STALE,
                )
            update = AcceptedUpdate(
                agent_id=sub.agent_id,
                base_cid=sub.base_cid,
                trained_round=sub.round,
                counted_round=counted_round,
                update_cid=manifest.cid,
                weights_cid=weights_cid,
                num_samples=sub.num_samples,
                weight=weight,
                staleness=staleness,
                size=len(sub.weights),
                tensors=tuple(sorted(tensors)),
                metrics=dict(sub.metrics),
                base_metrics=dict(sub.base_metrics),
                kind=sub.kind,
                accepted_at=self._clock(),
            )
            if not self._journal.record_update(update):
                previous = self._journal.find_update(sub.agent_id, sub.base_cid)
                assert previous is not None
                return _resend(previous, weights_cid, sub)
            return update, manifest, self._receiver.fold(update, tensors)

    def _claim(self, weights_cid: str) -> None:
        with self._claims_lock:
            self._claims[weights_cid] += 1

    def _release(self, weights_cid: str) -> None:
        with self._claims_lock:
            self._claims[weights_cid] -= 1
            if not self._claims[weights_cid]:
                del self._claims[weights_cid]

    def _drop_blob(self, weights_cid: str, held_before: bool) -> None:
        """Remove a refused update's blob, unless the store held it before, another submission of the
        same bytes is still in flight (it decides), or an accepted update or a pin needs it."""
        with self._claims_lock:
            if held_before or self._claims[weights_cid] > 1 or self._journal.references_weights(weights_cid):
                return
            with contextlib.suppress(NotFound, FailedPrecondition):  # gone already, or pinned: kept
                self._store.delete(weights_cid)

    def _store_blob(self, sub: Submission, weights_cid: str) -> str:
        if sub.staged is not None:
            return sub.staged.commit(weights_cid)
        return self._store.put(sub.weights, cid=weights_cid)

    def _staleness(self, base_round: int, current_round: int) -> int:
        # a relay re-homed to an aggregator a round behind sees a base from its future: age 0
        staleness = max(0, current_round - base_round)
        if staleness > self.policy.max_staleness:
            raise UpdateRefused(
                f"update trained on round {base_round}, {staleness} rounds behind round {current_round} "
                f"(max_staleness {self.policy.max_staleness})",
                reason=Refusal.STALE,
            )
        return staleness


def _resend(previous: AcceptedUpdate, weights_cid: str, sub: Submission) -> SubmitResult:
    """The answer to a second submission for the same (agent, base)."""
    if previous.weights_cid == weights_cid and previous.num_samples == sub.num_samples:
        return SubmitResult(update_cid=previous.update_cid, round=previous.counted_round, duplicate=True)
    raise UpdateRefused(
        f"agent {sub.agent_id} already submitted a different update on base {sub.base_cid} ({previous.update_cid})",
        reason=Refusal.CONFLICT,
    )
