"""CoordinatorService over gRPC: a thin adapter from protobuf to `Membership`, `ModelIndex` and `trust.enroll`.

Each handler turns the request into domain values (`coordinator.messages`,
`trust.messages`), calls one core method and turns the result back. Handlers run
on the serving loop (`proto.serving`); the core's SQLite and signing work is
offloaded to the server's pool. Typed errors raised by the core leave through
`proto.serving.ErrorInterceptor`, which maps them to gRPC status.

Enroll is not served here but by `EnrollmentServicer`, alone on the coordinator's
TLS-only enrollment port: token holders have no certificate to reach this port with.
Renew is served here: the certificate being renewed authenticates it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc

from coordinator.hub import Hub
from coordinator.index import DEFAULT_LINEAGE_DEPTH, ModelIndex
from coordinator.membership import Lease, Membership
from coordinator.messages import (
    FleetStatus,
    agent_entry_from_pb,
    agent_entry_to_pb,
    announcements_from_pb,
    federation_to_pb,
    fleet_status_to_pb,
    heartbeat_from_pb,
    index_results_to_pb,
    info_from_pb,
    lease_to_pb,
    lineage_to_pb,
    page,
    proposal_to_pb,
    record_to_pb,
    release_to_pb,
    ring_to_pb,
)
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import FailedPrecondition
from proto.serving import Signal
from trust.enroll import Enrollment
from trust.errors import Unauthenticated
from trust.interceptor import caller_certificate, current_signers
from trust.messages import (
    Certificate,
    certificate_to_pb,
    enroll_request_from_pb,
    renew_request_from_pb,
    revocations_reply,
    version_of,
)
from trust.revocation import RevocationList

__all__ = ["ANNOUNCE_CONCURRENCY", "SERVICE_NAME", "CoordinatorServicer", "EnrollmentServicer"]

SERVICE_NAME = "strata.v1.CoordinatorService"
# AnnounceModels batches validated at once. Validation is CPU-bound under the GIL, so more would
# not index faster; fewer leave the offload pool free for heartbeats and queries meanwhile.
ANNOUNCE_CONCURRENCY = 2
# A WatchRing stream re-reads the ring at least this often, even with no change signalled.
WATCH_WAKE_S = 30.0


def _no_revocations() -> RevocationList | None:
    return None


def _disabled(enrollment: Enrollment | None) -> Enrollment:
    if enrollment is None:
        raise FailedPrecondition(
            "this coordinator issues no certificates (its ca_dir is not set)", reason="enrollment_disabled"
        )
    return enrollment


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """`stopping`, once set and `changed()` called, ends every open WatchRing stream.

    `revocations()` is the fleet's current revocation list (its version goes out with every
    lease); `enrollment` renews certificates (None: this coordinator has no CA);
    `renew_address` is where holders renew, as certificate replies name it.
    """

    def __init__(
        self,
        membership: Membership,
        index: ModelIndex,
        *,
        offload: Callable[..., Awaitable[Any]],
        stopping: threading.Event | None = None,
        revocations: Callable[[], RevocationList | None] = _no_revocations,
        enrollment: Enrollment | None = None,
        renew_address: str = "",
        hub: Hub | None = None,
    ) -> None:
        self._membership = membership
        self._index = index
        # a coordinator built without one (tests of membership alone) still answers hub calls, from memory
        self._hub = hub if hub is not None else Hub(None, index)
        self._offload = offload
        self._stopping = stopping or threading.Event()
        self._revocations = revocations
        self._enrollment = enrollment
        self.renew_address = renew_address
        self._ring_changed = Signal()
        self._announcing = asyncio.Semaphore(ANNOUNCE_CONCURRENCY)
        membership.on_change(self._ring_changed.notify)

    def _stamped(self, lease: Lease) -> pb.Lease:
        return lease_to_pb(replace(lease, revocations_version=version_of(self._revocations())))

    def changed(self) -> None:
        """Wake every WatchRing stream (e.g. to notice shutdown)."""
        self._ring_changed.notify()

    # ------------------------------------------------------------ membership

    async def RegisterAggregator(self, request: pb.AggregatorInfo, context: grpc.aio.ServicerContext) -> pb.Lease:
        return self._stamped(await self._offload(self._membership.register, info_from_pb(request)))

    async def HeartbeatAggregator(
        self, request: pb.AggregatorHeartbeat, context: grpc.aio.ServicerContext
    ) -> pb.Lease:
        aggregator_id, progress, info = heartbeat_from_pb(request)
        return self._stamped(await self._offload(self._membership.heartbeat, aggregator_id, progress, info=info))

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

    async def AnnounceModels(
        self, request: pb.AnnounceModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnnounceModelsReply:
        announcer, signers = caller_certificate(), current_signers()
        async with self._announcing:
            results = await self._offload(
                self._index.record_many, announcements_from_pb(request), announcer=announcer, signers=signers
            )
        return index_results_to_pb(results)

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
        lineage = await self._offload(
            self._index.lineage,
            request.model_cid,
            request.depth or DEFAULT_LINEAGE_DEPTH,
            follow_base=request.follow_base,
        )
        return lineage_to_pb(lineage, with_manifests=not request.omit_manifests)

    # ------------------------------------------------------------ the hub

    async def CreateFederation(
        self, request: pb.CreateFederationRequest, context: grpc.aio.ServicerContext
    ) -> pb.FederationRecord:
        caller, signers = caller_certificate(), current_signers()
        federation = await self._offload(
            functools.partial(
                self._hub.create_federation,
                name=request.name,
                base_manifest=request.base_manifest,
                description=request.description,
                task=request.task,
                owners=list(request.owners),
                round_policy=dict(request.round_policy),
                strategy=request.strategy,
                caller=caller,
                signers=signers,
            )
        )
        return federation_to_pb(federation)

    async def ListFederations(
        self, request: pb.ListFederationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFederationsReply:
        federations = await self._offload(self._hub.federations)
        listed, next_offset = page(federations, federation_to_pb, offset=request.offset, limit=request.limit)
        return pb.ListFederationsReply(federations=listed, next_offset=next_offset)

    async def GetFederation(self, request: pb.GetFederationRequest, context: grpc.aio.ServicerContext) -> pb.FederationRecord:
        return federation_to_pb(await self._offload(self._hub.federation, request.name))

    async def CreateRelease(self, request: pb.CreateReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseRecord:
        caller = caller_certificate()
        return release_to_pb(await self._offload(functools.partial(self._hub.release, request.tag, caller=caller)))

    async def ListReleases(self, request: pb.ListReleasesRequest, context: grpc.aio.ServicerContext) -> pb.ListReleasesReply:
        releases = await self._offload(self._hub.releases, request.federation)
        listed, next_offset = page(releases, release_to_pb, offset=request.offset, limit=request.limit)
        return pb.ListReleasesReply(releases=listed, next_offset=next_offset)

    async def ResolveModel(self, request: pb.ResolveModelRequest, context: grpc.aio.ServicerContext) -> pb.ResolveModelReply:
        cid, release = await self._offload(self._hub.resolve, request.ref)
        return pb.ResolveModelReply(model_cid=cid, release=release_to_pb(release) if release is not None else None)

    async def CreateProposal(self, request: pb.CreateProposalRequest, context: grpc.aio.ServicerContext) -> pb.ProposalRecord:
        caller, signers = caller_certificate(), current_signers()
        proposal = await self._offload(functools.partial(self._hub.propose, request.manifest, caller=caller, signers=signers))
        return proposal_to_pb(proposal)

    async def ListProposals(self, request: pb.ListProposalsRequest, context: grpc.aio.ServicerContext) -> pb.ListProposalsReply:
        proposals = await self._offload(self._hub.proposals, request.federation, request.state)
        listed, next_offset = page(proposals, proposal_to_pb, offset=request.offset, limit=request.limit)
        return pb.ListProposalsReply(proposals=listed, next_offset=next_offset)

    async def DecideProposal(self, request: pb.DecideProposalRequest, context: grpc.aio.ServicerContext) -> pb.ProposalRecord:
        caller, signers = caller_certificate(), current_signers()
        proposal = await self._offload(
            functools.partial(
                self._hub.decide,
                request.proposal_cid,
                accept=request.accept,
                merge_manifest=request.merge_manifest,
                caller=caller,
                signers=signers,
            )
        )
        return proposal_to_pb(proposal)

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

    # ------------------------------------------------------------ certificates and revocation

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.CertificateReply:
        raise FailedPrecondition(
            "Enroll is served on the coordinator's enrollment port (enroll_listen), not here", reason="wrong_port"
        )

    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext) -> pb.CertificateReply:
        enrollment = _disabled(self._enrollment)
        current = caller_certificate()  # read on the loop: the pool does not see the call's context
        if current is None:
            raise Unauthenticated("Renew needs the certificate being renewed", reason="no_certificate")
        enrolled = await self._offload(enrollment.renew, current, renew_request_from_pb(request))
        return certificate_to_pb(Certificate(enrolled=enrolled, renew_address=self.renew_address))

    async def GetRevocations(
        self, request: pb.GetRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevocationsReply:
        return revocations_reply(self._revocations(), request.known_version)


class EnrollmentServicer(pb_grpc.CoordinatorServiceServicer):
    """The enrollment port's one RPC: a bootstrap token and a CSR in, a certificate out.

    Every other CoordinatorService method is UNIMPLEMENTED here (and refused before that
    by the trust interceptor: callers on this port present no certificate).
    """

    def __init__(self, enrollment: Enrollment, *, offload: Callable[..., Awaitable[Any]], renew_address: str = "") -> None:
        self._enrollment = enrollment
        self._offload = offload
        self.renew_address = renew_address

    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.CertificateReply:
        enrolled = await self._offload(self._enrollment.enroll, enroll_request_from_pb(request))
        return certificate_to_pb(Certificate(enrolled=enrolled, renew_address=self.renew_address))
