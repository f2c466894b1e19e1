"""AgentService for any home (an aggregator or a relay): protobuf in, one call on the core, protobuf out.

A device cannot tell an aggregator from a relay: Join answers with a home (or a
redirect to the ring's owner), GetModel streams the manifest then the weights in
~1 MiB chunks (base, cluster and semi-global models only: a device update is
refused PERMISSION_DENIED ``device_update`` unless the caller is an auditor,
`trust.reads`, and each audit read is logged), SubmitUpdate refusals carry the same reason codes, WatchModels
and Heartbeat announce new bases and home changes.

Handlers are coroutines on the serving loop (`proto.serving`): an idle agent's
WatchModels stream costs memory, not a thread. What blocks or burns CPU (the
intake's hashing, validation and journaling; reading a model from the store) is
offloaded to the server's bounded pool. A model is read from the store once and
then streamed to every agent from memory.

Errors raised by the core (StrataError subclasses) leave through the shared
error interceptor in proto.serving, except SubmitUpdate's refusals, which are an
answer rather than a failure: the reply says accepted=false with the reason code.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from intake.agents import AgentRegistry
from intake.home import BaseModel, Home, Redirect
from intake.submission import Submission
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import capability_name, telemetry_to_dict
from proto.errors import InvalidInput, Refusal, StrataError, Unavailable, UpdateRefused, WireError
from proto.serving import Signal, receive_header_stream
from proto.wire import CHUNK_SIZE
from storage.cid import CidBuilder
from storage.manifest import Manifest
from storage.store import ContentStore, StagedWrite
from trust.errors import PermissionDenied
from trust.identity import Certified
from trust.interceptor import caller_certificate, current_signers
from trust.messages import revocations_reply, version_of
from trust.reads import (
    DEVICE_UPDATE,
    is_device_update,
    log_device_update_read,
    may_read_device_updates,
)
from trust.revocation import RevocationList
from trust.signers import Signers

log = logging.getLogger("strata.intake.service")

# a WatchModels stream re-checks its agent's home at least this often, even with no change signalled
WATCH_WAKE_S = 30.0
# recent models kept in memory for streaming; the current base is read from the store once
CACHED_MODELS = 4

# how a broken SubmitUpdate stream is refused, by the wire's reason
_STREAM_REFUSALS = {"oversize": Refusal.TOO_LARGE, "missing_header": Refusal.BAD_HEADER}

Offload = Callable[..., Awaitable[Any]]


def model_ref(base: BaseModel, *, invited: bool = True, check_back_s: float = 0.0) -> pb.ModelRef:
    return pb.ModelRef(
        model_cid=base.model_cid,
        round=base.round,
        federation=base.federation,
        weights_cid=base.weights_cid,
        not_invited=not invited,
        check_back_s=0.0 if invited else check_back_s,
    )


class StreamRefused(UpdateRefused):
    """A SubmitUpdate stream refused while it was read; `header` is what arrived of it, if anything."""

    def __init__(self, message: str, *, reason: Refusal, header: pb.UpdateHeader | None) -> None:
        super().__init__(message, reason=reason)
        self.header = header


async def read_update_stream(
    request_iterator: AsyncIterator[pb.UpdateChunk],
    *,
    max_bytes: int,
    idle_s: float,
    offload: Offload,
    staged: StagedWrite | None = None,
) -> tuple[pb.UpdateHeader, bytes, str, bytes]:
    """Reassemble a SubmitUpdate stream: exactly one header first, then in-order chunks.

    Returns (header, weights, CID of the weights, SCAFFOLD's delta_c bytes or b""), the CID
    hashed chunk by chunk while the rest of the stream is still arriving, and each chunk of the
    weights written to `staged` as it arrives. The header's `control_size` bytes after the
    weights are delta_c (each part is bounded by `max_bytes`). Raises StreamRefused.
    """
    builder = CidBuilder()
    arrived: list[pb.UpdateHeader] = []
    received = 0  # bytes of the stream so far: those below weights_size are the weights

    def absorb(data: bytes) -> None:
        nonlocal received
        weights_left = max(0, arrived[0].weights_size - received) if arrived else len(data)
        received += len(data)
        part = data[:weights_left] if weights_left < len(data) else data
        if not part:
            return
        builder.update(part)
        if staged is not None:
            staged.write(part)

    async def remembering_header() -> AsyncIterator[pb.UpdateChunk]:
        async for message in request_iterator:
            if not arrived and message.WhichOneof("part") == "header":
                # each part on its own: the reassembler below only bounds their sum
                for part, size in (("weights", message.header.weights_size), ("delta_c", message.header.control_size)):
                    if size > max_bytes:
                        raise StreamRefused(
                            f"{part} of {size} bytes are above the limit of {max_bytes}",
                            reason=Refusal.TOO_LARGE,
                            header=message.header,
                        )
                arrived.append(message.header)
            yield message

    try:
        header, payload = await receive_header_stream(
            remembering_header(),
            size_of=lambda h: h.weights_size + h.control_size,
            max_size=2 * max_bytes,
            idle_timeout_s=idle_s,
            offload=offload,
            on_chunk=absorb,
        )
        weights, control = payload[: header.weights_size], payload[header.weights_size :]
        return header, weights, await offload(builder.finish), control
    except WireError as exc:
        raise StreamRefused(
            str(exc), reason=_STREAM_REFUSALS.get(exc.reason, Refusal.BAD_STREAM), header=arrived[0] if arrived else None
        ) from None


def submission_from_header(
    header: pb.UpdateHeader,
    weights: bytes,
    received_cid: str = "",
    *,
    staged: StagedWrite | None = None,
    caller: Certified | None = None,
    signers: Signers | None = None,
    control: bytes = b"",
) -> Submission:
    return Submission(
        received_cid=received_cid,
        staged=staged,
        caller=caller,
        signers=signers,
        agent_id=header.agent_id,
        round=header.round,
        base_cid=header.base_cid,
        num_samples=header.num_samples,
        weights=weights,
        federation=header.federation,
        metrics=dict(header.metrics),
        base_metrics=dict(header.base_metrics),
        tensors=tuple(header.tensors),
        weights_cid=header.weights_cid,
        kind=header.kind or "local",
        parents=tuple(header.parents),
        manifest=header.manifest,
        encoding=header.encoding,
        control=control,
        control_cid=header.control_cid,
    )


def _redirect_pb(redirect: Redirect, reason: str) -> pb.Redirect:
    return pb.Redirect(
        aggregator_id=redirect.aggregator_id, address=redirect.address, ring_version=redirect.ring_version, reason=reason
    )


class ModelBytes:
    """Recent models' manifest and weight bytes, read from the store once and streamed from memory."""

    def __init__(self, load: Callable[[str], Awaitable[tuple[bytes, bytes]]], *, keep: int = CACHED_MODELS) -> None:
        self._load = load
        self._keep = keep
        self._ready: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[tuple[bytes, bytes]]] = {}

    async def get(self, model_cid: str) -> tuple[bytes, bytes]:
        ready = self._ready.get(model_cid)
        if ready is not None:
            self._ready.move_to_end(model_cid)
            return ready
        loading = self._loading.get(model_cid)
        if loading is None:
            # one load however many agents ask at once
            loading = self._loading[model_cid] = asyncio.ensure_future(self._load(model_cid))
            loading.add_done_callback(lambda done: self._loaded(model_cid, done))
        return await asyncio.shield(loading)

    def _loaded(self, model_cid: str, done: asyncio.Future[tuple[bytes, bytes]]) -> None:
        self._loading.pop(model_cid, None)
        if done.cancelled() or done.exception() is not None:
            return
        self._ready[model_cid] = done.result()
        while len(self._ready) > self._keep:
            self._ready.popitem(last=False)


