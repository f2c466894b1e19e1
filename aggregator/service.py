"""AgentService as an aggregator serves it: protobuf in, one call on a core object, protobuf out.

Errors raised by the core (StrataError subclasses) leave through the shared
error interceptor in proto.wire, except SubmitUpdate's refusals, which are an
answer rather than a failure: the reply says accepted=false with the reason code.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator

import grpc

from aggregator.agents import AgentRegistry
from aggregator.membership import RingView
from aggregator.rounds import BaseModel, RoundManager, Submission, SubmitResult
from aggregator.validation import Refusal, UpdateRefused
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import capability_name, telemetry_to_dict
from proto.errors import InvalidInput, NotFound, StrataError, WireError
from proto.wire import CHUNK_SIZE, read_header_stream
from storage.cid import CidBuilder
from storage.manifest import Manifest
from storage.store import ContentStore

log = logging.getLogger("strata.aggregator.service")

# how often a WatchModels stream wakes to check for shutdown and ring changes
_WATCH_POLL_S = 1.0


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


def read_update_stream(
    request_iterator: Iterator[pb.UpdateChunk], *, max_bytes: int
) -> tuple[pb.UpdateHeader, bytes, str]:
    """Reassemble a SubmitUpdate stream: exactly one header first, then in-order chunks.

    Returns (header, weights, CID of the weights), the CID hashed chunk by chunk while
    the rest of the stream is still arriving. A refusal raised after the header arrived
    carries it as `.header`, so the refusal can be recorded against the sender.
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
        if exc.reason == "oversize":
            reason = Refusal.TOO_LARGE
        elif exc.reason == "missing_header":
            reason = Refusal.BAD_HEADER
        else:
            reason = Refusal.BAD_STREAM
        refusal = UpdateRefused(str(exc), reason=reason)
        refusal.header = header
        raise refusal from None


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


def answer_submit(
    request_iterator: Iterator[pb.UpdateChunk],
    *,
    max_bytes: int,
    agents: AgentRegistry,
    submit: Callable[[Submission], SubmitResult],
    record_stream_refusal: Callable[[str, UpdateRefused], None] | None = None,
) -> pb.SubmitUpdateReply:
    """SubmitUpdate for aggregators and relays alike: a refusal is an answer (accepted=false
    with its reason code), not an RPC error."""
    try:
        header, weights, received_cid = read_update_stream(request_iterator, max_bytes=max_bytes)
        agents.touch(header.agent_id)
        result = submit(submission_from_header(header, weights, received_cid))
    except UpdateRefused as refusal:
        stream_header = getattr(refusal, "header", None)
        if stream_header is not None and record_stream_refusal is not None:
            # refused while reading the stream, before the core saw it
            record_stream_refusal(stream_header.agent_id or "?", refusal)
        return pb.SubmitUpdateReply(accepted=False, reason=refusal.reason, message=refusal.message)
    except StrataError as error:
        if error.status == "INVALID_ARGUMENT":
            return pb.SubmitUpdateReply(accepted=False, reason=error.reason, message=error.message)
        raise
    return pb.SubmitUpdateReply(accepted=True, update_cid=result.update_cid, round=result.round, duplicate=result.duplicate)


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        *,
        aggregator_id: str,
        rounds: RoundManager,
        agents: AgentRegistry,
        ring: RingView,
        store: ContentStore,
        heartbeat_interval_s: float,
        round_config: dict[str, str],
        stopping: threading.Event,
    ) -> None:
        self._id = aggregator_id
        self._rounds = rounds
        self._agents = agents
        self._ring = ring
        self._store = store
        self._heartbeat_interval_s = heartbeat_interval_s
        self._round_config = round_config
        self._stopping = stopping

    def _redirect_for(self, agent_id: str) -> pb.Redirect | None:
        ring = self._ring.ring
        owner = ring.owner(agent_id)
        if owner.id == self._id:
            return None
        return pb.Redirect(aggregator_id=owner.id, address=owner.address, ring_version=ring.version, reason="not_home")

    def _check_federation(self, federation: str) -> None:
        if federation and federation != self._rounds.federation:
            raise InvalidInput(
                f"this aggregator trains {self._rounds.federation!r}, not {federation!r}",
                reason=Refusal.UNKNOWN_FEDERATION,
            )

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if not request.agent_id:
            raise InvalidInput("agent_id is empty", reason="bad_request")
        self._check_federation(request.federation)
        redirect = self._redirect_for(request.agent_id)
        if redirect is not None:
            return pb.JoinReply(redirect=redirect)
        self._agents.join(
            request.agent_id,
            display_name=request.display_name,
            capability=capability_name(request.capability),
            telemetry=telemetry_to_dict(request.telemetry),
        )
        log.info("agent_joined", extra={"fields": {"agent": request.agent_id, "name": request.display_name}})
        return pb.JoinReply(
            home=pb.Home(
                aggregator_id=self._id,
                base=model_ref(self._rounds.current),
                ring_version=self._ring.ring.version,
                heartbeat_interval_s=self._heartbeat_interval_s,
                round_config=self._round_config,
            )
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        self._check_federation(request.federation)
        if request.agent_id:
            self._agents.touch(request.agent_id)
        current = self._rounds.current
        model_cid = request.model_cid or current.model_cid
        if model_cid != current.model_cid and not self._store.has(model_cid):
            raise NotFound(f"model {model_cid} is not in this aggregator's store", reason="not_found")
        round_ = current.round if model_cid == current.model_cid else 0
        yield from stream_model(self._store, model_cid, round_=round_, if_none_match=request.if_none_match)

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext) -> pb.SubmitUpdateReply:
        return answer_submit(
            request_iterator,
            max_bytes=self._rounds.settings.max_update_bytes,
            agents=self._agents,
            submit=self._rounds.submit,
            record_stream_refusal=self._rounds.record_refusal,
        )

    def WatchModels(self, request: pb.WatchModelsRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelEvent]:
        self._check_federation(request.federation)
        known = request.known_cid
        while context.is_active() and not self._stopping.is_set():
            if request.agent_id:
                redirect = self._redirect_for(request.agent_id)
                if redirect is not None:
                    redirect.reason = "home_changed"
                    yield pb.ModelEvent(home_changed=redirect)
                    return
                self._agents.touch(request.agent_id)
            current = self._rounds.wait_for_new_base(known, timeout=_WATCH_POLL_S)
            if current.model_cid != known:
                known = current.model_cid
                yield pb.ModelEvent(new_base=model_ref(current))

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        if not request.agent_id:
            raise InvalidInput("agent_id is empty", reason="bad_request")
        self._agents.touch(request.agent_id, telemetry_to_dict(request.telemetry))
        reply = pb.HeartbeatReply(
            current_base=model_ref(self._rounds.current), next_interval_s=self._heartbeat_interval_s
        )
        redirect = self._redirect_for(request.agent_id)
        if redirect is not None:
            redirect.reason = "home_changed"
            reply.home_changed.CopyFrom(redirect)
        return reply
