"""Semi-global synthesis: blend this aggregator's cluster model with its peers' latest cluster models.

After each round an aggregator gathers the latest cluster pointers of a subset of
its peers (straight from the peers, so the coordinator is not needed), fetches
their manifests and weights by CID (the shared store first, the peer's FetchBlob
as a fallback; every byte re-hashed), screens each candidate, and averages the
survivors with its own cluster model:

    weight_i = credited num_samples_i x decay(age_i)

where a peer's sample count, a claim nobody can check, is credited with at most
SAMPLE_RATIO_LIMIT x the median count of the models merged (recorded in
`extra.capped_peer_samples`),

where age is in rounds (own round - peer round) or seconds, and `decay` is a
named function from `aggregator.staleness`. The merge is `synthesis.strategy`,
one of the same rules the rounds use (FedAvg by default; a robust rule such as
median, krum or geomed keeps a poisoned peer model that passed screening out of
the semi-global model); there is one implementation of each rule.

Screening, in order (refusal reason in brackets):
- too old [stale]; unreachable or missing [unavailable]; bytes that do not hash
  to their CID [hash_mismatch]; not a valid manifest [invalid_manifest];
- signature does not verify [bad_signature]; producer not a ring member [not_member];
  not a cluster model of this federation from that producer [wrong_model];
- with TLS (`signers` given): the embedded certificate is not a current one of the
  fleet CA (issued by it, valid now and at the model's created_at, not revoked)
  certifying the signing key for aggregator <producer>, the ring member asked
  [uncertified_signer];
- names, shapes or dtypes differ from ours [shape_mismatch]; NaN/inf [not_finite];
- a norm more than 10x or less than 1/10 of ours [norm_outlier], whatever the
  number of candidates;
- an outlier [outlier]: robust z-score of its L2 distance to the coordinate-wise
  median of all candidates (ours included) above `outlier_z`, applied only from
  5 models up (MIN_MODELS_FOR_Z, ours included): over fewer, the median says
  little and honest peers whose data simply differs get flagged.

The semi-global manifest's parents are our cluster model plus the peer cluster
models used; refused ones are listed with their reasons in `extra.refused_peers`
(a model the rule left out, e.g. not selected by Krum, as [rejected_by_rule]),
and what the rule did (coefficients, clipping) in `extra.aggregation`.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from aggregator.config import SynthesisSettings
from aggregator.evaluation import Evaluate, heldout_metrics, without_heldout
from aggregator.rules import make_strategy
from aggregator.staleness import make_discount
from aggregator.strategies import weighted_means
from coordinator.ring import Member, Ring
from intake.validation import mismatch, non_finite
from proto.errors import IntegrityError, InvalidInput, NotFound, StrataError, Unavailable
from storage.codec import CodecError, decode_tensors, encode_tensors
from storage.control import MANIFEST_KEY as SCAFFOLD_KEY
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from storage.models import save_model
from storage.store import ContentStore
from trust.identity import Role
from trust.signers import SignerError, Signers

log = logging.getLogger("strata.aggregator.synthesis")

# a candidate whose norm differs from ours by more than this factor is refused
NORM_RATIO_LIMIT = 10.0
# a peer model's sample count is a claim: it is credited with at most this many times the median
# count of the models being merged (ours included), so one inflated claim cannot outweigh the rest
SAMPLE_RATIO_LIMIT = 10.0
# how often a waiting synthesis asks a lagging peer again
_PEER_POLL_S = 0.2
# the outlier z-score needs this many models (ours included) to mean anything
MIN_MODELS_FOR_Z = 5
# 0.6745 makes the MAD a consistent estimator of the standard deviation for normal data
_MAD_SCALE = 0.6745


@dataclass(frozen=True, kw_only=True)
class ClusterPointer:
    model_cid: str
    round: int
    num_samples: int
    producer: str
    created_at: float
    federation: str
    weights_cid: str = ""


class PeerReason(StrEnum):
    """Why synthesis refused a peer's cluster model; recorded in `extra.refused_peers`."""

    UNAVAILABLE = "unavailable"
    WRONG_MODEL = "wrong_model"
    STALE = "stale"
    INVALID_MANIFEST = "invalid_manifest"
    BAD_SIGNATURE = "bad_signature"
    NOT_MEMBER = "not_member"
    INVALID_SAFETENSORS = "invalid_safetensors"
    SHAPE_MISMATCH = "shape_mismatch"
    NOT_FINITE = "not_finite"
    HASH_MISMATCH = "hash_mismatch"
    NORM_OUTLIER = "norm_outlier"
    OUTLIER = "outlier"
    UNCERTIFIED_SIGNER = "uncertified_signer"
    REJECTED_BY_RULE = "rejected_by_rule"


