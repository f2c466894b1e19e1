"""A home aggregator reduced to what an agent's client sees, served in-process on 127.0.0.1:0.

`FakeHome` answers AgentService from plain attributes the test sets: where Join
redirects, what GetModel serves (any bytes, tampered or not), how many calls fail
UNAVAILABLE first, which refusal SubmitUpdate gives, what WatchModels pushes and
what Heartbeat says. It counts every call.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc
import numpy as np

from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import InvalidInput, Unavailable
from proto.serving import create_server, receive_header_stream
from proto.wire import stream_with_header
from storage.cid import cid_of
from storage.codec import encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer

FEDERATION = "digits"
AGGREGATOR_KEY = KeyPair.generate()


def make_model(
    round_: int = 0, value: float = 1.0, key: KeyPair = AGGREGATOR_KEY, *, params: int = 4
) -> tuple[Manifest, bytes]:
    """A signed base model (small unless `params` says otherwise): (manifest, weight bytes); the same arguments
    give the same model."""
    blob = encode_tensors({"w": np.full(params, value, np.float32), "b": np.zeros(2, np.float32)})
    manifest = Manifest(
        kind="base",
        federation=FEDERATION,
        round=round_,
        producer=Producer(role="aggregator", id="agg-fake"),
        weights=cid_of(blob),
        tensors=summarize(blob),
        created_at="2025-01-01T00:00:00Z",
    ).signed(key)
    return manifest, blob


async def _inline(fn, *args):
    return fn(*args)


class FakeHome(pb_grpc.AgentServiceServicer):
    def __init__(self, aggregator_id: str = "agg-a") -> None:
        self.aggregator_id = aggregator_id
        self.address = ""
        self.redirect_to = ""  # Join answers "your home is there"
        self.join_failures = 0  # Join fails UNAVAILABLE this many times first
        self.join_refusal = ""  # Join fails INVALID_ARGUMENT with this reason
        self.heartbeat_interval_s = 30.0  # what Join hands out
        self.round_config: dict[str, str] = {}  # what Join hands out with the home
        self.next_interval_s = 0.0  # what Heartbeat hands out; 0: the same as Join
        self.heartbeat_home_changed: pb.Redirect | None = None
        self.submit_failures = 0  # SubmitUpdate fails UNAVAILABLE this many times first
        self.submit_refusal = ""  # SubmitUpdate answers accepted=false with this reason
        self.submit_hang = False  # SubmitUpdate reads the update and never answers (a home cut off mid-upload)
        self.refuse_at_header = ""  # SubmitUpdate answers this refusal as soon as the header arrives
        self.submitted: list[tuple[pb.UpdateHeader, bytes]] = []
        self.events: queue.Queue[pb.ModelEvent] = queue.Queue()
        self.calls = {"Join": 0, "GetModel": 0, "SubmitUpdate": 0, "WatchModels": 0, "Heartbeat": 0}
        self.serve(*make_model())

    def serve(self, manifest: Manifest, blob: bytes) -> None:
        """Announce and serve this model, consistently (tests then tamper with one part)."""
        self.announced = pb.ModelRef(model_cid=manifest.cid, round=manifest.round, federation=FEDERATION, weights_cid=manifest.weights)
        self.header_cid = manifest.cid
        self.manifest_bytes = manifest.to_bytes()
        self.weights = blob

    def push_new_base(self, manifest: Manifest, blob: bytes) -> None:
        self.serve(manifest, blob)
        self.events.put(pb.ModelEvent(new_base=self.announced))

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        self.calls["Join"] += 1
        if self.join_refusal:
            raise InvalidInput("refused", reason=self.join_refusal)
        if self.join_failures > 0:
            self.join_failures -= 1
            raise Unavailable("restarting", reason="restarting")
        if self.redirect_to:
            return pb.JoinReply(redirect=pb.Redirect(aggregator_id="elsewhere", address=self.redirect_to))
        return pb.JoinReply(
            home=pb.Home(
                aggregator_id=self.aggregator_id,
                base=self.announced,
                heartbeat_interval_s=self.heartbeat_interval_s,
                round_config=self.round_config,
            )
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelChunk]:
        self.calls["GetModel"] += 1
        if request.if_none_match and request.if_none_match == self.header_cid:
            yield pb.ModelChunk(header=pb.ModelHeader(model_cid=self.header_cid, not_modified=True))
            return
        header = pb.ModelHeader(
            model_cid=self.header_cid, manifest=self.manifest_bytes, weights_size=len(self.weights), round=self.announced.round
        )
        for message in stream_with_header(pb.ModelChunk, header, self.weights):
            yield message

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitUpdateReply:
        self.calls["SubmitUpdate"] += 1
        if self.refuse_at_header:
            async for _ in request_iterator:  # the header: answered before the chunks, as intake's header checks do
                return pb.SubmitUpdateReply(accepted=False, reason=self.refuse_at_header, message="refused by the test")
        header, blob = await receive_header_stream(
            request_iterator, size_of=lambda h: h.weights_size, max_size=1 << 24, idle_timeout_s=10, offload=_inline
        )
        if self.submit_failures > 0:
            self.submit_failures -= 1
            raise Unavailable("restarting", reason="restarting")
        if self.submit_hang:
            await asyncio.Event().wait()  # until the client goes away or the server stops
        self.submitted.append((header, blob))
        if self.submit_refusal:
            return pb.SubmitUpdateReply(accepted=False, reason=self.submit_refusal, message="refused by the test")
        return pb.SubmitUpdateReply(accepted=True, update_cid=cid_of(header.manifest), round=header.round)

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelEvent]:
        self.calls["WatchModels"] += 1
        while True:  # until the client cancels or the server stops
            try:
                yield self.events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.05)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        self.calls["Heartbeat"] += 1
        reply = pb.HeartbeatReply(
            current_base=self.announced, next_interval_s=self.next_interval_s or self.heartbeat_interval_s
        )
        if self.heartbeat_home_changed is not None:
            reply.home_changed.CopyFrom(self.heartbeat_home_changed)
        return reply


@contextmanager
def serving(*homes: FakeHome) -> Iterator[list[FakeHome]]:
    """Serve each home on its own port (its `.address` is set) until the block ends."""
    handles = []
    try:
        for home in homes:
            handle = create_server("127.0.0.1:0", workers=2)
            pb_grpc.add_AgentServiceServicer_to_server(home, handle.server)
            handles.append(handle.start())
            home.address = handle.address
        yield list(homes)
    finally:
        for handle in handles:
            handle.stop(grace=0)

