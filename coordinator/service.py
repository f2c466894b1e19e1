"""CoordinatorService over gRPC: a thin adapter from protobuf to `Membership` and `ModelIndex`.

Each handler turns the request into domain values (`coordinator.messages`),
calls one core method and turns the result back. Typed errors raised by the
core leave through `proto.wire.ErrorInterceptor`, which maps them to gRPC status.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from coordinator.index import DEFAULT_LINEAGE_DEPTH, ModelIndex
from coordinator.membership import Membership
from coordinator.messages import (
    FleetStatus,
    agent_entry_from_pb,
    agent_entry_to_pb,
    fleet_status_to_pb,
    heartbeat_from_pb,
    info_from_pb,
    lease_to_pb,
    lineage_to_pb,
    record_to_pb,
    ring_to_pb,
)
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc

__all__ = ["SERVICE_NAME", "CoordinatorServicer"]

SERVICE_NAME = "strata.v1.CoordinatorService"
# A WatchRing stream wakes at least this often to notice cancellation and shutdown.
WATCH_WAKE_S = 1.0


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
        aggregator_id, progress, info = heartbeat_from_pb(request)
        return lease_to_pb(self._membership.heartbeat(aggregator_id, progress, info=info))

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
        return lineage_to_pb(self._index.lineage(request.model_cid, request.depth or DEFAULT_LINEAGE_DEPTH))

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
        return fleet_status_to_pb(FleetStatus(ring=self._membership.ring(), aggregators=self._membership.status()))
