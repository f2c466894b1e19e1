"""The one path from "an update arrived" to "accepted, stored, journaled and folded".

`Intake.submit` runs the same steps for an aggregator's rounds and a relay's
windows, cheapest refusal first:

1. the federation, then the header (`check_header`): agent id, sample count,
   kind, size, the weights' CID against the header's;
2. a resend of an update already accepted for (agent, base) is acknowledged
   again as a duplicate; a different one is refused as a conflict;
3. the base must be one this receiver served, of the header's round, and no
   more than `max_staleness` rounds behind the receiver's current round; the
   agent must have no other update open in this round (a late one counted
   here): one update per agent per round;
4. the receiver's own admission check (a relay refuses while its backlog is full);
5. the tensors are validated against the current base while the blob is
   written to the store (a refused update's new blob is removed again), with
   SCAFFOLD the update's delta_c against its trained tensors, and the
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
from dataclasses import dataclass, replace
from typing import Protocol, cast

import numpy as np

from intake.journal import AcceptedUpdate, IntakeJournal
from intake.submission import Submission, SubmitResult, check_header, update_manifest
from intake.validation import UpdateLimits, validate_control, validate_update
from proto.errors import FailedPrecondition, NotFound, Refusal, UpdateRefused
from storage.codec import CodecError, decode_tensors
from storage.control import delta_control_cid
from storage.encodings import FLOAT32, Encoding, EncodingError, parse_encoding, read_update
from storage.keys import KeyPair
from storage.manifest import Manifest
from storage.models import load_manifest, load_model
from storage.store import ContentStore

log = logging.getLogger("strata.intake")

# bases kept decoded for stale deltas: the current one and a few behind (max_staleness is small)
_BASES_KEPT = 3


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


class ControlReceiver(Receiver, Protocol):
    """A receiver that runs SCAFFOLD (an aggregator; never a relay): it also folds each delta_c."""

    def fold_control(self, update: AcceptedUpdate, delta: Mapping[str, np.ndarray]) -> None:
        """Fold an accepted update's delta_c into the round's variate sum; called under `lock`, after `fold`."""
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
    # the encoding the federation asks its devices for (storage.encodings), read per submission: a relay
    # learns it from its upstream's round config. A relay's combined update may also come as float32.
    encoding: Callable[[], Encoding] = lambda: FLOAT32
    # SCAFFOLD: device updates must carry their control-variate update delta_c (storage.control)
    scaffold: bool = False


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
        # the last few bases an encoded delta was decoded against (a stale update names an older one)
        self._bases: collections.OrderedDict[str, Mapping[str, np.ndarray]] = collections.OrderedDict()
        self._bases_lock = threading.Lock()

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
        encoding = self._encoding(sub)
        if sub.encoding != (encoding.name if encoding.is_delta else sub.encoding):
            sub = replace(sub, encoding=encoding.name)  # the manifest records the canonical name
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
        self._counted_once(sub)
        if self._admit is not None:
            self._admit(sub)

        # The durable blob write overlaps validation (both mostly outside the GIL). A refused
        # update's blob is removed again, unless something else holds it (see _drop_blob).
        held_before = self._store.has(weights_cid)
        self._claim(weights_cid)
        try:
            blob_written = self._writer.submit(self._store_blob, sub, weights_cid)
            try:
                outcome = self._validate_and_journal(sub, weights_cid, base_round, current, blob_written, encoding)
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
        self,
        sub: Submission,
        weights_cid: str,
        base_round: int,
        current: OpenRound,
        blob_written: Future[str],
        encoding: Encoding,
    ) -> tuple[AcceptedUpdate, Manifest, int] | SubmitResult:
        """Validate; then, stored before journaled and journaled before acknowledged: store the manifest, and
        under the receiver's lock journal the update and fold it in (so no round closes between the two).
        Returns (the update, its manifest, the open batch's size), or the answer to a resend that won a race."""
        policy = self.policy
        self._check_control_presence(sub)
        tensors = validate_update(
            sub.weights,
            base=current.base_tensors,
            declared_tensors=sub.tensors,
            limits=policy.limits,
            base_squared_norms=current.base_squared_norms,
            encoding=encoding,
            # a delta decodes against the base it was trained from; a stale one's is an older base
            delta_base=None if base_round == current.round or not encoding.is_delta else self.base_tensors(sub.base_cid),
        )
        delta_c = (
            validate_control(sub.control, declared_cid=sub.control_cid, trained=tensors) if sub.control else None
        )
        manifest = update_manifest(
            sub, weights_cid, federation=policy.federation, recorder=self.receiver_id, key=self._key, clock=self._clock
        )
        blob_written.result()
        if sub.control:
            self._store.put(sub.control)  # before the manifest that names it: nothing stored names a missing blob
        self._store.put(manifest.to_bytes(), cid=manifest.cid)
        with self._receiver.lock:
            counted_round = self._receiver.open_round().round
            staleness = self._staleness(base_round, counted_round)
            self._counted_once(sub)  # again under the lock: a concurrent update of the agent may have won
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
            size = self._receiver.fold(update, tensors)
            if delta_c is not None:
                cast(ControlReceiver, self._receiver).fold_control(update, delta_c)
            return update, manifest, size

    def _check_control_presence(self, sub: Submission) -> None:
        """With SCAFFOLD a device's update carries delta_c; without it (or from a relay) none may."""
        wanted = self.policy.scaffold and sub.kind == "local"
        if wanted and not sub.control:
            raise UpdateRefused(
                f"federation {self.policy.federation!r} runs SCAFFOLD: the update must carry its delta_c",
                reason=Refusal.MISSING_CONTROL_VARIATE,
            )
        if sub.control and not wanted:
            why = "a relay's combined update" if sub.kind != "local" else f"federation {self.policy.federation!r}"
            raise UpdateRefused(
                f"{why} takes no SCAFFOLD delta_c", reason=Refusal.UNEXPECTED_CONTROL_VARIATE
            )

    def read_control(self, update: AcceptedUpdate) -> dict[str, np.ndarray] | None:
        """An accepted update's delta_c read back from the store (what a restart re-folds); None without one."""
        cid = delta_control_cid(load_manifest(self._store, update.update_cid).extra)
        return decode_tensors(self._store.get(cid)) if cid else None

    def _encoding(self, sub: Submission) -> Encoding:
        """The update's encoding, refused unless it is the federation's (or float32 from a relay)."""
        try:
            encoding = parse_encoding(sub.encoding)
        except EncodingError as exc:
            raise UpdateRefused(str(exc), reason=Refusal.BAD_ENCODING) from None
        wanted = self.policy.encoding()
        # a relay's combined update is one per window on the relay's uplink: it may stay float32
        if encoding != wanted and not (sub.kind == "relay" and encoding == FLOAT32):
            raise UpdateRefused(
                f"update is encoded {encoding}, but federation {self.policy.federation!r} asks for {wanted}",
                reason=Refusal.UNEXPECTED_ENCODING,
            )
        return encoding

    def base_tensors(self, base_cid: str) -> Mapping[str, np.ndarray]:
        """The tensors of a base this receiver served, from the store (the last few are kept)."""
        with self._bases_lock:
            if base_cid in self._bases:
                self._bases.move_to_end(base_cid)
                return self._bases[base_cid]
        try:
            tensors = decode_tensors(load_model(self._store, base_cid)[1])
        except (NotFound, CodecError) as exc:
            raise UpdateRefused(f"base model {base_cid} cannot be read: {exc}", reason=Refusal.UNKNOWN_BASE) from None
        with self._bases_lock:
            self._bases[base_cid] = tensors
            while len(self._bases) > _BASES_KEPT:
                self._bases.popitem(last=False)
        return tensors

    def read_accepted(self, update: AcceptedUpdate) -> dict[str, np.ndarray]:
        """An accepted update's full weights read back from the store, decoded if it was encoded:
        what a restart re-folds, and what rules that need every update at once read."""
        return read_update(self._store, update.update_cid, expected=update.tensors, base_tensors=self.base_tensors)

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

    def _counted_once(self, sub: Submission) -> None:
        """One update per agent in the open round (or relay window): a late update, counted in the round
        after its own, leaves no room for the same agent's update on the next base."""
        held = self._journal.open_update_of(sub.agent_id)
        if held is not None and held.base_cid != sub.base_cid:
            raise UpdateRefused(
                f"agent {sub.agent_id} already has an update counted in the open round ({held.update_cid}, "
                f"trained on round {held.trained_round}); it counts once per round: train again on the next base",
                reason=Refusal.ALREADY_COUNTED,
            )

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
