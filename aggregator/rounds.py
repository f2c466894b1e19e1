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

Buffered mode (`round.mode: buffered`, FedBuff; see aggregator.buffered): a round
is a buffer of at least `buffer_size` updates, closed by the ticker as soon as it
holds them (the quorum is not consulted; the deadline with >= min_updates still
closes a buffer a small fleet cannot fill). Stale updates are rebased onto the
current base before the rule sees them, and synthesis runs only every
`synthesis.every_steps` steps or `synthesis.every_s` seconds. The buffer is the open
round, journaled as one: a restart rebuilds it exactly.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from aggregator.buffered import rebase, synthesis_due
from aggregator.config import RoundSettings
from aggregator.evaluation import Evaluate, heldout_metrics, heldout_of, without_heldout
from aggregator.journal import Journal, RoundRecord
from aggregator.privacy import PrivacyGuard
from aggregator.selection import Selector, expected_trainers
from aggregator.staleness import make_discount
from aggregator.strategies import Aggregation, Strategy, weighted_means
from intake.accept import Intake, IntakePolicy, OpenRound
from intake.agents import AgentInfo
from intake.claims import CreditedClaims, credit_claims
from intake.home import BaseModel
from intake.journal import AcceptedUpdate
from intake.submission import Submission
from intake.validation import UpdateLimits, squared_norms
from proto.errors import Refusal, StrataError, UpdateRefused
from storage.codec import decode_tensors, encode_tensors
from storage.control import CONTROL_KIND, server_control_cid
from storage.control import MANIFEST_KEY as SCAFFOLD_KEY
from storage.encodings import FLOAT32, Encoding
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from storage.models import load_manifest, load_model, save_model
from storage.store import ContentStore

log = logging.getLogger("strata.aggregator.rounds")

