"""PeerService: what an aggregator tells its peers, and how it asks them.

Served: `GetLatest` (this aggregator's latest cluster pointer), `Announce` (a
peer pushing its pointer; kept as a hint), and `FetchBlob` (published objects
only: cluster and semi-global manifests and their weights; device updates stay
private). Asked: `GrpcPeerAccess` implements `synthesis.PeerAccess` over gRPC
with deadlines, verifying every fetched byte against its CID.

What FetchBlob serves is decided by CID, never by what the caller claims: an
object is served only if a published model is, or names as its weights, that
CID (`Published` refuses to publish a device update). An auditor
(`trust.roles.DEVICE_UPDATE_READERS`) may also fetch the manifest or the weights
of a device update this aggregator accepted, and each such fetch is logged
(`trust.reads`). A round closed on a single update publishes a cluster model
whose weights may be that update's exact bytes; they are then served as the
cluster model's, which every agent downloads anyway.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from aggregator.synthesis import ClusterPointer, PeerAccess
from coordinator.ring import Member
from intake.journal import IntakeJournal
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import IntegrityError, InvalidInput, NotFound
from proto.wire import CHUNK_SIZE, create_channel, error_from_rpc, iter_chunks, read_header_stream
from storage.cid import cid_of, validate_cid
from storage.manifest import Manifest
from storage.store import ContentStore
from trust.identity import Certified
from trust.interceptor import caller_certificate
from trust.reads import is_device_update, log_device_update_read, may_read_device_updates

# "manifest" or "weights" when a CID is part of a device update this aggregator accepted; None otherwise
DeviceUpdateLookup = Callable[[str], str | None]

_MAX_BLOB_BYTES = 4 << 30


def device_update_lookup(journal: IntakeJournal) -> DeviceUpdateLookup:
    """Which part of an accepted device update a CID is, from the intake journal."""

    def lookup(cid: str) -> str | None:
        update = journal.update_holding(cid)
        if update is None:
            return None
        return "manifest" if update.update_cid == cid else "weights"

    return lookup


def pointer_to_pb(pointer: ClusterPointer) -> pb.ClusterPointer:
    return pb.ClusterPointer(
        model_cid=pointer.model_cid,
        round=pointer.round,
        num_samples=pointer.num_samples,
        producer=pointer.producer,
        created_at=pointer.created_at,
        federation=pointer.federation,
        weights_cid=pointer.weights_cid,
    )


def pointer_from_pb(message: pb.ClusterPointer) -> ClusterPointer:
    return ClusterPointer(
        model_cid=message.model_cid,
        round=message.round,
        num_samples=message.num_samples,
        producer=message.producer,
        created_at=message.created_at,
        federation=message.federation,
        weights_cid=message.weights_cid,
    )


def pointer_for(manifest: Manifest, created_at: float) -> ClusterPointer:
    return ClusterPointer(
        model_cid=manifest.cid,
        round=manifest.round,
        num_samples=manifest.num_samples,
        producer=manifest.producer.id,
        created_at=created_at,
        federation=manifest.federation,
        weights_cid=manifest.weights,
    )


class Published:
    """The set of objects peers may fetch: published manifests and their weights."""

    def __init__(self) -> None:
        self._cids: set[str] = set()
        self._latest: ClusterPointer | None = None
        self._lock = threading.Lock()

    def add(self, manifest: Manifest) -> None:
        if is_device_update(manifest.kind):
            raise InvalidInput(f"{manifest.cid} is a device update ({manifest.kind}): never published", reason="device_update")
        with self._lock:
            self._cids.update((manifest.cid, manifest.weights))

    def set_latest(self, pointer: ClusterPointer) -> None:
        with self._lock:
            self._latest = pointer

    @property
    def latest(self) -> ClusterPointer | None:
        with self._lock:
            return self._latest

    def __contains__(self, cid: object) -> bool:
        with self._lock:
            return cid in self._cids


class PeerServicer(pb_grpc.PeerServiceServicer):
    """PeerService on the serving loop; store reads are offloaded."""

    def __init__(
        self,
        *,
        aggregator_id: str,
        federation: str,
        published: Published,
        store: ContentStore,
        offload: Callable[..., Awaitable[Any]],
        private_store: ContentStore | None = None,
        device_update: DeviceUpdateLookup | None = None,
    ) -> None:
        """`store` serves published objects; `private_store` and `device_update` (both or neither) let
        auditors fetch the device updates this aggregator accepted."""
        self._id = aggregator_id
        self._federation = federation
        self._published = published
        self._store = store
        self._offload = offload
        self._private = private_store
        self._device_update = device_update

    async def GetLatest(self, request: pb.LatestRequest, context: grpc.aio.ServicerContext) -> pb.LatestReply:
        reply = pb.LatestReply(aggregator_id=self._id)
        latest = self._published.latest
        if latest is not None and (not request.federation or request.federation == self._federation):
            reply.latest.CopyFrom(pointer_to_pb(latest))
        return reply

    async def Announce(self, request: pb.ClusterPointer, context: grpc.aio.ServicerContext) -> pb.Ack:
        """A peer's pointer, accepted as a hint only: synthesis asks peers for their latest itself."""
        validate_cid(request.model_cid)
        return pb.Ack(ok=True)

    async def FetchBlob(
        self, request: pb.FetchBlobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BlobChunk]:
        caller = caller_certificate()  # on the loop: it does not follow `offload`
        cid = validate_cid(request.cid)
        if cid in self._published:
            data = await self._offload(self._store.get, cid)
        else:
            data = await self._device_update_for_audit(cid, caller)
        yield pb.BlobChunk(header=pb.BlobHeader(cid=cid, size=len(data)))
        for offset, piece in iter_chunks(data, CHUNK_SIZE):
            yield pb.BlobChunk(chunk=pb.Chunk(offset=offset, data=piece.tobytes()))


    async def _device_update_for_audit(self, cid: str, caller: Certified | None) -> bytes:
        not_published = NotFound(f"{cid} is not a published object of aggregator {self._id}", reason="not_found")
        if self._device_update is None or self._private is None or not may_read_device_updates(caller):
            raise not_published
        what = await self._offload(self._device_update, cid)
        if what is None:
            raise not_published
        data = await self._offload(self._private.get, cid)
        log_device_update_read(caller, cid, what, via="PeerService.FetchBlob")
        return data


