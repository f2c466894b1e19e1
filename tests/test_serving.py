"""Serving without a thread per connection: a real aggregator under hundreds of idle streams and stalled
uploads still answers Join and Heartbeat; garbage bytes are INVALID_ARGUMENT; a stalled upload is refused.

The idle and stalled clients are grpc.aio calls scheduled on the process's serving loop (one thread
for all of them), so the thread count this test watches is the server's alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.daemon import AggregatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.serving import serving_loop
from proto.wire import create_channel
from strata.wiring import initial_model_factory

IDLE_WATCHERS = 400
STALLED_UPLOADS = 300
# a hang guard, not a timing assertion: a starved server would not answer at all
ANSWER_WITHIN_S = 10.0


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[AggregatorDaemon]:
    config = AggregatorConfig(
        id="agg-serving",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "state"),
        store=str(tmp_path / "store"),
        round=RoundSettings(min_updates=1, quorum=1.0, deadline_s=600.0),
        serving=ServingSettings(workers=2, stream_idle_s=1.0),
    )
    daemon = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    yield daemon
    daemon.stop(grace=0)


class HostileCrowd:
    """Many idle watch streams and stalled uploads, held open on the serving loop until `release()`."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._release: asyncio.Event | None = None
        self.opened = threading.Event()
        self.outcomes: dict[str, list[str]] = {"watch": [], "upload": []}

    async def _stalled_upload(self, stub: pb_grpc.AgentServiceStub, index: int, release: asyncio.Event) -> None:
        async def messages() -> AsyncIterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=pb.UpdateHeader(agent_id=f"stall-{index}", weights_size=1 << 20))
            await release.wait()

        reply = await stub.SubmitUpdate(messages(), timeout=60)
        self.outcomes["upload"].append(reply.reason if not reply.accepted else "accepted")

    async def _idle_watch(self, stub: pb_grpc.AgentServiceStub, index: int) -> None:
        call = stub.WatchModels(pb.WatchModelsRequest(agent_id=f"idle-{index}"), timeout=60)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            self.outcomes["watch"].append(exc.code().name)

    async def run(self) -> None:
        self._release = asyncio.Event()
        async with grpc.aio.insecure_channel(self._address) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            tasks = [asyncio.ensure_future(self._idle_watch(stub, i)) for i in range(IDLE_WATCHERS)]
            tasks += [asyncio.ensure_future(self._stalled_upload(stub, i, self._release)) for i in range(STALLED_UPLOADS)]
            await asyncio.sleep(0.5)  # let every call reach the server
            self.opened.set()
            await self._release.wait()
            for task in tasks[:IDLE_WATCHERS]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def release(self) -> None:
        assert self._release is not None
        serving_loop().call_soon_threadsafe(self._release.set)


def test_idle_streams_and_stalled_uploads_hold_no_threads_and_starve_nobody(aggregator: AggregatorDaemon) -> None:
    threads_before = threading.active_count()
    crowd = HostileCrowd(aggregator.address)
    done = asyncio.run_coroutine_threadsafe(crowd.run(), serving_loop())
    assert crowd.opened.wait(30), "the crowd never got its calls open"

    with create_channel(aggregator.address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        reply = stub.Join(pb.JoinRequest(agent_id="latecomer", federation="digits"), timeout=ANSWER_WITHIN_S)
        assert reply.WhichOneof("outcome") == "home"
        beat = stub.Heartbeat(pb.HeartbeatRequest(agent_id="latecomer"), timeout=ANSWER_WITHIN_S)
        assert beat.current_base.model_cid == reply.home.base.model_cid
    # 700 open calls, and the server grew by a handful of pool threads at most
    assert threading.active_count() - threads_before < 20

    crowd.release()
    done.result(timeout=60)
    # a stalled upload is refused as a bad stream once it sat idle longer than stream_idle_s
    assert crowd.outcomes["upload"] == ["bad_stream"] * STALLED_UPLOADS
    assert aggregator.journal.refusal_counts() == {"bad_stream": STALLED_UPLOADS}
    # nothing of the refused uploads stays behind in the store
    assert list((Path(aggregator.config.store) / "tmp").iterdir()) == []


GARBAGE = b"\xff\xff\xff\xff\x0f"  # not a protobuf message of any type: an invalid tag


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("/strata.v1.AgentService/Join", "unary"),
        ("/strata.v1.AgentService/Heartbeat", "unary"),
        ("/strata.v1.AgentService/GetModel", "server_stream"),
        ("/strata.v1.AgentService/WatchModels", "server_stream"),
        ("/strata.v1.PeerService/GetLatest", "unary"),
        ("/strata.v1.PeerService/Announce", "unary"),
        ("/strata.v1.PeerService/FetchBlob", "server_stream"),
    ],
)
def test_garbage_bytes_are_invalid_argument_and_the_daemon_serves_on(
    aggregator: AggregatorDaemon, method: str, shape: str
) -> None:
    with create_channel(aggregator.address) as channel:
        if shape == "unary":
            call = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as info:
                call(GARBAGE, timeout=5)
        else:
            call = channel.unary_stream(method)
            with pytest.raises(grpc.RpcError) as info:
                list(call(GARBAGE, timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith("bad_request:")
        reply = pb_grpc.AgentServiceStub(channel).Join(pb.JoinRequest(agent_id="after"), timeout=5)
        assert reply.WhichOneof("outcome") == "home"


def test_a_garbage_upload_chunk_is_refused_as_an_answer(aggregator: AggregatorDaemon) -> None:
    with create_channel(aggregator.address) as channel:
        call = channel.stream_unary("/strata.v1.AgentService/SubmitUpdate", response_deserializer=pb.SubmitUpdateReply.FromString)
        reply = call(iter([GARBAGE]), timeout=5)
    assert not reply.accepted and reply.reason == "bad_request"


def test_health_watch_streams_through_the_error_interceptor(aggregator: AggregatorDaemon) -> None:
    # grpc's aio HealthServicer.Watch is a coroutine writing with context.write, not an async generator;
    # every wrapping interceptor used to `async for` over it and answer INTERNAL
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with create_channel(aggregator.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_a_server_accepts_the_keepalive_pings_its_clients_are_configured_to_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # grpc core knows the server's ping floor only as "grpc.http2.min_ping_interval_without_data_ms";
    # under any other name it keeps its 5-minute default, strikes every client keepalive ping on a
    # quiet connection, and after two strikes answers GOAWAY too_many_pings, failing open streams.
    # Scaled down: the server's floor 0.5 s, the client's keepalive 1 s (real: 10 s and 30 s).
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import proto.serving

    monkeypatch.setattr(proto.serving, "_SERVER_MIN_PING_INTERVAL_S", 0.5)
    with proto.serving.create_server() as handle, create_channel(handle.address, keepalive_time_s=1.0) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        ended: list[BaseException] = []

        def wait_for_more() -> None:
            try:
                next(watch)  # no status changes: blocks until cancelled, or fails on a GOAWAY
            except BaseException as exc:  # noqa: BLE001 - recorded for the assert below
                ended.append(exc)

        waiter = threading.Thread(target=wait_for_more, daemon=True)
        waiter.start()
        waiter.join(6.0)  # six keepalive pings on a connection that carries no data
        still_open = watch.is_active()
        watch.cancel()
        waiter.join(5.0)
        assert still_open, f"the stream ended under keepalive pings: {ended}"
        assert len(ended) == 1 and isinstance(ended[0], grpc.RpcError) and ended[0].code() == grpc.StatusCode.CANCELLED, ended
