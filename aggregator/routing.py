"""AgentService and PeerService for an aggregator serving several federations: route, then delegate.

Each federation has its own `AgentServicer` and `PeerServicer` (`aggregator.federation`);
these routers pick one by the federation the request names (SubmitUpdate: its header,
the stream's first message) and pass the call on unchanged. A request naming no
federation goes to the default one (the top-level `federation` key), so a client that
never fills the field keeps working; one naming a federation this process does not
serve is refused `unknown_federation`. No request reaches another federation's
rounds, registry or models.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Container, Mapping
from typing import Protocol

import grpc

from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import InvalidInput, NotFound, Refusal, StrataError


class _Federation(Protocol):
    """What the routers need of a `FederationCore`."""

    federation: str
    agent_service: pb_grpc.AgentServiceServicer | None
    peer_service: pb_grpc.PeerServiceServicer | None

    @property
    def published(self) -> Container[str]: ...


class FederationTable:
    """The served federations by name, and the one a request naming none goes to."""

    def __init__(self, cores: Mapping[str, _Federation], *, default: str, aggregator_id: str) -> None:
        self._cores = dict(cores)
        self._default = default if default in self._cores else ""
        self._id = aggregator_id

    @property
    def has_default(self) -> bool:
        return bool(self._default)

    def get(self, federation: str) -> _Federation:
        """The core serving `federation` (empty: the default); InvalidInput `unknown_federation` otherwise."""
        name = federation or self._default
        core = self._cores.get(name)
        if core is None:
            wanted = repr(federation) if federation else "no federation (and there is no default)"
            raise InvalidInput(
                f"{self._id} serves {sorted(self._cores)}, not {wanted}", reason=Refusal.UNKNOWN_FEDERATION
            )
        return core

    def ordered(self) -> list[_Federation]:
        """Every core, the default first."""
        return sorted(self._cores.values(), key=lambda core: core.federation != self._default)


class AgentServiceRouter(pb_grpc.AgentServiceServicer):
    def __init__(self, table: FederationTable, *, stream_idle_s: float) -> None:
        """`stream_idle_s`: how long a SubmitUpdate stream may wait before its first message, as after it."""
        self._table = table
        self._stream_idle_s = stream_idle_s

    def _service(self, federation: str) -> pb_grpc.AgentServiceServicer:
        service = self._table.get(federation).agent_service
        assert service is not None, "federation not started"
        return service

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        return await self._service(request.federation).Join(request, context)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelChunk]:
        async for message in self._service(request.federation).GetModel(request, context):
            yield message

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitUpdateReply:
        # the federation is in the header, the stream's first message: read it, then hand the whole
        # stream on; a stream that starts otherwise goes to the default federation, which refuses it
        first: pb.UpdateChunk | None = None
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator), None), self._stream_idle_s)
        except TimeoutError:
            # a stream that never starts holds no slot for longer than one that stalls midway
            return pb.SubmitUpdateReply(
                accepted=False, reason=Refusal.BAD_STREAM, message=f"no message within {self._stream_idle_s:g} s"
            )
        except StrataError as error:
            # garbage bytes are refused as an answer, as the federation's own servicer refuses them
            if error.status != "INVALID_ARGUMENT":
                raise
            return pb.SubmitUpdateReply(accepted=False, reason=error.reason, message=error.message)
        federation = first.header.federation if first is not None and first.WhichOneof("part") == "header" else ""
        try:
            service = self._service(federation)
        except InvalidInput as refused:
            return pb.SubmitUpdateReply(accepted=False, reason=refused.reason, message=refused.message)

        async def replayed() -> AsyncIterator[pb.UpdateChunk]:
            if first is not None:
                yield first
            async for message in request_iterator:
                yield message

        return await service.SubmitUpdate(replayed(), context)

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelEvent]:
        async for message in self._service(request.federation).WatchModels(request, context):
            yield message

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        return await self._service(request.federation).Heartbeat(request, context)

    async def GetRevocations(
        self, request: pb.GetRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevocationsReply:
        # one list for the whole process, whichever federation answers
        return await self._service("" if self._table.has_default else self._table.ordered()[0].federation).GetRevocations(
            request, context
        )


class PeerServiceRouter(pb_grpc.PeerServiceServicer):
    def __init__(self, table: FederationTable) -> None:
        self._table = table

    def _service(self, core: _Federation) -> pb_grpc.PeerServiceServicer:
        assert core.peer_service is not None, "federation not started"
        return core.peer_service

    async def GetLatest(self, request: pb.LatestRequest, context: grpc.aio.ServicerContext) -> pb.LatestReply:
        return await self._service(self._table.get(request.federation)).GetLatest(request, context)

    async def Announce(self, request: pb.ClusterPointer, context: grpc.aio.ServicerContext) -> pb.Ack:
        return await self._service(self._table.get(request.federation)).Announce(request, context)

    async def FetchBlob(self, request: pb.FetchBlobRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.BlobChunk]:
        # by CID: the federation that published it serves it; an unpublished CID is asked of each in
        # turn (an auditor's read of a device update one of them accepted), the default first
        cores = self._table.ordered()
        owner = next((core for core in cores if request.cid in core.published), None)
        missing: NotFound | None = None
        for core in [owner] if owner is not None else cores:
            started = False
            try:
                async for message in self._service(core).FetchBlob(request, context):
                    started = True
                    yield message
                return
            except NotFound as exc:
                if started:
                    raise
                missing = exc
        assert missing is not None
        raise missing
