"""A typed client of the CoordinatorService: domain values in, domain values out, typed errors.

    with CoordinatorClient("127.0.0.1:7000", timeout_s=5.0) as coordinator:
        ring = coordinator.ring()
        print(ring.owner("agent-42").id)

Every call carries a deadline (`timeout_s`; a WatchRing stream its own). A failed
call raises the `StrataError` it stands for, translated once here by
`proto.wire.error_from_rpc`: NotFound, InvalidInput, Unavailable (also for an
expired deadline, with reason "deadline_exceeded"), or a plain StrataError whose
`status` names any other gRPC code. `proto.wire.is_retryable` says which are
worth another attempt. The channel comes from an injectable factory, so tests
can point the client anywhere; the client owns it and closes it in `close()`.

The domain types an aggregator hands the client (AggregatorInfo, Progress,
AgentEntry) or keeps from it (Lease, IndexResult) are re-exported here: the aggregator may import only the client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import grpc

from coordinator.hub import Federation, Proposal, Release
from coordinator.index import AgentEntry, IndexResult, Lineage, ModelRecord
from coordinator.membership import AggregatorInfo, FederationProgress, Lease, Progress
from coordinator.messages import (
    FleetStatus,
    agent_entry_from_pb,
    agent_entry_to_pb,
    all_pages,
    announcements_to_pb,
    federation_from_pb,
    fleet_status_from_pb,
    heartbeat_to_pb,
    index_results_from_pb,
    info_to_pb,
    lease_from_pb,
    lineage_from_pb,
    proposal_from_pb,
    record_from_pb,
    release_from_pb,
    ring_from_pb,
)
from coordinator.ring import Ring
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import FailedPrecondition, StrataError
from proto.wire import STREAM_TIMEOUT_S, create_channel, error_from_rpc
from trust.messages import revocations_from_reply
from trust.revocation import RevocationList

__all__ = [
    "AgentEntry",
    "AggregatorInfo",
    "CoordinatorClient",
    "FederationProgress",
    "IndexResult",
    "Lease",
    "Progress",
    "RingWatch",
]

# the deadline of every unary call unless the caller names another
CALL_TIMEOUT_S = 5.0

T = TypeVar("T")


def _translated(call: Callable[[], T]) -> T:
    try:
        return call()
    except grpc.RpcError as e:
        raise error_from_rpc(e) from e


class RingWatch:
    """An open WatchRing stream: iterate for each new ring; `cancel()` ends it from any thread."""

    def __init__(self, call: Iterator[pb.Ring]) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Ring]:
        try:
            for message in self._call:
                yield ring_from_pb(message)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[attr-defined]


class CoordinatorClient:
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = CALL_TIMEOUT_S,
        channel_factory: Callable[[str], grpc.Channel] = create_channel,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel_factory(address)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Close the channel, cancelling calls in flight. Idempotent; a closed client refuses calls."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: object) -> T:
        if self._closed:
            raise FailedPrecondition(f"the client of coordinator {self.address} is closed", reason="closed")
        return _translated(lambda: method(request, timeout=self.timeout_s))

    # ------------------------------------------------------------ membership

    def register(self, info: AggregatorInfo) -> Lease:
        return lease_from_pb(self._call(self._stub.RegisterAggregator, info_to_pb(info)))

    def heartbeat(
        self, aggregator_id: str, progress: Progress | None = None, *, info: AggregatorInfo | None = None
    ) -> Lease:
        """Renew the lease; with `info`, a coordinator that forgot us registers us again.
        NotFound(reason="unknown_aggregator") without `info` means: register again."""
        request = heartbeat_to_pb(aggregator_id, progress or Progress(), info)
        return lease_from_pb(self._call(self._stub.HeartbeatAggregator, request))

    def ring(self, federation: str = "") -> Ring:
        """The current ring; with `federation`, only the members serving it."""
        return ring_from_pb(self._call(self._stub.GetRing, pb.GetRingRequest(federation=federation)))

    def watch_ring(self, *, federation: str = "", known_version: int = 0, timeout_s: float = STREAM_TIMEOUT_S) -> RingWatch:
        """A stream of rings, each newer than the last; with `known_version` 0 the first is the
        current ring. It ends with Unavailable(reason="deadline_exceeded") after `timeout_s`."""
        if self._closed:
            raise FailedPrecondition(f"the client of coordinator {self.address} is closed", reason="closed")
        request = pb.WatchRingRequest(known_version=known_version, federation=federation)
        return RingWatch(_translated(lambda: self._stub.WatchRing(request, timeout=timeout_s)))

    def revocations(self, known_version: int = 0) -> RevocationList | None:
        """The fleet's revocation list if it is newer than `known_version`, else None. Parsed, not verified:
        whoever installs it verifies the CA's signature (`trust.security.Security.set_revocations`)."""
        reply = self._call(self._stub.GetRevocations, pb.GetRevocationsRequest(known_version=known_version))
        return revocations_from_reply(reply)

    def fleet_status(self) -> FleetStatus:
        return fleet_status_from_pb(self._call(self._stub.FleetStatus, pb.FleetStatusRequest()))

    # ------------------------------------------------------------ models and agents

    def announce(self, manifest: bytes, notes: Mapping[str, str] | None = None) -> str:
        """Index a model manifest; returns its CID. InvalidInput or IntegrityError: refused for good."""
        request = pb.AnnounceModelRequest(manifest=manifest, notes=dict(notes or {}))
        return self._call(self._stub.AnnounceModel, request).model_cid

    def announce_many(self, items: Iterable[tuple[bytes, Mapping[str, str] | None]]) -> list[IndexResult]:
        """Index many manifests in one call (at most `coordinator.index.MAX_BATCH`): one result per
        item, in order, each the model's CID or why the coordinator refused it for good.

        A failure of the call as a whole (e.g. Unavailable) refused nothing: resending is safe.
        """
        items = list(items)
        reply = self._call(self._stub.AnnounceModels, announcements_to_pb(items))
        results = index_results_from_pb(reply)
        if len(results) != len(items):
            raise StrataError(
                f"coordinator {self.address} answered {len(results)} results for {len(items)} announcements",
                reason="bad_reply",
            )
        return results

    def list_models(
        self,
        *,
        kind: str = "",
        aggregator: str = "",
        federation: str = "",
        round: int = 0,
        latest_per_aggregator: bool = False,
        limit: int = 0,
    ) -> list[ModelRecord]:
        """Indexed models matching every non-empty filter, newest first (round 0 and limit 0: any)."""
        request = pb.ListModelsRequest(
            kind=kind,
            aggregator=aggregator,
            federation=federation,
            round=round,
            latest_per_aggregator=latest_per_aggregator,
            limit=limit,
        )
        return [record_from_pb(r) for r in self._call(self._stub.ListModels, request).models]

    def lineage(
        self, model_cid: str, depth: int = 0, *, with_manifests: bool = True, follow_base: bool = False
    ) -> Lineage:
        """A model's indexed ancestry; depth 0: the coordinator's default depth. Without manifests,
        records carry their fields only (a large cluster's lineage then fits one reply). `follow_base`
        walks each model's base too: earlier rounds, and across a fork the source federation's."""
        request = pb.LineageRequest(
            model_cid=model_cid, depth=depth, omit_manifests=not with_manifests, follow_base=follow_base
        )
        return lineage_from_pb(self._call(self._stub.GetLineage, request))

    def report_agents(self, aggregator_id: str, agents: Iterable[AgentEntry]) -> None:
        """Replace what the coordinator lists for `aggregator_id`'s agents with `agents`."""
        request = pb.ReportAgentsRequest(aggregator_id=aggregator_id, agents=[agent_entry_to_pb(a) for a in agents])
        self._call(self._stub.ReportAgents, request)

    def list_agents(self, aggregator: str = "") -> list[AgentEntry]:
        """The agents aggregators last reported, with their telemetry (empty `aggregator`: every one)."""
        reply = self._call(self._stub.ListAgents, pb.ListAgentsRequest(aggregator=aggregator))
        return [agent_entry_from_pb(a) for a in reply.agents]

    # ------------------------------------------------------------ the hub

    def create_federation(
        self,
        name: str,
        base_manifest: bytes,
        *,
        description: str = "",
        task: str = "",
        owners: Iterable[str] = (),
        round_policy: Mapping[str, str] | None = None,
        strategy: str = "",
    ) -> Federation:
        """Register a federation with its signed base manifest (kind base or fork), which the coordinator indexes."""
        request = pb.CreateFederationRequest(
            name=name,
            description=description,
            base_manifest=base_manifest,
            task=task,
            owners=list(owners),
            round_policy=dict(round_policy or {}),
            strategy=strategy,
        )
        return federation_from_pb(self._call(self._stub.CreateFederation, request))

    def federations(self, limit: int = 0) -> list[Federation]:
        """Every federation by name (at most `limit`; 0: all), a page per call."""

        def fetch(offset: int) -> tuple[list[Federation], int]:
            reply = self._call(self._stub.ListFederations, pb.ListFederationsRequest(limit=limit, offset=offset))
            return [federation_from_pb(f) for f in reply.federations], reply.next_offset

        return all_pages(fetch, limit)

    def federation(self, name: str) -> Federation:
        """One federation with its current heads; NotFound(reason="unknown_federation")."""
        return federation_from_pb(self._call(self._stub.GetFederation, pb.GetFederationRequest(name=name)))

    def release(self, tag: bytes) -> Release:
        """Record a signed release tag (`coordinator.hub.ReleaseTag`); Conflict(reason="release_exists") if taken."""
        return release_from_pb(self._call(self._stub.CreateRelease, pb.CreateReleaseRequest(tag=tag)))

    def releases(self, federation: str, limit: int = 0) -> list[Release]:
        """A federation's releases, highest version first (at most `limit`; 0: all), a page per call."""

        def fetch(offset: int) -> tuple[list[Release], int]:
            request = pb.ListReleasesRequest(federation=federation, offset=offset, limit=limit)
            reply = self._call(self._stub.ListReleases, request)
            return [release_from_pb(r) for r in reply.releases], reply.next_offset

        return all_pages(fetch, limit)

    def resolve(self, ref: str) -> tuple[str, Release | None]:
        """NAME@1.2.0, NAME@latest, NAME@^1.0 or a CID -> (model CID, its release or None)."""
        reply = self._call(self._stub.ResolveModel, pb.ResolveModelRequest(ref=ref))
        return reply.model_cid, release_from_pb(reply.release) if reply.HasField("release") else None

    def propose(self, manifest: bytes) -> Proposal:
        return proposal_from_pb(self._call(self._stub.CreateProposal, pb.CreateProposalRequest(manifest=manifest)))

    def proposals(self, federation: str = "", state: str = "", limit: int = 0) -> list[Proposal]:
        """Proposals to `federation` (empty: any) in `state` (empty: any), oldest first; at most `limit` (0: all)."""

        def fetch(offset: int) -> tuple[list[Proposal], int]:
            request = pb.ListProposalsRequest(federation=federation, state=state, offset=offset, limit=limit)
            reply = self._call(self._stub.ListProposals, request)
            return [proposal_from_pb(p) for p in reply.proposals], reply.next_offset

        return all_pages(fetch, limit)

    def decide(self, proposal_cid: str, *, accept: bool, merge_manifest: bytes = b"") -> Proposal:
        request = pb.DecideProposalRequest(proposal_cid=proposal_cid, accept=accept, merge_manifest=merge_manifest)
        return proposal_from_pb(self._call(self._stub.DecideProposal, request))
