"""AgentService as a relay serves it: the same wire contract as an aggregator's, over the relay's core.

A device cannot tell the difference: Join answers with a home (the relay) and the
current upstream base, GetModel streams from the relay's cache, SubmitUpdate
refusals carry the aggregator's reason codes, WatchModels and Heartbeat announce
new bases. A relay never redirects: it has no ring of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc

from aggregator.agents import AgentRegistry
from aggregator.service import answer_submit, model_ref, stream_model
from aggregator.validation import Refusal
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import capability_name, telemetry_to_dict
from proto.errors import InvalidInput
from relay.core import Relay

log = logging.getLogger("strata.relay.service")

# how often a WatchModels stream wakes to check for shutdown
_WATCH_POLL_S = 1.0


class RelayServicer(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        *,
        relay: Relay,
        agents: AgentRegistry,
        heartbeat_interval_s: float,
        round_config: Callable[[], dict[str, str]],
        stopping: threading.Event,
    ) -> None:
        self._relay = relay
        self._agents = agents
        self._heartbeat_interval_s = heartbeat_interval_s
        self._round_config = round_config
        self._stopping = stopping

    def _check_federation(self, federation: str) -> None:
        if federation and federation != self._relay.federation:
            raise InvalidInput(
                f"this relay serves {self._relay.federation!r}, not {federation!r}", reason=Refusal.UNKNOWN_FEDERATION
            )

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if not request.agent_id:
            raise InvalidInput("agent_id is empty", reason="bad_request")
        self._check_federation(request.federation)
        base = self._relay.current
        self._agents.join(
            request.agent_id,
            display_name=request.display_name,
            capability=capability_name(request.capability),
            telemetry=telemetry_to_dict(request.telemetry),
        )
        log.info("device_joined", extra={"fields": {"agent": request.agent_id, "name": request.display_name}})
        return pb.JoinReply(
            home=pb.Home(
                aggregator_id=self._relay.relay_id,
                base=model_ref(base),
                heartbeat_interval_s=self._heartbeat_interval_s,
                round_config=self._round_config(),
            )
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        self._check_federation(request.federation)
        if request.agent_id:
            self._agents.touch(request.agent_id)
        current = self._relay.current
        model_cid = request.model_cid or current.model_cid
        if request.if_none_match != model_cid:
            self._relay.cache.ensure(model_cid)
        round_ = current.round if model_cid == current.model_cid else 0
        for message in stream_model(self._relay.store, model_cid, round_=round_, if_none_match=request.if_none_match):
            if message.WhichOneof("part") == "header" and not message.header.not_modified:
                self._relay.cache.record_served(message.header.weights_size)
            yield message

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext) -> pb.SubmitUpdateReply:
        return answer_submit(
            request_iterator,
            max_bytes=self._relay.config.max_update_bytes,
            agents=self._agents,
            submit=self._relay.submit,
        )

    def WatchModels(self, request: pb.WatchModelsRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelEvent]:
        self._check_federation(request.federation)
        known = request.known_cid
        while context.is_active() and not self._stopping.is_set():
            if request.agent_id:
                self._agents.touch(request.agent_id)
            current = self._relay.wait_for_new_base(known, timeout=_WATCH_POLL_S)
            if current is not None and current.model_cid != known:
                known = current.model_cid
                yield pb.ModelEvent(new_base=model_ref(current))

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        if not request.agent_id:
            raise InvalidInput("agent_id is empty", reason="bad_request")
        self._agents.touch(request.agent_id, telemetry_to_dict(request.telemetry))
        return pb.HeartbeatReply(current_base=model_ref(self._relay.current), next_interval_s=self._heartbeat_interval_s)