@dataclass(frozen=True, kw_only=True)
class PeerRefusal:
    model_cid: str
    producer: str
    reason: PeerReason
    message: str

    def to_json(self) -> dict[str, str]:
        return {"cid": self.model_cid, "producer": self.producer, "reason": self.reason, "message": self.message}


class PeerAccess:
    """How synthesis reaches a peer: its latest pointer and, as a fallback, its blobs."""

    def latest(self, member: Member, timeout_s: float) -> ClusterPointer | None:
        raise NotImplementedError

    def fetch_blob(self, member: Member, cid: str, timeout_s: float) -> bytes:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class _Candidate:
    pointer: ClusterPointer
    manifest: Manifest
    tensors: dict[str, np.ndarray]
    age: float


class SemiGlobalSynthesizer:
    """The RoundManager's synthesis seam: cluster model in, semi-global model out."""

    def __init__(
        self,
        *,
        aggregator_id: str,
        federation: str,
        settings: SynthesisSettings,
        store: ContentStore,
        key: KeyPair,
        ring: Callable[[], Ring],
        shared_store: ContentStore | None = None,
        peers: PeerAccess,
        publish: Callable[[Manifest], None] | None = None,
        signers: Signers | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        wait_for_peers: bool = True,
        evaluate: Evaluate | None = None,
    ) -> None:
        """`signers` (with TLS): peers' cluster models count only if certified ring members signed them.
        `wait_for_peers`: wait up to peer_wait_s for peers still behind our round (sync rounds); buffered
        aggregators' round numbers count their own steps, so they blend at once. `evaluate`: the held-out
        metrics of each semi-global model, recorded in its manifest."""
        self._wait_for_peers = wait_for_peers
        self.aggregator_id = aggregator_id
        self.federation = federation
        self.settings = settings
        self._store = store
        self._shared = shared_store if shared_store is not None else store
        self._key = key
        self._ring = ring
        self._peers = peers
        self._publish = publish
        self._signers = signers
        self._clock = clock
        self._rng = rng or random.Random()
        self._evaluate = evaluate
        self._decay = make_discount(settings.decay, **settings.decay_params)
        self._strategy = make_strategy(settings.strategy, settings.strategy_params)
        self.last_sources: dict[str, str] = {}
        self._wait_until = 0.0
        # since this process started, for /metrics: peers' cluster models used, and refused by reason
        self._counts_lock = threading.Lock()
        self.peers_used = 0
        self.peers_refused: collections.Counter[str] = collections.Counter()

    def select_peers(self, ring: Ring, round_: int = 0) -> list[Member]:
        """The peers this round's synthesis asks: all, K at random, or K on the exponential graph."""
        others = [m for m in ring.members if m.id != self.aggregator_id]
        if self.settings.peers == "all":
            return others
        mode, _, count = self.settings.peers.partition(":")
        if mode == "exp":
            return exponential_peers(ring.members, self.aggregator_id, round_, int(count))
        return self._rng.sample(others, min(int(count), len(others)))

    def __call__(self, cluster: Manifest, tensors: Mapping[str, np.ndarray]) -> Manifest:
        ring = self._ring()
        self._wait_until = time.monotonic() + (self.settings.peer_wait_s if self._wait_for_peers else 0.0)
        candidates: list[_Candidate] = []
        refused: list[PeerRefusal] = []
        for member in self.select_peers(ring, cluster.round):
            try:
                candidate = self._gather(member, ring, cluster, tensors)
            except _Refused as refusal:
                refused.append(refusal.refusal)
                continue
            if candidate is not None:
                candidates.append(candidate)
        candidates, outliers = screen_outliers(tensors, candidates, self.settings.outlier_z)
        refused += outliers
        manifest = self._combine(cluster, tensors, candidates, refused)
        with self._counts_lock:
            self.peers_used += len(candidates)
            for refusal in refused:
                self.peers_refused[str(refusal.reason)] += 1
        return manifest

    # ---------------------------------------------------------------- gather and screen

    def _gather(
        self, member: Member, ring: Ring, cluster: Manifest, own: Mapping[str, np.ndarray]
    ) -> _Candidate | None:
        timeout = self.settings.fetch_timeout_s
        try:
            pointer = self._latest_pointer(member, cluster.round, timeout)
        except StrataError as exc:
            log.info("peer_unreachable", extra={"fields": {"federation": self.federation, "peer": member.id, "error": str(exc)}})
            raise _Refused("", member.id, PeerReason.UNAVAILABLE, f"peer {member.id} did not answer: {exc}") from None
        if pointer is None:
            return None  # the peer has not closed a round yet
        cid, who = pointer.model_cid, member.id
        if pointer.federation and pointer.federation != self.federation:
            raise _Refused(cid, who, PeerReason.WRONG_MODEL, f"pointer is for federation {pointer.federation!r}")
        age = self._age(pointer, cluster)
        if age > self.settings.max_age:
            raise _Refused(cid, who, PeerReason.STALE, f"{age:g} {self.settings.decay_unit} old (max_age {self.settings.max_age:g})")
        manifest_bytes = self._fetch(member, cid)
        try:
            manifest = Manifest.from_bytes(manifest_bytes)
        except InvalidInput as exc:
            raise _Refused(cid, who, PeerReason.INVALID_MANIFEST, str(exc)) from None
        try:
            manifest.verify_signature()
        except IntegrityError as exc:
            raise _Refused(cid, who, PeerReason.BAD_SIGNATURE, str(exc)) from None
        if manifest.producer.id not in ring:
            raise _Refused(cid, who, PeerReason.NOT_MEMBER, f"producer {manifest.producer.id!r} is not a ring member")
        if (
            manifest.kind != "cluster"
            or manifest.federation != self.federation
            or manifest.producer.id != member.id
            or manifest.producer.role != "aggregator"
        ):
            raise _Refused(
                cid,
                who,
                PeerReason.WRONG_MODEL,
                f"expected a {self.federation} cluster model by aggregator {member.id}, got {manifest.kind} "
                f"of {manifest.federation} by {manifest.producer.role}:{manifest.producer.id}",
            )
        self._check_signer(manifest, member, ring)
        weights = self._fetch(member, manifest.weights)
        try:
            peer_tensors = decode_tensors(weights)
        except CodecError as exc:
            raise _Refused(cid, who, PeerReason.INVALID_SAFETENSORS, str(exc)) from None
        problem = mismatch(own, peer_tensors, expected=tuple(own))
        if problem is not None:
            raise _Refused(cid, who, PeerReason.SHAPE_MISMATCH, problem)
        problem = non_finite(peer_tensors)
        if problem is not None:
            raise _Refused(cid, who, PeerReason.NOT_FINITE, problem)
        return _Candidate(pointer=pointer, manifest=manifest, tensors=peer_tensors, age=age)

    def _check_signer(self, manifest: Manifest, member: Member, ring: Ring) -> None:
        """With TLS: the signer is the ring member asked, certified now by the fleet CA as that aggregator."""
        if self._signers is None:
            return
        cid, who = manifest.cid, member.id
        try:
            signer = self._signers.check(manifest, current=True)
        except SignerError as exc:
            raise _Refused(cid, who, PeerReason.UNCERTIFIED_SIGNER, f"{exc.reason}: {exc}") from None
        identity = signer.certified.identity
        if signer.recorded_for or identity.role != Role.AGGREGATOR or identity.id != member.id or identity.id not in ring:
            raise _Refused(
                cid, who, PeerReason.UNCERTIFIED_SIGNER, f"signed by {identity}, not by ring member aggregator/{member.id}"
            )

    def _latest_pointer(self, member: Member, round_: int, timeout: float) -> ClusterPointer | None:
        """The peer's latest pointer, waiting (bounded by peer_wait_s from the start of this
        synthesis) while it has not yet closed `round_`."""
        pointer = self._peers.latest(member, timeout)
        while (pointer is None or pointer.round < round_) and time.monotonic() < self._wait_until:
            time.sleep(min(_PEER_POLL_S, max(0.0, self._wait_until - time.monotonic())))
            pointer = self._peers.latest(member, timeout)
        return pointer

    def _age(self, pointer: ClusterPointer, cluster: Manifest) -> float:
        if self.settings.decay_unit == "rounds":
            return float(max(0, cluster.round - pointer.round))
        return max(0.0, self._clock() - pointer.created_at)

    def _fetch(self, member: Member, cid: str) -> bytes:
        """From the shared store (an IPFS node fetches it from its peers over bitswap), else from
        the peer's FetchBlob; verified either way, and copied into our own store so the
        semi-global model's lineage can be walked there. `last_sources` says which path served it."""
        data: bytes | None = None
        for name, store in (("own store", self._store), ("shared store", self._shared)):
            if name == "shared store" and store is self._store:
                break
            try:
                if name == "own store" and not store.has(cid):
                    continue
                data = store.get(cid)
                self.last_sources[cid] = name
                break
            except (NotFound, IntegrityError):
                continue  # not there, or a damaged copy: look elsewhere
            except Unavailable as exc:
                log.info("shared_store_unavailable", extra={"fields": {"federation": self.federation, "cid": cid, "error": str(exc)}})
        if data is None:
            try:
                data = self._peers.fetch_blob(member, cid, self.settings.fetch_timeout_s)
            except IntegrityError as exc:
                raise _Refused(cid, member.id, PeerReason.HASH_MISMATCH, str(exc)) from None
            except StrataError as exc:
                raise _Refused(cid, member.id, PeerReason.UNAVAILABLE, f"cannot fetch {cid} from {member.id}: {exc}") from None
            self.last_sources[cid] = "peer"
        if not self._store.has(cid) and self._store.put(data) != cid:
            raise _Refused(cid, member.id, PeerReason.HASH_MISMATCH, f"bytes from {member.id} do not hash to {cid}")
        return data

    # ---------------------------------------------------------------- combine

    def _combine(
        self,
        cluster: Manifest,
        own: Mapping[str, np.ndarray],
        candidates: Sequence[_Candidate],
        refused: Sequence[PeerRefusal],
    ) -> Manifest:
        credited = credited_samples(cluster, candidates)
        weights = {cluster.cid: float(cluster.num_samples) * self._decay(0.0)}
        aggregation = self._strategy.start(own)
        aggregation.add(own, max(weights[cluster.cid], 1e-12), label=cluster.cid)
        for candidate in candidates:
            # the signed manifest's count, not the pointer's unsigned claim
            weight = float(credited[candidate.manifest.cid]) * self._decay(candidate.age)
            weights[candidate.manifest.cid] = weight
            aggregation.add(candidate.tensors, max(weight, 1e-12), label=candidate.manifest.cid)
        result = aggregation.result()
        report = aggregation.report()
        left_out = {entry["cid"]: entry for entry in report.get("refused", [])}
        refused = [
            *refused,
            *(
                PeerRefusal(
                    model_cid=c.manifest.cid,
                    producer=c.manifest.producer.id,
                    reason=PeerReason.REJECTED_BY_RULE,
                    message=f"{self._strategy.name}: {left_out[c.manifest.cid].get('message', '')}",
                )
                for c in candidates
                if c.manifest.cid in left_out
            ),
        ]
        candidates = [c for c in candidates if c.manifest.cid not in left_out]
        used = [cluster, *(c.manifest for c in candidates)]
        claimed = {m.cid: m.num_samples for m in used}
        manifest = save_model(
            self._store,
            weights=encode_tensors(result),
            kind="semi-global",
            federation=self.federation,
            round=cluster.round,
            producer=Producer(role="aggregator", id=self.aggregator_id),
            key=self._key,
            parents=[m.cid for m in used],
            base=cluster.base,
            num_samples=min(sum(credited[m.cid] for m in used), _MAX_SAMPLES),
            metrics={
                # peers' heldout_* are their own measurements of other models: only ours is named so
                **weighted_means([(without_heldout(m.metrics), credited[m.cid]) for m in used]),
                **heldout_metrics(self._evaluate, result),
            },
            algorithm={
                "name": "semi-global",
                "params": {
                    "weighting": "num_samples x decay(age)",
                    "decay": self.settings.decay,
                    "decay_params": dict(self.settings.decay_params),
                    "decay_unit": self.settings.decay_unit,
                    "peers": self.settings.peers,
                    "outlier_z": self.settings.outlier_z,
                },
                "strategy": self._strategy.describe(),
            },
            extra={
                **({"aggregation": report} if report else {}),
                "weights": weights,
                "peer_rounds": {c.manifest.cid: c.pointer.round for c in candidates},
                **(
                    {"capped_peer_samples": {cid: m for cid, m in claimed.items() if credited[cid] != m}}
                    if any(credited[cid] != m for cid, m in claimed.items())
                    else {}
                ),
                "refused_peers": [r.to_json() for r in refused],
                # SCAFFOLD: each cluster keeps its own server variate c; the semi-global model its agents
                # train from next names this cluster's (peers' variates correct their own agents' drift)
                **({SCAFFOLD_KEY: cluster.extra[SCAFFOLD_KEY]} if SCAFFOLD_KEY in cluster.extra else {}),
            },
        )
        if self._publish is not None:
            self._publish(manifest)
        log.info(
            "semi_global_synthesized",
            extra={
                "fields": {
                    "federation": self.federation,
                    "round": cluster.round,
                    "model": manifest.cid,
                    "peers_used": len(candidates),
                    "peers_refused": len(refused),
                    "refusals": ",".join(f"{r.producer}:{r.reason}" for r in refused),
                }
            },
        )
        return manifest


