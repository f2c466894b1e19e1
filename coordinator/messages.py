"""Every conversion between the CoordinatorService's protobuf messages and the coordinator's domain values.

The service (server side) and `coordinator.client` (client side) both convert
here, so each message has one mapping in each direction. Values that do not
travel are filled with their defaults on the way in: a `ModelRecord` read off
the wire has no `producer_role` or `notes`, an `AggregatorStatus` no `last_seen`,
an `AgentEntry` no `reported_by` unless the receiver names one.

Core modules (`ring`, `membership`, `index`) stay free of gRPC and `*_pb2`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from coordinator.hub import Federation, Proposal, Release, TensorSpec
from coordinator.index import AgentEntry, IndexResult, Lineage, ModelRecord
from coordinator.membership import (
    AggregatorInfo,
    AggregatorStatus,
    FederationProgress,
    Lease,
    Progress,
)
from coordinator.ring import Member, Ring
from proto import strata_pb2 as pb
from proto.convert import capability_name, capability_value, telemetry_from_dict, telemetry_to_dict

D = TypeVar("D")
R = TypeVar("R")

# a listing reply's share of the 4 MiB message limit (proto.wire.MAX_MESSAGE_BYTES): the rest is headroom
PAGE_BYTES = 2 << 20
# the most records one page carries, however small
MAX_PAGE_ITEMS = 10_000


def page(records: Sequence[R], to_pb: Callable[[R], Any], *, offset: int, limit: int) -> tuple[list[Any], int]:
    """One page of a listing: `records[offset:]` as messages, at most `limit` (0: MAX_PAGE_ITEMS) and
    no more than PAGE_BYTES of them (but at least one), and the offset the next page starts at (0: none)."""
    limit = min(limit or MAX_PAGE_ITEMS, MAX_PAGE_ITEMS)
    messages: list[Any] = []
    size = 0
    index = offset
    while index < len(records) and len(messages) < limit:
        message = to_pb(records[index])
        size += message.ByteSize()
        if messages and size > PAGE_BYTES:
            break
        messages.append(message)
        index += 1
    return messages, index if index < len(records) else 0


def all_pages(fetch: Callable[[int], tuple[list[R], int]], limit: int = 0) -> list[R]:
    """Every page of a listing, from `fetch(offset) -> (records, next_offset)`; at most `limit` (0: all)."""
    records: list[R] = []
    offset = 0
    while True:
        batch, next_offset = fetch(offset)
        records.extend(batch)
        if limit and len(records) >= limit:
            return records[:limit]
        if next_offset <= offset:  # the last page (0), or a server that would send this one again
            return records
        offset = next_offset


@dataclass(frozen=True, kw_only=True)
class FleetStatus:
    """What FleetStatus answers: the whole ring and every aggregator ever seen."""

    ring: Ring
    aggregators: list[AggregatorStatus]


def _same_names(cls: type[D], message: Any) -> D:
    """A dataclass whose every field has a namesake in `message` (Lease, Progress)."""
    return cls(**{f.name: getattr(message, f.name) for f in fields(cls)})


# ---------------------------------------------------------------- membership


def info_from_pb(message: pb.AggregatorInfo) -> AggregatorInfo:
    return AggregatorInfo(
        id=message.id,
        address=message.address,
        federations=tuple(message.federations),
        # proto3 cannot tell an unset weight from 0; unset means an equal share
        weight=message.weight or 1.0,
    )


def info_to_pb(info: AggregatorInfo) -> pb.AggregatorInfo:
    return pb.AggregatorInfo(id=info.id, address=info.address, federations=list(info.federations), weight=info.weight)


def lease_from_pb(message: pb.Lease) -> Lease:
    return _same_names(Lease, message)


def lease_to_pb(lease: Lease) -> pb.Lease:
    return pb.Lease(**asdict(lease))


# the heartbeat's own progress fields: a federation's, without its name
_PROGRESS_FIELDS = tuple(f.name for f in fields(FederationProgress) if f.name != "federation")


def _federations_from_pb(messages: Iterable[pb.FederationProgress]) -> tuple[FederationProgress, ...]:
    return tuple(_same_names(FederationProgress, m) for m in messages)


def _federations_to_pb(federations: Iterable[FederationProgress]) -> list[pb.FederationProgress]:
    return [pb.FederationProgress(**asdict(f)) for f in federations]


def heartbeat_from_pb(message: pb.AggregatorHeartbeat) -> tuple[str, Progress, AggregatorInfo | None]:
    """(aggregator id, its progress, its registration if it sent one)."""
    has_info = message.HasField("info") and bool(message.info.id)
    progress = Progress(
        **{name: getattr(message, name) for name in _PROGRESS_FIELDS},
        federations=_federations_from_pb(message.federations),
    )
    return message.id, progress, info_from_pb(message.info) if has_info else None


def heartbeat_to_pb(aggregator_id: str, progress: Progress, info: AggregatorInfo | None) -> pb.AggregatorHeartbeat:
    return pb.AggregatorHeartbeat(
        id=aggregator_id,
        info=info_to_pb(info) if info is not None else None,
        **{name: getattr(progress, name) for name in _PROGRESS_FIELDS},
        federations=_federations_to_pb(progress.federations),
    )


def ring_from_pb(message: pb.Ring) -> Ring:
    return Ring(
        [Member(id=m.id, address=m.address, weight=m.weight or 1.0) for m in message.members],
        version=message.version,
    )


def ring_to_pb(ring: Ring) -> pb.Ring:
    return pb.Ring(
        version=ring.version,
        members=[pb.RingMember(id=m.id, address=m.address, weight=m.weight) for m in ring.members],
    )


def status_from_pb(message: pb.AggregatorStatus) -> AggregatorStatus:
    return AggregatorStatus(
        info=info_from_pb(message.info),
        alive=message.alive,
        lease_expires_at=message.lease_expires_at,
        round=message.round,
        agent_count=message.agent_count,
        last_cluster_cid=message.last_cluster_cid,
        last_semi_global_cid=message.last_semi_global_cid,
        federations=_federations_from_pb(message.federations),
    )


def status_to_pb(status: AggregatorStatus) -> pb.AggregatorStatus:
    return pb.AggregatorStatus(
        info=info_to_pb(status.info),
        alive=status.alive,
        lease_expires_at=status.lease_expires_at,
        round=status.round,
        agent_count=status.agent_count,
        last_cluster_cid=status.last_cluster_cid,
        last_semi_global_cid=status.last_semi_global_cid,
        federations=_federations_to_pb(status.federations),
    )


def fleet_status_from_pb(message: pb.FleetStatusReply) -> FleetStatus:
    return FleetStatus(ring=ring_from_pb(message.ring), aggregators=[status_from_pb(s) for s in message.aggregators])


def fleet_status_to_pb(status: FleetStatus) -> pb.FleetStatusReply:
    return pb.FleetStatusReply(ring=ring_to_pb(status.ring), aggregators=[status_to_pb(s) for s in status.aggregators])


# ---------------------------------------------------------------- models

# one announcement: canonical manifest bytes and the notes recorded beside them
Announcement = tuple[bytes, Mapping[str, str] | None]


def announcements_from_pb(message: pb.AnnounceModelsRequest) -> list[Announcement]:
    return [(m.manifest, dict(m.notes)) for m in message.models]


def announcements_to_pb(items: Iterable[Announcement]) -> pb.AnnounceModelsRequest:
    return pb.AnnounceModelsRequest(
        models=[pb.AnnounceModelRequest(manifest=manifest, notes=dict(notes or {})) for manifest, notes in items]
    )


def index_results_from_pb(message: pb.AnnounceModelsReply) -> list[IndexResult]:
    return [IndexResult(cid=r.model_cid, reason=r.reason, message=r.message) for r in message.results]


def index_results_to_pb(results: Iterable[IndexResult]) -> pb.AnnounceModelsReply:
    return pb.AnnounceModelsReply(
        results=[pb.AnnounceResult(model_cid=r.cid, reason=r.reason, message=r.message) for r in results]
    )



def record_from_pb(message: pb.ModelRecord) -> ModelRecord:
    return ModelRecord(
        cid=message.model_cid,
        kind=message.kind,
        federation=message.federation,
        round=message.round,
        producer=message.producer,
        producer_role="",
        parents=tuple(message.parents),
        num_samples=message.num_samples,
        metrics=dict(message.metrics),
        created_at=message.created_at,
        weights=message.weights_cid,
        manifest=message.manifest,
        base=message.base,
    )


def record_to_pb(record: ModelRecord, *, with_manifest: bool = True) -> pb.ModelRecord:
    return pb.ModelRecord(
        model_cid=record.cid,
        kind=record.kind,
        federation=record.federation,
        round=record.round,
        producer=record.producer,
        parents=list(record.parents),
        num_samples=record.num_samples,
        metrics=record.metrics,
        created_at=record.created_at,
        weights_cid=record.weights,
        manifest=record.manifest if with_manifest else b"",
        base=record.base,
    )


def lineage_from_pb(message: pb.LineageReply) -> Lineage:
    return Lineage(
        model=record_from_pb(message.model),
        ancestors=[record_from_pb(r) for r in message.ancestors],
        children=[record_from_pb(r) for r in message.children],
        missing=list(message.missing),
        truncated=message.truncated,
    )


def lineage_to_pb(lineage: Lineage, *, with_manifests: bool = True) -> pb.LineageReply:
    """The reply, ancestors (nearest first) and children cut to PAGE_BYTES (`truncated` says so)."""

    def to_pb(record: ModelRecord) -> pb.ModelRecord:
        return record_to_pb(record, with_manifest=with_manifests)

    ancestors, more_ancestors = page(lineage.ancestors, to_pb, offset=0, limit=len(lineage.ancestors))
    children, more_children = page(lineage.children, to_pb, offset=0, limit=len(lineage.children))
    return pb.LineageReply(
        model=to_pb(lineage.model),
        ancestors=ancestors,
        children=children,
        missing=lineage.missing,
        truncated=lineage.truncated or bool(more_ancestors or more_children),
    )


# ---------------------------------------------------------------- agents


def agent_entry_from_pb(message: pb.AgentRecord, reporter: str = "") -> AgentEntry:
    telemetry = telemetry_to_dict(message.telemetry) if message.HasField("telemetry") else {}
    return AgentEntry(
        agent_id=message.agent_id,
        home=message.home_aggregator or reporter,
        last_seen=message.last_seen,
        telemetry=telemetry,
        capability=capability_name(message.capability),
        display_name=message.display_name,
        reported_by=reporter,
    )


def agent_entry_to_pb(entry: AgentEntry) -> pb.AgentRecord:
    return pb.AgentRecord(
        agent_id=entry.agent_id,
        home_aggregator=entry.home,
        last_seen=entry.last_seen,
        telemetry=telemetry_from_dict(entry.telemetry),
        capability=capability_value(entry.capability),
        display_name=entry.display_name,
    )


# ---------------------------------------------------------------- the hub


def federation_to_pb(federation: Federation) -> pb.FederationRecord:
    return pb.FederationRecord(
        name=federation.name,
        description=federation.description,
        task=federation.task,
        base_cid=federation.base,
        spec=[pb.TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in federation.spec],
        owners=list(federation.owners),
        round_policy=federation.round_policy,
        strategy=federation.strategy,
        forked_from=federation.forked_from,
        source_federation=federation.source_federation,
        heads=federation.heads,
        created_at=federation.created_at,
        created_by=federation.created_by,
        fork_layers=federation.fork_layers,
    )


def federation_from_pb(message: pb.FederationRecord) -> Federation:
    return Federation(
        name=message.name,
        description=message.description,
        task=message.task,
        base=message.base_cid,
        spec=tuple(TensorSpec(name=s.name, dtype=s.dtype, shape=tuple(s.shape)) for s in message.spec),
        owners=tuple(message.owners),
        round_policy=dict(message.round_policy),
        strategy=message.strategy,
        forked_from=message.forked_from,
        source_federation=message.source_federation,
        fork_layers=message.fork_layers,
        heads=dict(message.heads),
        created_by=message.created_by,
        created_at=message.created_at,
    )


def release_to_pb(release: Release) -> pb.ReleaseRecord:
    return pb.ReleaseRecord(
        federation=release.federation,
        version=release.version,
        model_cid=release.model,
        notes=release.notes,
        evaluation=release.evaluation,
        accuracy=release.accuracy or 0.0,
        has_accuracy=release.accuracy is not None,
        lineage_root=release.lineage_root,
        released_by=release.released_by,
        created_at=release.created_at,
        tag=release.tag,
    )


def release_from_pb(message: pb.ReleaseRecord) -> Release:
    return Release(
        federation=message.federation,
        version=message.version,
        model=message.model_cid,
        notes=message.notes,
        evaluation=message.evaluation,
        accuracy=message.accuracy if message.has_accuracy else None,
        lineage_root=message.lineage_root,
        released_by=message.released_by,
        created_at=message.created_at,
        tag=message.tag,
    )


def proposal_to_pb(proposal: Proposal) -> pb.ProposalRecord:
    return pb.ProposalRecord(
        proposal_cid=proposal.cid,
        from_federation=proposal.from_federation,
        to_federation=proposal.to_federation,
        model_cid=proposal.model,
        target_head=proposal.target_head,
        state=proposal.state,
        proposed_by=proposal.proposed_by,
        created_at=proposal.created_at,
        decided_by=proposal.decided_by,
        decided_at=proposal.decided_at,
        merge_cid=proposal.merge,
    )


def proposal_from_pb(message: pb.ProposalRecord) -> Proposal:
    return Proposal(
        cid=message.proposal_cid,
        from_federation=message.from_federation,
        to_federation=message.to_federation,
        model=message.model_cid,
        target_head=message.target_head,
        state=message.state,
        proposed_by=message.proposed_by,
        created_at=message.created_at,
        decided_by=message.decided_by,
        decided_at=message.decided_at,
        merge=message.merge_cid,
    )