class GrpcPeerAccess(PeerAccess):
    """Reach peers over PeerService, one cached channel per address."""

    def __init__(self, channel_factory: Callable[[str], grpc.Channel] = create_channel, *, federation: str = "") -> None:
        """`federation`: whose latest pointer to ask for (a peer may serve several); empty: the peer's default."""
        self._channel_factory = channel_factory
        self._federation = federation
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> pb_grpc.PeerServiceStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._channel_factory(address)
        return pb_grpc.PeerServiceStub(channel)

    def latest(self, member: Member, timeout_s: float) -> ClusterPointer | None:
        try:
            reply = self._stub(member.address).GetLatest(pb.LatestRequest(federation=self._federation), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return pointer_from_pb(reply.latest) if reply.HasField("latest") else None

    def announce(self, member: Member, pointer: ClusterPointer, timeout_s: float) -> None:
        try:
            self._stub(member.address).Announce(pointer_to_pb(pointer), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc

    def fetch_blob(self, member: Member, cid: str, timeout_s: float) -> bytes:
        def verify(header: pb.BlobHeader, data: bytes) -> None:
            actual = cid_of(data)
            if actual != cid or header.cid != cid:
                raise IntegrityError(f"peer {member.id} sent bytes hashing to {actual} for {cid}", reason="hash_mismatch")

        try:
            stream = self._stub(member.address).FetchBlob(pb.FetchBlobRequest(cid=cid), timeout=timeout_s)
            _, data = read_header_stream(stream, size_of=lambda h: h.size, max_size=_MAX_BLOB_BYTES, verify=verify)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return data

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