# the update kinds an aggregator takes: a device's own, and a relay's combined update
UPDATE_KINDS = ("local", "relay")


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
        selector: Selector | None = None,
        privacy: PrivacyGuard | None = None,
        encoding: Encoding = FLOAT32,
        synthesis_every_steps: int = 1,
        synthesis_every_s: float = 0.0,
        evaluate: Evaluate | None = None,
        scaffold: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`synthesis_every_steps` and `synthesis_every_s` set the synthesis cadence in buffered mode
        (a sync round synthesizes at every close). `evaluate`: the held-out split's metrics of a model
        (config `evaluation`), recorded in the cluster manifest; None: no held-out evaluation."""
        self.aggregator_id = aggregator_id
        self.federation = federation
        self.settings = settings
        self._store = store
        self._journal = journal
        # central DP wraps the rule; the guard also keeps the ledger and the budget
        self._privacy = privacy if privacy is not None and privacy.settings.enabled else None
        self._strategy = self._privacy.wrap(strategy) if self._privacy is not None else strategy
        self._key = key
        self._initial_base = initial_base
        self._synthesize = synthesize
        self._on_new_base = on_new_base
        self._on_model = on_model
        self._selector = selector if selector is not None and not selector.invites_everyone else None
        # a rule reads stored blobs back only when they are the weights themselves; encoded blobs
        # (deltas, quantized, sparse) reach it decoded, in memory
        self._blobs_are_weights = encoding == FLOAT32
        self._evaluate = evaluate
        self._clock = clock
        self._buffered = settings.mode == "buffered"
        self._synthesis_every = (synthesis_every_steps, synthesis_every_s)
        # buffered cadence: steps closed since the last synthesis, and when that was (rebuilt in start)
        self._steps_since_synthesis = 0
        self._synthesized_at = 0.0
        self._lock = threading.RLock()
        self.intake = Intake(
            receiver_id=aggregator_id,
            policy=IntakePolicy(
                federation=federation,
                kinds=UPDATE_KINDS,
                limits=UpdateLimits(
                    max_update_bytes=settings.max_update_bytes,
                    max_relative_norm=settings.max_relative_norm or None,
                ),
                max_staleness=settings.max_staleness,
                discount=make_discount(settings.staleness_discount, **settings.staleness_params),
                encoding=lambda: encoding,
                scaffold=scaffold,
            ),
            receiver=self,
            store=store,
            journal=journal,
            key=key,
            admit=self._admit,
            # device updates are indexed too, so an operator can trace a model down to them
            on_accepted=self._emit,
            clock=clock,
        )
        self._round: RoundRecord | None = None
        self._base: BaseModel | None = None
        self._base_tensors: dict[str, np.ndarray] = {}
        self._base_squared_norms: dict[str, float] = {}
        self._aggregation: Aggregation | None = None
        self._accepted: list[AcceptedUpdate] = []
        self._deadline = 0.0
        # this round's invited agents; None while everyone is invited (no selection)
        self._invited: frozenset[str] | None = None
        self._times_invited: dict[str, int] = {}
        # SCAFFOLD: this cluster's server variate c (absent tensors are zeros), the model CID it was last
        # saved under, and the open round's sum of delta_c per tensor with the number of updates folded
        self._scaffold = scaffold
        self._control: dict[str, np.ndarray] = {}
        self._control_cid = ""
        self._reset_control()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BaseModel:
        """Open round 0 on a fresh journal, or rebuild the open round after a restart."""
        with self._lock:
            if self._selector is not None:
                self._times_invited = self._journal.times_invited()
            record = self._journal.current_round()
            if record is None:
                initial = self._initial_base() if callable(self._initial_base) else self._initial_base
                self._journal.open_round(0, initial, now=self._clock())
                record = self._journal.current_round()
                assert record is not None
            if self._privacy is not None:
                self._privacy.restore(self._journal.history(), self._journal.iter_all_updates())
            self._resume_strategy()
            self._resume_cadence()
            self._resume_control()
            self._enter_round(record)
            accepted = self._journal.open_updates()
            for update in accepted:
                self.fold(update, self.intake.read_accepted(update))
                self._fold_stored_control(update)
            if accepted:
                log.info(
                    "round_recovered",
                    extra={
                        "fields": {
                            "federation": self.federation,
                            "round": record.round,
                            "updates": len(accepted),
                            "base": record.base_cid,
                        }
                    },
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
        self._base_squared_norms = squared_norms(self._base_tensors)
        # rules that need every update at once read them back from the store at close
        self._aggregation = self._strategy.start(self._base_tensors, store=self._store)
        self._accepted = []
        self._reset_control()
        if self._selector is not None:
            self._invited = frozenset(self._journal.invited(record.round))
        self._deadline = max(record.opened_at, self._clock() if record.opened_at == 0 else record.opened_at) + (
            self.settings.deadline_s
        )

    def close(self) -> None:
        """Wait for blob writes in flight; idempotent."""
        self.intake.close()

    @property
    def current(self) -> BaseModel:
        # read without the lock: agents' calls on the serving loop must never wait for a round closing
        base = self._base
        if base is None:
            raise StrataError("round manager not started", reason="not_started")
        return base

    @property
    def opened_at(self) -> float:
        """When the current round opened (Unix time), for the round-stalled alert."""
        record = self._round
        return record.opened_at if record is not None else 0.0

    @property
    def base_tensors(self) -> Mapping[str, np.ndarray]:
        return self._base_tensors

    @property
    def accepted_count(self) -> int:
        with self._lock:
            return len(self._accepted)

    # ------------------------------------------------------------------ the intake's receiver

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def open_round(self) -> OpenRound:
        with self._lock:
            if self._round is None:
                raise StrataError("round manager not started", reason="not_started")
            return OpenRound(
                round=self._round.round,
                base_tensors=self._base_tensors,
                base_squared_norms=self._base_squared_norms,
            )

    def fold(self, update: AcceptedUpdate, tensors: Mapping[str, np.ndarray]) -> int:
        assert self._aggregation is not None
        tensors, weights_cid = self._as_folded(update, tensors)
        self._aggregation.add(tensors, self._weight(update), label=update.update_cid, weights_cid=weights_cid)
        self._accepted.append(update)
        return len(self._accepted)

    def _as_folded(
        self, update: AcceptedUpdate, tensors: Mapping[str, np.ndarray]
    ) -> tuple[Mapping[str, np.ndarray], str]:
        """The tensors a rule sees for an update, and the stored blob it may read them back from ("": none)."""
        if self._buffered and update.staleness > 0:
            # FedBuff applies a stale update's delta to the current base (aggregator.buffered); a rebased
            # update is not its stored blob, so a rule that reads blobs back keeps it in memory
            return rebase(tensors, self.intake.base_tensors(update.base_cid), self._base_tensors), ""
        return tensors, update.weights_cid if self._blobs_are_weights else ""

    def fold_control(self, update: AcceptedUpdate, delta: Mapping[str, np.ndarray], samples: int | None = None) -> None:
        """SCAFFOLD: add an accepted update's delta_c to the round's sum, with the weight its model has in
        the aggregate (the intake validated it); `samples`: its credited claim, when the close lowered it."""
        weight = self._weight(update, samples)
        for name, value in delta.items():
            held = self._control_sum.get(name)
            weighted = value.astype(np.float64) * weight
            self._control_sum[name] = weighted if held is None else held + weighted
            self._control_weight[name] = self._control_weight.get(name, 0.0) + weight
        self._control_updates += 1

    def _fold_stored_control(self, update: AcceptedUpdate, samples: int | None = None) -> None:
        """Fold an accepted update's delta_c read back from the store (a restart, or a refold at close)."""
        delta_c = self.intake.read_control(update) if self._scaffold else None
        if delta_c is not None:
            self.fold_control(update, delta_c, samples)

    def _reset_control(self) -> None:
        self._control_sum: dict[str, np.ndarray] = {}
        self._control_weight: dict[str, float] = {}
        self._control_updates = 0

    @property
    def control_cid(self) -> str:
        """The model CID of this cluster's SCAFFOLD server variate c ("" before the first round closed)."""
        return self._control_cid

    def _resume_control(self) -> None:
        """SCAFFOLD's c after a restart: the variate the last closed round's cluster manifest names."""
        closed = self.closed_rounds()
        if not self._scaffold or not closed:
            return
        cid = server_control_cid(load_manifest(self._store, closed[-1].cluster_cid).extra)
        if cid:
            self._control = decode_tensors(load_model(self._store, cid)[1])
            self._control_cid = cid

    def _step_control(self, round_: int, active_trainers: int) -> dict[str, object]:
        """SCAFFOLD's server step c <- c + (|S|/N) mean(delta_c_i), N the cluster's active trainers (at least
        |S|), the mean weighted like the models (num_samples x staleness discount): with an unweighted mean,
        c drifts from the weighted mean of the c_i, the corrections no longer cancel in the weighted model
        average, and the fleet diverges on unequal clients (bench/README.md). c is saved as a `control`
        model and named in the cluster manifest."""
        assert self._base is not None
        updates = self._control_updates
        agents = max(active_trainers, updates, 1)
        share = updates / agents
        control = {
            name: (self._control.get(name, np.zeros_like(base, dtype=np.float32)).astype(np.float64)
                   + (share * self._control_sum[name] / self._control_weight[name] if name in self._control_sum else 0.0)
                   ).astype(np.float32)
            for name, base in self._base_tensors.items()
        }
        manifest = save_model(
            self._store,
            weights=encode_tensors(control),
            kind=CONTROL_KIND,
            federation=self.federation,
            round=round_,
            producer=Producer(role="aggregator", id=self.aggregator_id),
            key=self._key,
            parents=(self._control_cid,) if self._control_cid else (),
            base=self._base.model_cid,
            algorithm={"name": "scaffold", "params": {"server_step": "c + |S|/N x weighted mean(delta_c)"}},
            extra={"updates": updates, "agents": agents},
        )
        self._control, self._control_cid = control, manifest.cid
        return {SCAFFOLD_KEY: {"control": manifest.cid, "updates": updates, "agents": agents}}

    # ------------------------------------------------------------------ selection

    def invite(self, active: Sequence[AgentInfo]) -> list[str]:
        """Invite eligible active agents into free places of this round (none without selection)."""
        if self._selector is None:
            return []
        with self._lock:
            if self._round is None or self._invited is None:
                return []
            chosen = self._selector.choose(
                self._round.round, active, invited=set(self._invited), times_invited=self._times_invited
            )
            if not chosen:
                return []
            self._journal.record_invitations(self._round.round, chosen, now=self._clock())
            self._invited = self._invited | frozenset(chosen)
            for agent_id in chosen:
                self._times_invited[agent_id] = self._times_invited.get(agent_id, 0) + 1
            log.info("agents_invited", extra={"fields": {"federation": self.federation, "round": self._round.round, "new": len(chosen), "invited": len(self._invited)}})
            return chosen

    def invited(self, agent_id: str) -> bool:
        """Whether `agent_id` trains this round; read without the lock (agents ask on the serving loop)."""
        invited = self._invited
        return invited is None or agent_id in invited

    @property
    def check_back_s(self) -> float:
        return self._selector.settings.check_back_s if self._selector is not None else 0.0

    def expected_trainers(self, active: Sequence[AgentInfo]) -> int:
        """The active agents this round waits for: every trainer, or the invited ones."""
        return expected_trainers(active, None if self._invited is None else set(self._invited))

    def _admit(self, sub: Submission) -> None:
        """A claim above max_num_samples is refused when so configured; with selection, only
        invited agents' updates count (a relay is one invited agent); with a privacy budget spent,
        none does."""
        if self._privacy is not None and self._privacy.exhausted:
            raise UpdateRefused(
                f"federation {self.federation} has spent its privacy budget; training has stopped",
                reason=Refusal.PRIVACY_BUDGET_SPENT,
            )
        if self._privacy is not None:
            problem = self._privacy.local_dp_problem(sub.kind, sub.manifest)
            if problem is not None:
                raise UpdateRefused(problem, reason=Refusal.LOCAL_DP_REQUIRED)
        cap = self.settings.max_num_samples
        if cap and sub.num_samples > cap and self.settings.over_max_samples == "refuse":
            raise UpdateRefused(
                f"num_samples {sub.num_samples} is above this federation's maximum {cap}", reason=Refusal.TOO_MANY_SAMPLES
            )
        if self._selector is None:
            return
        with self._lock:
            current = self._round.round if self._round is not None else -1
            invited = self._invited
        if sub.round == current and invited is not None and sub.agent_id in invited:
            return
        if sub.round != current and self._journal.was_invited(sub.round, sub.agent_id):
            return
        raise UpdateRefused(
            f"agent {sub.agent_id} was not invited to train in round {sub.round}", reason=Refusal.NOT_INVITED
        )

    # ------------------------------------------------------------------ sample counts are claims

    def _samples(self, update: AcceptedUpdate) -> int:
        """The sample count an update is folded in with: its claim, capped at max_num_samples."""
        cap = self.settings.max_num_samples
        return min(update.num_samples, cap) if cap else update.num_samples

    def _weight(self, update: AcceptedUpdate, samples: int | None = None) -> float:
        # the journaled weight is claim x staleness discount; a capped claim scales it down alike
        credited = self._samples(update) if samples is None else samples
        return update.weight * credited / update.num_samples

    def _contributors(self, update: AcceptedUpdate) -> int:
        """How many devices an update stands for: a relay's names its devices' updates as parents."""
        if update.kind != "relay":
            return 1
        try:
            return max(1, len(load_manifest(self._store, update.update_cid).parents))
        except StrataError:  # the manifest was checked at intake; a store hiccup must not fail the close
            return 1

    def _credit(self, accepted: Sequence[AcceptedUpdate]) -> CreditedClaims:
        """The round's claims (after the absolute cap) rescaled against each other: max_claim_ratio."""
        return credit_claims(
            [self._samples(u) for u in accepted],
            ratio=self.settings.max_claim_ratio,
            contributors=[self._contributors(u) for u in accepted] if self.settings.max_claim_ratio else None,
        )

    def _refold(self, accepted: Sequence[AcceptedUpdate], credited: Sequence[int]) -> None:
        """Fold the round again with the credited claims. A streaming rule's sums cannot take a weight
        back exactly, so this reads the round's updates once more; it happens only when a claim was
        lowered (an honest round's claims are within the ratio of each other)."""
        self._aggregation = self._strategy.start(self._base_tensors, store=self._store)
        self._reset_control()  # delta_c is weighted like its model: with the credited claim too
        for update, samples in zip(accepted, credited, strict=True):
            tensors, weights_cid = self._as_folded(update, self.intake.read_accepted(update))
            self._aggregation.add(tensors, self._weight(update, samples), label=update.update_cid, weights_cid=weights_cid)
            self._fold_stored_control(update, samples)

    def _resume_strategy(self) -> None:
        """Hand the strategy the record of the last closed round (server optimizer state)."""
        closed = self.closed_rounds()
        if not closed:
            return
        cluster = load_manifest(self._store, closed[-1].cluster_cid)
        report = cluster.extra.get("aggregation", {})
        if isinstance(report, Mapping):
            self._strategy.resume(self._store, report)

    def _resume_cadence(self) -> None:
        """Rebuild the buffered synthesis cadence from the journal's closed rounds."""
        history = self._journal.history()
        self._synthesized_at = history[0].opened_at if history else self._clock()
        self._steps_since_synthesis = 0
        for record in history:
            if record.closed_at is None:
                continue
            if record.extra.get("synthesis", True):
                self._steps_since_synthesis, self._synthesized_at = 0, record.closed_at
            else:
                self._steps_since_synthesis += 1

    def _synthesis_due(self) -> bool:
        if not self._buffered:
            return True
        every_steps, every_s = self._synthesis_every
        return synthesis_due(
            steps_since=self._steps_since_synthesis + 1,
            seconds_since=self._clock() - self._synthesized_at,
            every_steps=every_steps,
            every_s=every_s,
        )

    def _buffer_record(self, accepted: Sequence[AcceptedUpdate], samples: Mapping[str, int]) -> dict[str, object]:
        """Buffered mode: the buffer this step applied, each update with its staleness and weight."""
        if not self._buffered:
            return {}
        return {
            "buffer": {
                "buffer_size": self.settings.buffer_size,
                "updates": [
                    {
                        "cid": u.update_cid,
                        "agent": u.agent_id,
                        "trained_round": u.trained_round,
                        "staleness": u.staleness,
                        "discount": u.weight / u.num_samples,
                        "weight": self._weight(u, samples[u.update_cid]),
                    }
                    for u in sorted(accepted, key=lambda u: u.update_cid)
                ],
            }
        }

    def _aggregation_record(self, accepted: Sequence[AcceptedUpdate], claims: CreditedClaims) -> dict[str, object]:
        """What the rule did to whom, and which claims were capped, for the cluster manifest."""
        assert self._aggregation is not None
        report = dict(self._aggregation.report())
        agents = {u.update_cid: u.agent_id for u in accepted}
        for key in ("refused", "down_weighted"):
            if key in report:
                report[key] = [{**entry, "agent": agents.get(entry.get("cid", ""), "")} for entry in report[key]]
        capped = {u.update_cid: u.num_samples for u in accepted if self._samples(u) != u.num_samples}
        record: dict[str, object] = {"aggregation": report} if report else {}
        if capped:
            record["capped_num_samples"] = {"max": self.settings.max_num_samples, "claimed": capped}
        if claims.capped:
            rescaled = claims.record([u.update_cid for u in accepted], [self._samples(u) for u in accepted])
            for cid, entry in rescaled["claims"].items():  # type: ignore[union-attr]
                entry["agent"] = agents.get(cid, "")
            record["rescaled_num_samples"] = rescaled
        return record

    # ------------------------------------------------------------------ close

    def quorum_target(self, active_trainers: int) -> int:
        """The updates that close the round early: a quorum of active trainers, or a full buffer."""
        if self._buffered:
            return self.settings.buffer_size
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
                return self._close_within_budget(
                    trigger="buffer_full" if self._buffered else "quorum", active_trainers=active_trainers
                )
            if now < self._deadline:
                return None
            if count >= self.settings.min_updates:
                return self._close_within_budget(trigger="deadline", active_trainers=active_trainers)
            self._deadline = now + self.settings.deadline_s
            log.info(
                "round_extended",
                extra={
                    "fields": {
                        "federation": self.federation,
                        "round": self._round.round,
                        "accepted": count,
                        "min_updates": self.settings.min_updates,
                        "quorum_target": target,
                        "extended_by_s": self.settings.deadline_s,
                    }
                },
            )
            return None

    def _close_within_budget(self, *, trigger: str, active_trainers: int = 0) -> Manifest | None:
        # a release past the privacy budget never happens: the round stays open and training stops
        assert self._round is not None
        if self._privacy is not None and not self._privacy.affordable(self._round.round, self._accepted):
            return None
        return self._close(trigger=trigger, active_trainers=active_trainers)

    def _close(self, *, trigger: str, active_trainers: int = 0) -> Manifest:
        assert self._round is not None and self._aggregation is not None and self._base is not None
        started = time.perf_counter()
        round_, accepted = self._round.round, list(self._accepted)
        claims = self._credit(accepted)
        samples = dict(zip((u.update_cid for u in accepted), claims.credited, strict=True))
        central_dp = self._privacy is not None and self._privacy.settings.central.enabled
        if claims.capped and not central_dp:  # under central DP every update weighs 1 already
            self._refold(accepted, claims.credited)
        result = self._aggregation.result()
        privacy = {"privacy": self._privacy.spend(round_, accepted)} if self._privacy is not None else {}
        total = sum(claims.credited)
        scaffold = self._step_control(round_, active_trainers) if self._scaffold else {}
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
            metrics={
                **weighted_means([(without_heldout(u.metrics), samples[u.update_cid]) for u in accepted]),
                **heldout_metrics(self._evaluate, result),
            },
            algorithm={
                **self._strategy.describe(),
                "weighting": "uniform: clipped deltas (central DP)"
                if central_dp
                else "num_samples (capped, rescaled against the round's median) x staleness discount"
                + ("; buffered: stale updates' deltas rebased onto the current base" if self._buffered else ""),
                "staleness_discount": {
                    "name": self.settings.staleness_discount,
                    "params": dict(self.settings.staleness_params),
                },
            },
            extra={
                "base_metrics": weighted_means([(u.base_metrics, samples[u.update_cid]) for u in accepted]),
                "trigger": trigger,
                **self._selection_record(accepted),
                **self._buffer_record(accepted, samples),
                **privacy,
                **self._aggregation_record(accepted, claims),
                **scaffold,
            },
        )
        aggregation_s = time.perf_counter() - started
        self._emit(cluster)
        synthesis = self._synthesize is not None and self._synthesis_due()
        next_base = self._synthesize(cluster, result) if synthesis and self._synthesize else cluster
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
            extra={
                "trigger": trigger,
                "next_base_kind": next_base.kind,
                "stale_updates": sum(u.staleness > 0 for u in accepted),
                "mode": self.settings.mode,
                "synthesis": synthesis,
                **privacy,
                # the models' accuracy on the task's held-out split, when the aggregator evaluates them
                **({"cluster_heldout": heldout_of(cluster.metrics)} if heldout_of(cluster.metrics) else {}),
                **({"heldout": heldout_of(next_base.metrics)} if heldout_of(next_base.metrics) else {}),
            },
        )
        self._journal.close_round(record, accepted, next_round=round_ + 1, next_base_cid=next_base.cid)
        if synthesis:
            self._steps_since_synthesis, self._synthesized_at = 0, closed_at
        else:
            self._steps_since_synthesis += 1
        log.info(
            "round_closed",
            extra={
                "fields": {
                    "federation": self.federation,
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

    def _selection_record(self, accepted: Sequence[AcceptedUpdate]) -> dict[str, object]:
        """Who was invited and who answered, for the cluster manifest (nothing without selection)."""
        if self._selector is None or self._invited is None:
            return {}
        return {
            "selection": {
                **self._selector.describe(),
                "invited": sorted(self._invited),
                "answered": sorted({u.agent_id for u in accepted} & self._invited),
            }
        }

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