_MAX_SAMPLES = (1 << 63) - 1


def exponential_peers(members: Sequence[Member], own_id: str, round_: int, count: int) -> list[Member]:
    """At most `count` peers on the exponential graph (Ying et al., NeurIPS 2021), rotating with the round.

    Members are ordered by id (every aggregator sees the same order); the hops are 1, 2, 4, ...,
    2^(ceil(log2 N) - 1) places ahead, and round r uses hops r*count .. r*count + count - 1 of that
    cycle (all of them when count is at least their number). Among aggregators in the same round,
    every member is asked by exactly as many peers as it asks, so equal-weight blends keep the
    fleet's average, and within ceil(log2 N) rounds every cluster model has reached every
    aggregator (with N a power of two and count 1, that many rounds of pure averaging give the
    exact mean); random picks leave some aggregators unasked each round and spread more slowly.
    A ring without us (we were dropped) gives no peer."""
    ordered = sorted(members, key=lambda m: m.id)
    ids = [m.id for m in ordered]
    if own_id not in ids or len(ordered) < 2 or count < 1:
        return []
    n = len(ordered)
    hops = [1 << j for j in range(max(1, (n - 1).bit_length()))]
    if count >= len(hops):
        chosen = hops
    else:
        chosen = [hops[(round_ * count + j) % len(hops)] for j in range(count)]
    own = ids.index(own_id)
    peers: list[Member] = []
    for hop in chosen:
        peer = ordered[(own + hop) % n]
        if peer.id != own_id and peer not in peers:
            peers.append(peer)
    return peers


