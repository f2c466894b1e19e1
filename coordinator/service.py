"""CoordinatorService over gRPC: a thin adapter from protobuf to `Membership` and `ModelIndex`.

Each handler turns the request into domain values (`coordinator.messages`),
calls one core method and turns the result back. Handlers run on the serving
loop (`proto.serving`); the core's SQLite work is offloaded to the server's pool.
Typed errors raised by the core leave through `proto.serving.ErrorInterceptor`,
which maps them to gRPC status.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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
from proto.serving import Signal
from trust.interceptor import caller_certificate, current_signers

__all__ = ["SERVICE_NAME", "CoordinatorServicer"]

SERVICE_NAME = "strata.v1.CoordinatorService"
# A WatchRing stream re-reads the ring at least this often, even with no change signalled.
WATCH_WAKE_S = 30.0


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """`stopping`, once set and `changed()` called, ends every open WatchRing stream."""

    def __init__(
        self,
        membership: Membership,
        index: ModelIndex,
        *,
        offload: Callable[..., Awaitable[Any]],
        stopping: threading.Event | None = None,
    ) -> None:
        self._membership = membership
        self._index = index
        self._offload = offload
        self._stopping = stopping or threading.Event()
        self._ring_changed = Signal()
        membership.on_change(self._ring_changed.notify)

    def changed(self) -> None:
        """Wake every WatchRing stream (e.g. to notice shutdown)."""
        self._ring_changed.notify()

    # ------------------------------------------------------------ membership

    async def RegisterAggregator(self, request: pb.AggregatorInfo, context: grpc.aio.ServicerContext) -> pb.Lease:
        return lease_to_pb(await self._offload(self._membership.register, info_from_pb(request)))

    async def HeartbeatAggregator(
        self, request: pb.AggregatorHeartbeat, context: grpc.aio.ServicerContext
    ) -> pb.Lease:
        aggregator_id, progress, info = heartbeat_from_pb(request)
        return lease_to_pb(await self._offload(self._membership.heartbeat, aggregator_id, progress, info=info))

    async def GetRing(self, request: pb.GetRingRequest, context: grpc.aio.ServicerContext) -> pb.Ring:
        return ring_to_pb(self._membership.ring(request.federation or None))

    async def WatchRing(self, request: pb.WatchRingRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Ring]:
        known = request.known_version
        while not self._stopping.is_set():
            if self._membership.ring_version > known:
                ring = self._membership.ring(request.federation or None)
                known = ring.version
                yield ring_to_pb(ring)
                continue
            await self._ring_changed.wait(WATCH_WAKE_S)

    # ------------------------------------------------------------ models

    async def AnnounceModel(
        self, request: pb.AnnounceModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnnounceModelReply:
        # with TLS only the producer may announce a model, signed with its certified key; read on the loop
        announcer, signers = caller_certificate(), current_signers()
        cid = await self._offload(
            self._index.record, request.manifest, dict(request.notes), announcer=announcer, signers=signers
        )
        return pb.AnnounceModelReply(model_cid=cid)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsReply:
        records = await self._offload(
            self._index.list,
            kind=request.kind or None,
            aggregator=request.aggregator or None,
            federation=request.federation or None,
            # proto3 has no "unset" for a number: 0 means any round here
            round=request.round or None,
            latest_per_aggregator=request.latest_per_aggregator,
            limit=request.limit or None,
        )
        return pb.ListModelsReply(models=[record_to_pb(r) for r in records])

    async def GetLineage(self, request: pb.LineageRequest, context: grpc.aio.ServicerContext) -> pb.LineageReply:
        lineage = await self._offload(self._index.lineage, request.model_cid, request.depth or DEFAULT_LINEAGE_DEPTH)
        return lineage_to_pb(lineage)

    # ------------------------------------------------------------ agents and fleet

    async def ReportAgents(self, request: pb.ReportAgentsRequest, context: grpc.aio.ServicerContext) -> pb.Ack:
        entries = [agent_entry_from_pb(a, request.aggregator_id) for a in request.agents]
        written = await self._offload(self._index.report_agents, request.aggregator_id, entries)
        return pb.Ack(ok=True, message=f"{written} agents recorded")

    async def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext) -> pb.ListAgentsReply:
        entries = await self._offload(self._index.list_agents, request.aggregator or None)
        return pb.ListAgentsReply(agents=[agent_entry_to_pb(e) for e in entries])

    async def FleetStatus(self, request: pb.FleetStatusRequest, context: grpc.aio.ServicerContext) -> pb.FleetStatusReply:
        return fleet_status_to_pb(FleetStatus(ring=self._membership.ring(), aggregators=self._membership.status()))
