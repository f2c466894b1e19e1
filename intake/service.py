"""AgentService for any home (an aggregator or a relay): protobuf in, one call on the core, protobuf out.

A device cannot tell an aggregator from a relay: Join answers with a home (or a
redirect to the ring's owner), GetModel streams the manifest then the weights in
~1 MiB chunks, SubmitUpdate refusals carry the same reason codes, WatchModels
and Heartbeat announce new bases and home changes.

Errors raised by the core (StrataError subclasses) leave through the shared
error interceptor in proto.wire, except SubmitUpdate's refusals, which are an
answer rather than a failure: the reply says accepted=false with the reason code.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator

import grpc

from intake.agents import AgentRegistry
from intake.home import BaseModel, Home, Redirect
from intake.submission import Submission
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import capability_name, telemetry_to_dict
from proto.errors import InvalidInput, Refusal, StrataError, UpdateRefused, WireError
from proto.wire import CHUNK_SIZE, read_header_stream
from storage.cid import CidBuilder
from storage.manifest import Manifest
from storage.store import ContentStore

log = logging.getLogger("strata.intake.service")

# how often a WatchModels stream wakes to check for shutdown and ring changes
WATCH_POLL_S = 1.0

# how a broken SubmitUpdate stream is refused, by the wire's reason
_STREAM_REFUSALS = {"oversize": Refusal.TOO_LARGE, "missing_header": Refusal.BAD_HEADER}


def model_ref(base: BaseModel) -> pb.ModelRef:
    return pb.ModelRef(
        model_cid=base.model_cid, round=base.round, federation=base.federation, weights_cid=base.weights_cid
    )


def stream_model(store: ContentStore, model_cid: str, *, round_: int, if_none_match: str) -> Iterator[pb.ModelChunk]:
    """The GetModel answer: the manifest header, then the weights in ~1 MiB chunks."""
    if if_none_match and if_none_match == model_cid:
        yield pb.ModelChunk(header=pb.ModelHeader(model_cid=model_cid, not_modified=True, round=round_))
        return
    manifest_bytes = store.get(model_cid)
    manifest = Manifest.from_bytes(manifest_bytes)
    yield pb.ModelChunk(
        header=pb.ModelHeader(
            model_cid=model_cid,
            manifest=manifest_bytes,
            weights_cid=manifest.weights,
            weights_size=store.size(manifest.weights),
            round=manifest.round if not round_ else round_,
        )
    )
    offset = 0
    for piece in store.iter_chunks(manifest.weights, CHUNK_SIZE):
        yield pb.ModelChunk(chunk=pb.Chunk(offset=offset, data=piece))
        offset += len(piece)


class StreamRefused(UpdateRefused):
    """A SubmitUpdate stream refused while it was read; `header` is what arrived of it, if anything."""

    def __init__(self, message: str, *, reason: Refusal, header: pb.UpdateHeader | None) -> None:
        super().__init__(message, reason=reason)
        self.header = header


def read_update_stream(
    request_iterator: Iterator[pb.UpdateChunk], *, max_bytes: int
) -> tuple[pb.UpdateHeader, bytes, str]:
    """Reassemble a SubmitUpdate stream: exactly one header first, then in-order chunks.

    Returns (header, weights, CID of the weights), the CID hashed chunk by chunk while
    the rest of the stream is still arriving. Raises StreamRefused.
    """
    first = next(request_iterator, None)
    header = first.header if first is not None and first.WhichOneof("part") == "header" else None
    builder = CidBuilder()
    try:
        messages = itertools.chain([first] if first is not None else [], request_iterator)
        header, weights = read_header_stream(
            messages, size_of=lambda h: h.weights_size, max_size=max_bytes, on_chunk=builder.update
        )
        return header, weights, builder.finish()
    except WireError as exc:
        raise StreamRefused(
            str(exc), reason=_STREAM_REFUSALS.get(exc.reason, Refusal.BAD_STREAM), header=header
        ) from None


def submission_from_header(header: pb.UpdateHeader, weights: bytes, received_cid: str = "") -> Submission:
    return Submission(
        received_cid=received_cid,
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
    )


def _redirect_pb(redirect: Redirect, reason: str) -> pb.Redirect:
    return pb.Redirect(
        aggregator_id=redirect.aggregator_id, address=redirect.address, ring_version=redirect.ring_version, reason=reason
    )


class AgentServicer(pb_grpc.AgentServiceServicer):
    """AgentService over a `Home`."""

    def __init__(
        self, *, home: Home, agents: AgentRegistry, heartbeat_interval_s: float, stopping: threading.Event
    ) -> None:
        self._home = home
        self._agents = agents
        self._heartbeat_interval_s = heartbeat_interval_s
        self._stopping = stopping

    def _check_federation(self, federation: str) -> None:
        if federation and federation != self._home.federation:
            raise InvalidInput(
                f"{self._home.id} serves {self._home.federation!r}, not {federation!r}",
                reason=Refusal.UNKNOWN_FEDERATION,
            )

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
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
        log.info("agent_joined", extra={"fields": {"agent": request.agent_id, "name": request.display_name}})
        return pb.JoinReply(
            home=pb.Home(
                aggregator_id=self._home.id,
                base=model_ref(base),
                ring_version=self._home.ring_version,
                heartbeat_interval_s=self._heartbeat_interval_s,
                round_config=self._home.round_config(),
            )
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        self._check_federation(request.federation)
        if request.agent_id:
            self._agents.touch(request.agent_id)
        current = self._home.current()
        model_cid = request.model_cid or current.model_cid
        if request.if_none_match != model_cid:
            self._home.prepare_download(model_cid)
        round_ = current.round if model_cid == current.model_cid else 0
        for message in stream_model(self._home.store, model_cid, round_=round_, if_none_match=request.if_none_match):
            if message.WhichOneof("part") == "header" and not message.header.not_modified:
                self._home.downloaded(message.header.weights_size)
            yield message

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateReply:
        intake = self._home.intake
        try:
            header, weights, received_cid = read_update_stream(request_iterator, max_bytes=self._home.max_update_bytes)
            self._agents.touch(header.agent_id)
            result = intake.submit(submission_from_header(header, weights, received_cid))
        except StreamRefused as refusal:
            # refused while reading the stream, before the intake saw it
            if refusal.header is not None:
                intake.record_refusal(refusal.header.agent_id or "?", refusal)
            return pb.SubmitUpdateReply(accepted=False, reason=refusal.reason, message=refusal.message)
        except StrataError as error:
            if error.status == "INVALID_ARGUMENT":
                return pb.SubmitUpdateReply(accepted=False, reason=error.reason, message=error.message)
            raise
        return pb.SubmitUpdateReply(
            accepted=True, update_cid=result.update_cid, round=result.round, duplicate=result.duplicate
        )

    def WatchModels(self, request: pb.WatchModelsRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelEvent]:
        self._check_federation(request.federation)
        known = request.known_cid
        while context.is_active() and not self._stopping.is_set():
            if request.agent_id:
                redirect = self._home.redirect_for(request.agent_id)
                if redirect is not None:
                    yield pb.ModelEvent(home_changed=_redirect_pb(redirect, "home_changed"))
                    return
                self._agents.touch(request.agent_id)
            current = self._home.wait_for_new_base(known, timeout=WATCH_POLL_S)
            if current is not None and current.model_cid != known:
                known = current.model_cid
                yield pb.ModelEvent(new_base=model_ref(current))

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        if not request.agent_id:
            raise InvalidInput("agent_id is empty", reason="bad_request")
        self._agents.touch(request.agent_id, telemetry_to_dict(request.telemetry))
        reply = pb.HeartbeatReply(current_base=model_ref(self._home.current()), next_interval_s=self._heartbeat_interval_s)
        redirect = self._home.redirect_for(request.agent_id)
        if redirect is not None:
            reply.home_changed.CopyFrom(_redirect_pb(redirect, "home_changed"))
        return reply