def credited_samples(cluster: Manifest, candidates: Sequence[_Candidate]) -> dict[str, int]:
    """Each model's sample count as credited: ours as is, a peer's capped at SAMPLE_RATIO_LIMIT x the
    median count of all of them (robust rescaling of a claim nobody can check)."""
    counts = [cluster.num_samples, *(c.manifest.num_samples for c in candidates)]
    limit = max(1, int(SAMPLE_RATIO_LIMIT * float(np.median(np.array(counts, dtype=np.float64)))))
    credited = {cluster.cid: min(cluster.num_samples, _MAX_SAMPLES)}
    for candidate in candidates:
        credited[candidate.manifest.cid] = min(candidate.manifest.num_samples, limit, _MAX_SAMPLES)
    return credited


class _Refused(Exception):
    def __init__(self, cid: str, producer: str, reason: PeerReason, message: str) -> None:
        super().__init__(message)
        self.refusal = PeerRefusal(model_cid=cid, producer=producer, reason=reason, message=message)


def _flatten(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([tensors[name].reshape(-1).astype(np.float32, copy=False) for name in sorted(tensors)])


def robust_z_scores(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Robust z-score of each vector's L2 distance to the coordinate-wise median of all of them."""
    stacked = np.stack(vectors)
    median = np.median(stacked, axis=0)
    distances = np.linalg.norm(stacked - median, axis=1)
    center = float(np.median(distances))
    mad = float(np.median(np.abs(distances - center)))
    if mad <= 1e-12 * max(center, 1.0):
        return np.zeros(len(vectors))
    return _MAD_SCALE * (distances - center) / mad


def screen_outliers(
    own: Mapping[str, np.ndarray], candidates: Sequence[_Candidate], threshold: float
) -> tuple[list[_Candidate], list[PeerRefusal]]:
    """Split candidates into kept and refused-as-outliers (our own model is the reference, never refused)."""
    if not candidates:
        return [], []
    own_flat = _flatten(own)
    own_norm = float(np.linalg.norm(own_flat))
    flats = [_flatten(c.tensors) for c in candidates]
    kept: list[_Candidate] = []
    refused: list[PeerRefusal] = []
    # a robust z-score over fewer models flags honest peers whose data simply differs
    # (with 3, the MAD is the smaller of two deviations); the norm guard still applies
    enough = len(candidates) + 1 >= MIN_MODELS_FOR_Z
    z = robust_z_scores([own_flat, *flats])[1:] if enough else np.zeros(len(candidates))
    for candidate, flat, score in zip(candidates, flats, z, strict=True):
        norm = float(np.linalg.norm(flat))
        ratio = norm / own_norm if own_norm > 0 else 1.0
        who, cid = candidate.manifest.producer.id, candidate.manifest.cid
        if ratio > NORM_RATIO_LIMIT or ratio < 1 / NORM_RATIO_LIMIT:
            refused.append(PeerRefusal(model_cid=cid, producer=who, reason=PeerReason.NORM_OUTLIER, message=f"norm is {ratio:.3g}x ours"))
        elif score > threshold:
            refused.append(
                PeerRefusal(model_cid=cid, producer=who, reason=PeerReason.OUTLIER, message=f"robust z-score {score:.2f} > {threshold:g}")
            )
        else:
            kept.append(candidate)
    return kept, refused