def read_model(store: ContentStore, model_cid: str, *, device_updates: bool = False) -> tuple[bytes, bytes]:
    """A model's manifest bytes and weight bytes, both hash-verified by the store.

    A device update is read only with `device_updates`; otherwise its manifest is read and
    PermissionDenied("device_update") raised before its weights are touched."""
    manifest_bytes = store.get(model_cid)
    manifest = Manifest.from_bytes(manifest_bytes)
    if not device_updates and is_device_update(manifest.kind):
        raise PermissionDenied(f"{model_cid} is a device update ({manifest.kind})", reason=DEVICE_UPDATE)
    return manifest_bytes, store.get(manifest.weights)


class AgentServicer(pb_grpc.AgentServiceServicer):
    """AgentService over a `Home`. Call `changed()` (from any thread) when the base or the ring changes."""

    def __init__(
        self,
        *,
        home: Home,
        agents: AgentRegistry,
        stream_idle_s: float,
        offload: Offload,
        stopping: threading.Event,
        revocations: Callable[[], RevocationList | None] = lambda: None,
    ) -> None:
        """`revocations` gives the revocation list this home enforces: served to relays below it
        (GetRevocations), its version named in every heartbeat so they know when to fetch."""
        self._home = home
        self._revocations = revocations
        self._stream_idle_s = stream_idle_s
        self._agents = agents
        self._offload = offload
        self._stopping = stopping
        self._changes = Signal()
        self._models = ModelBytes(self._load_model)

    def changed(self) -> None:
        """Wake every WatchModels stream to look at the base and the ring again."""
        self._changes.notify()

    async def _load_model(self, model_cid: str) -> tuple[bytes, bytes]:
        """A model any agent may read (never a device update: those are not kept in memory)."""
        await self._offload(self._home.prepare_download, model_cid)
        return await self._offload(read_model, self._home.store, model_cid)

    async def _model(self, model_cid: str, caller: Certified | None) -> tuple[bytes, bytes]:
        """The model's bytes for `caller`: a device update only for an auditor, and logged."""
        try:
            return await self._models.get(model_cid)
        except PermissionDenied as refused:
            if refused.reason != DEVICE_UPDATE:
                raise
            if not may_read_device_updates(caller):
                who = str(caller.identity) if caller is not None else "a caller without a certificate"
                raise PermissionDenied(f"{refused.message}; {who} may not read device updates", reason=DEVICE_UPDATE) from None
        assert caller is not None
        manifest_bytes, weights = await self._offload(read_model, self._home.store, model_cid, device_updates=True)
        log_device_update_read(caller, model_cid, "model", via="AgentService.GetModel")
        return manifest_bytes, weights

    def _check_federation(self, federation: str) -> None:
        if federation and federation != self._home.federation:
            raise InvalidInput(
                f"{self._home.id} serves {self._home.federation!r}, not {federation!r}",
                reason=Refusal.UNKNOWN_FEDERATION,
            )

    def _ref_for(self, base: BaseModel, agent_id: str) -> pb.ModelRef:
        invited, check_back_s = self._home.invitation(agent_id)
        return model_ref(base, invited=invited, check_back_s=check_back_s)

    def _current_or_none(self) -> BaseModel | None:
        try:
            return self._home.current()
        except Unavailable:
            return None

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        if not request.agent_id:
            raise InvalidInput("agent_id is empty", reason="bad_request")
        self._check_federation(request.federation)
        redirect = self._home.redirect_for(request.agent_id)
        if redirect is not None:
            return pb.JoinReply(redirect=_redirect_pb(redirect, "not_home"))
        base = self._home.current()
        self._agents.join(
            request.agent_id,
            display_name=request.display_name,
            capability=capability_name(request.capability),
            telemetry=telemetry_to_dict(request.telemetry),
        )
        log.debug("agent_joined", extra={"fields": {"agent": request.agent_id, "name": request.display_name}})
        return pb.JoinReply(
            home=pb.Home(
                aggregator_id=self._home.id,
                base=self._ref_for(base, request.agent_id),
                ring_version=self._home.ring_version,
                heartbeat_interval_s=self._agents.heartbeat_interval(),
                round_config=self._home.round_config(),
            )
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelChunk]:
        caller = caller_certificate()  # on the loop: it does not follow `offload`
        self._check_federation(request.federation)
        if request.agent_id:
            self._agents.touch(request.agent_id)
        current = self._home.current()
        model_cid = request.model_cid or current.model_cid
        round_ = current.round if model_cid == current.model_cid else 0
        if request.if_none_match and request.if_none_match == model_cid:
            yield pb.ModelChunk(header=pb.ModelHeader(model_cid=model_cid, not_modified=True, round=round_))
            return
        manifest_bytes, weights = await self._model(model_cid, caller)
        manifest = Manifest.from_bytes(manifest_bytes)
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                model_cid=model_cid,
                manifest=manifest_bytes,
                weights_cid=manifest.weights,
                weights_size=len(weights),
                round=round_ or manifest.round,
            )
        )
        self._home.downloaded(len(weights))
        for offset in range(0, len(weights), CHUNK_SIZE):
            yield pb.ModelChunk(chunk=pb.Chunk(offset=offset, data=weights[offset : offset + CHUNK_SIZE]))

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitUpdateReply:
        # the upload is written to the store while it arrives; the intake commits it, or it is dropped
        staged = await self._offload(self._home.store.stage)
        try:
            return await self._submit(request_iterator, staged)
        finally:
            # after a commit this keeps the object; otherwise it drops the partial file (quick:
            # no fsync), and it must run even when the call is cancelled
            staged.discard()

    async def _submit(self, request_iterator: AsyncIterator[pb.UpdateChunk], staged: StagedWrite) -> pb.SubmitUpdateReply:
        intake = self._home.intake
        # on the loop: neither follows `offload` into the pool where the intake runs
        caller, signers = caller_certificate(), current_signers()
        try:
            header, weights, received_cid, control = await read_update_stream(
                request_iterator,
                max_bytes=self._home.max_update_bytes,
                idle_s=self._stream_idle_s,
                offload=self._offload,
                staged=staged,
            )
            self._agents.touch(header.agent_id)
            submission = submission_from_header(
                header, weights, received_cid, staged=staged, caller=caller, signers=signers, control=control
            )
            result = await self._offload(intake.submit, submission)
        except StreamRefused as refusal:
            # refused while reading the stream, before the intake saw it
            if refusal.header is not None:
                await self._offload(intake.record_refusal, refusal.header.agent_id or "?", refusal)
            return pb.SubmitUpdateReply(accepted=False, reason=refusal.reason, message=refusal.message)
        except StrataError as error:
            if error.status == "INVALID_ARGUMENT":
                return pb.SubmitUpdateReply(accepted=False, reason=error.reason, message=error.message)
            raise
        return pb.SubmitUpdateReply(
            accepted=True, update_cid=result.update_cid, round=result.round, duplicate=result.duplicate
        )

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelEvent]:
        self._check_federation(request.federation)
        # what the agent was last told: the base, and whether it is invited to train on it
        known: tuple[str, bool] = (request.known_cid, True)
        while not self._stopping.is_set():
            if request.agent_id:
                redirect = self._home.redirect_for(request.agent_id)
                if redirect is not None:
                    yield pb.ModelEvent(home_changed=_redirect_pb(redirect, "home_changed"))
                    return
                self._agents.touch(request.agent_id)
            current = self._current_or_none()
            if current is not None:
                ref = self._ref_for(current, request.agent_id)
                if (ref.model_cid, not ref.not_invited) != known:
                    known = (ref.model_cid, not ref.not_invited)
                    yield pb.ModelEvent(new_base=ref)
                    continue
            await self._changes.wait(WATCH_WAKE_S)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        if not request.agent_id:
            raise InvalidInput("agent_id is empty", reason="bad_request")
        self._agents.touch(request.agent_id, telemetry_to_dict(request.telemetry))
        reply = pb.HeartbeatReply(
            current_base=self._ref_for(self._home.current(), request.agent_id),
            next_interval_s=self._agents.heartbeat_interval(),
            revocations_version=version_of(self._revocations()),
        )
        redirect = self._home.redirect_for(request.agent_id)
        if redirect is not None:
            reply.home_changed.CopyFrom(_redirect_pb(redirect, "home_changed"))
        return reply

    async def GetRevocations(
        self, request: pb.GetRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevocationsReply:
        return revocations_reply(self._revocations(), request.known_version)
