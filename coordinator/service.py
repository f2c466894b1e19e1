"""CoordinatorService over gRPC: a thin adapter from protobuf to `Membership` and `ModelIndex`.

Each handler turns the request into domain values, calls one core method and
turns the result back. Typed errors raised by the core leave through
`proto.wire.ErrorInterceptor`, which maps them to gRPC status.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from coordinator.index import DEFAULT_LINEAGE_DEPTH, AgentEntry, ModelIndex, ModelRecord
from coordinator.membership import AggregatorInfo, AggregatorStatus, Lease, Membership
from coordinator.ring import Ring
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import capability_name, capability_value, telemetry_from_dict, telemetry_to_dict

__all__ = [
    "SERVICE_NAME",
    "CoordinatorServicer",
    "agent_entry_from_pb",
    "agent_entry_to_pb",
    "ring_to_pb",
]

SERVICE_NAME = "strata.v1.CoordinatorService"
# A WatchRing stream wakes at least this often to notice cancellation and shutdown.
WATCH_WAKE_S = 1.0


def info_from_pb(message: pb.AggregatorInfo) -> AggregatorInfo:
    return AggregatorInfo(
        id=message.id,
        address=message.address,
        federations=tuple(message.federations),
        # proto3 cannot tell an unset weight from 0; unset means an equal share
        weight=message.weight or 1.0,
    )


def info_to_pb(info: AggregatorInfo) -> pb.AggregatorInfo:
    return pb.AggregatorInfo(
        id=info.id, address=info.address, federations=list(info.federations), weight=info.weight
    )


def lease_to_pb(lease: Lease) -> pb.Lease:
    return pb.Lease(
        ttl_s=lease.ttl_s,
        heartbeat_interval_s=lease.heartbeat_interval_s,
        ring_version=lease.ring_version,
        expires_at=lease.expires_at,
    )


def ring_to_pb(ring: Ring) -> pb.Ring:
    return pb.Ring(
        version=ring.version,
        members=[pb.RingMember(id=m.id, address=m.address, weight=m.weight) for m in ring.members],
    )


def record_to_pb(record: ModelRecord) -> pb.ModelRecord:
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
        manifest=record.manifest,
    )


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


def status_to_pb(status: AggregatorStatus) -> pb.AggregatorStatus:
    return pb.AggregatorStatus(
        info=info_to_pb(status.info),
        alive=status.alive,
        lease_expires_at=status.lease_expires_at,
        round=status.round,
        agent_count=status.agent_count,
        last_cluster_cid=status.last_cluster_cid,
        last_semi_global_cid=status.last_semi_global_cid,
    )


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """`stopping`, once set, ends every open WatchRing stream within WATCH_WAKE_S."""

    def __init__(
        self, membership: Membership, index: ModelIndex, *, stopping: threading.Event | None = None
    ) -> None:
        self._membership = membership
        self._index = index
        self._stopping = stopping or threading.Event()

    # ------------------------------------------------------------ membership

    def RegisterAggregator(
        self, request: pb.AggregatorInfo, context: grpc.ServicerContext
    ) -> pb.Lease:
        return lease_to_pb(self._membership.register(info_from_pb(request)))

    def HeartbeatAggregator(
        self, request: pb.AggregatorHeartbeat, context: grpc.ServicerContext
    ) -> pb.Lease:
        lease = self._membership.heartbeat(
            request.id,
            round=request.round,
            agent_count=request.agent_count,
            last_cluster_cid=request.last_cluster_cid,
            last_semi_global_cid=request.last_semi_global_cid,
            info=info_from_pb(request.info)
            if request.HasField("info") and request.info.id
            else None,
        )
        return lease_to_pb(lease)

    def GetRing(self, request: pb.GetRingRequest, context: grpc.ServicerContext) -> pb.Ring:
        return ring_to_pb(self._membership.ring(request.federation or None))

    def WatchRing(
        self, request: pb.WatchRingRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Ring]:
        known = request.known_version
        while context.is_active() and not self._stopping.is_set():
            ring = self._membership.wait_for_version(known, timeout=WATCH_WAKE_S)
            if ring.version > known and context.is_active():
                known = ring.version
                yield ring_to_pb(self._membership.ring(request.federation or None))

    # ------------------------------------------------------------ models

    def AnnounceModel(
        self, request: pb.AnnounceModelRequest, context: grpc.ServicerContext
    ) -> pb.AnnounceModelReply:
        return pb.AnnounceModelReply(
            model_cid=self._index.record(request.manifest, dict(request.notes))
        )

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsReply:
        records = self._index.list(
            kind=request.kind or None,
            aggregator=request.aggregator or None,
            federation=request.federation or None,
            # proto3 has no "unset" for a number: 0 means any round here
            round=request.round or None,
            latest_per_aggregator=request.latest_per_aggregator,
            limit=request.limit or None,
        )
        return pb.ListModelsReply(models=[record_to_pb(r) for r in records])

    def GetLineage(
        self, request: pb.LineageRequest, context: grpc.ServicerContext
    ) -> pb.LineageReply:
        lineage = self._index.lineage(request.model_cid, request.depth or DEFAULT_LINEAGE_DEPTH)
        return pb.LineageReply(
            model=record_to_pb(lineage.model),
            ancestors=[record_to_pb(r) for r in lineage.ancestors],
            children=[record_to_pb(r) for r in lineage.children],
            missing=lineage.missing,
        )

    # ------------------------------------------------------------ agents and fleet

    def ReportAgents(
        self, request: pb.ReportAgentsRequest, context: grpc.ServicerContext
    ) -> pb.Ack:
        entries = [agent_entry_from_pb(a, request.aggregator_id) for a in request.agents]
        written = self._index.report_agents(request.aggregator_id, entries)
        return pb.Ack(ok=True, message=f"{written} agents recorded")

    def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.ServicerContext
    ) -> pb.ListAgentsReply:
        entries = self._index.list_agents(request.aggregator or None)
        return pb.ListAgentsReply(agents=[agent_entry_to_pb(e) for e in entries])

    def FleetStatus(
        self, request: pb.FleetStatusRequest, context: grpc.ServicerContext
    ) -> pb.FleetStatusReply:
        return pb.FleetStatusReply(
            ring=ring_to_pb(self._membership.ring()),
            aggregators=[status_to_pb(s) for s in self._membership.status()],
        )
