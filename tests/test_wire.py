"""proto.wire: chunked streams, error mapping, limits, health, deadlines and retries over real gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto import wire
from proto.errors import InvalidInput, NotFound, StrataError, Unavailable, WireError
from proto.retry import RetryPolicy, retry_call
from proto.serving import create_server, receive_header_stream

# ---------------------------------------------------------------- chunking


def _stream(data: bytes, chunk_size: int = 1000) -> list[tuple[int, bytes]]:
    return [(offset, bytes(view)) for offset, view in wire.iter_chunks(data, chunk_size)]


def test_iter_chunks_covers_buffer_without_copying() -> None:
    data = bytearray(os.urandom(2500))
    chunks = list(wire.iter_chunks(data, 1000))
    assert [(o, len(v)) for o, v in chunks] == [(0, 1000), (1000, 1000), (2000, 500)]
    data[0] ^= 0xFF  # the views share the buffer, so they see the change
    assert chunks[0][1][0] == data[0]
    assert list(wire.iter_chunks(b"")) == []


def test_reassembly_round_trip_checks_sha256() -> None:
    data = os.urandom(3 * 1000 + 7)
    r = wire.Reassembler(len(data), max_size=10_000, sha256=hashlib.sha256(data).hexdigest())
    for offset, chunk in _stream(data):
        r.add(offset, chunk)
    assert r.finish() == data


def test_reassembly_empty_payload() -> None:
    r = wire.Reassembler(0, max_size=10, sha256=hashlib.sha256(b"").hexdigest())
    assert r.finish() == b""


def test_out_of_order_chunk_is_refused_with_clear_message() -> None:
    r = wire.Reassembler(3 * wire.CHUNK_SIZE, max_size=4 * wire.CHUNK_SIZE)
    r.add(0, bytes(wire.CHUNK_SIZE))
    with pytest.raises(WireError) as info:
        r.add(2 * wire.CHUNK_SIZE, bytes(wire.CHUNK_SIZE))
    assert info.value.reason == "out_of_order"
    assert "chunk at offset 2097152 arrived but 1048576 bytes were expected next" in str(info.value)


def test_duplicate_chunk_is_refused() -> None:
    r = wire.Reassembler(2000, max_size=2000)
    r.add(0, bytes(1000))
    with pytest.raises(WireError, match="duplicate") as info:
        r.add(0, bytes(1000))
    assert info.value.reason == "out_of_order"


def test_oversize_declared_and_oversize_data() -> None:
    with pytest.raises(WireError, match="more than the limit") as info:
        wire.Reassembler(101, max_size=100)
    assert info.value.reason == "oversize"
    r = wire.Reassembler(10, max_size=100)
    with pytest.raises(WireError, match="past the declared size") as info:
        r.add(0, bytes(11))
    assert info.value.reason == "oversize"


def test_truncated_stream() -> None:
    r = wire.Reassembler(10, max_size=100)
    r.add(0, bytes(4))
    with pytest.raises(WireError, match="after 4 of 10 bytes") as info:
        r.finish()
    assert info.value.reason == "truncated"


def test_hash_mismatch_and_verify_hook() -> None:
    data = b"hello world"
    r = wire.Reassembler(len(data), max_size=100, sha256=hashlib.sha256(b"other").hexdigest())
    r.add(0, data)
    with pytest.raises(WireError) as info:
        r.finish()
    assert info.value.reason == "hash_mismatch"

    seen: list[bytes] = []
    r = wire.Reassembler(len(data), max_size=100, verify=seen.append)
    r.add(0, data)
    assert r.finish() == data and seen == [data]


def test_stream_with_header_round_trips_through_read_header_stream() -> None:
    data = os.urandom(2500)
    header = pb.BlobHeader(cid="x", size=len(data))
    messages = list(wire.stream_with_header(pb.BlobChunk, header, data, chunk_size=1000))
    assert [m.WhichOneof("part") for m in messages] == ["header", "chunk", "chunk", "chunk"]
    got_header, got = wire.read_header_stream(messages, size_of=lambda h: h.size, max_size=10_000)
    assert got_header == header and got == data

    with pytest.raises(WireError) as info:
        wire.read_header_stream(messages[1:], size_of=lambda h: h.size, max_size=10_000)
    assert info.value.reason == "missing_header"
    with pytest.raises(WireError) as info:
        wire.read_header_stream(messages + messages[:1], size_of=lambda h: h.size, max_size=10_000)
    assert info.value.reason == "unexpected_header"


# ---------------------------------------------------------------- a real server


async def _inline(fn, *args):
    return fn(*args)


class _Servicer(pb_grpc.AgentServiceServicer):
    """Heartbeat's agent_id picks the behaviour; GetModel streams then fails."""

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        match request.agent_id:
            case "invalid":
                raise InvalidInput("agent id has spaces", reason="bad_agent_id")
            case "missing":
                raise NotFound("no such agent")
            case "boom":
                raise RuntimeError("secret-internal-detail")
            case "sleep":
                await asyncio.sleep(1.0)
            case "abort":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "go away")
            case "cancelled":
                await context.abort(grpc.StatusCode.CANCELLED, "server went away")
        return pb.HeartbeatReply(next_interval_s=5.0)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext):
        yield pb.ModelChunk(header=pb.ModelHeader(model_cid="m", weights_size=10))
        raise NotFound("weights vanished", reason="blob_missing")

    async def SubmitUpdate(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.SubmitUpdateReply:
        header, data = await receive_header_stream(
            request_iterator, size_of=lambda h: h.weights_size, max_size=1 << 20, idle_timeout_s=5, offload=_inline
        )
        return pb.SubmitUpdateReply(accepted=True, update_cid=hashlib.sha256(data).hexdigest())


@pytest.fixture
def server():
    handle = create_server("127.0.0.1:0", workers=4, max_message_bytes=64 * 1024)
    pb_grpc.add_AgentServiceServicer_to_server(_Servicer(), handle.server)
    handle.start()
    yield handle
    handle.stop(grace=0)


@pytest.fixture
def stub(server):
    channel = wire.create_channel(server.address, max_message_bytes=256 * 1024)
    yield pb_grpc.AgentServiceStub(channel)
    channel.close()


def _call_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_typed_errors_map_to_status_and_back(stub) -> None:
    e = _call_error(lambda: stub.Heartbeat(pb.HeartbeatRequest(agent_id="invalid"), timeout=5))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "bad_agent_id: agent id has spaces"
    err = wire.error_from_rpc(e)
    assert type(err) is InvalidInput and err.reason == "bad_agent_id" and err.message == "agent id has spaces"
    assert not wire.is_retryable(e)

    e = _call_error(lambda: stub.Heartbeat(pb.HeartbeatRequest(agent_id="missing"), timeout=5))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    err = wire.error_from_rpc(e)
    assert type(err) is NotFound and err.reason == "not_found"


def test_typed_error_in_server_stream_after_first_message(stub) -> None:
    stream = stub.GetModel(pb.GetModelRequest(), timeout=5)
    first = next(stream)
    assert first.header.model_cid == "m"
    e = _call_error(lambda: next(stream))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert wire.error_from_rpc(e).reason == "blob_missing"


def test_client_stream_wire_errors_come_back_as_wire_error(stub) -> None:
    data = os.urandom(5000)
    header = pb.UpdateHeader(agent_id="a", weights_size=len(data))
    ok = stub.SubmitUpdate(wire.stream_with_header(pb.UpdateChunk, header, data, chunk_size=1024), timeout=5)
    assert ok.accepted and ok.update_cid == hashlib.sha256(data).hexdigest()

    messages = list(wire.stream_with_header(pb.UpdateChunk, header, data, chunk_size=1024))
    del messages[2]  # drop a chunk
    e = _call_error(lambda: stub.SubmitUpdate(iter(messages), timeout=5))
    err = wire.error_from_rpc(e)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert type(err) is WireError and err.reason == "out_of_order"
    assert "arrived but 1024 bytes were expected next" in err.message


def test_unexpected_error_is_internal_without_traceback(stub, caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="strata.wire"):
        e = _call_error(lambda: stub.Heartbeat(pb.HeartbeatRequest(agent_id="boom"), timeout=5))
    assert e.code() == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in e.details()
    assert "Traceback" not in e.details() and "RuntimeError" not in e.details()
    assert type(wire.error_from_rpc(e)) is StrataError
    # ...but the server log has it
    assert any(r.exc_info and "secret-internal-detail" in str(r.exc_info[1]) for r in caplog.records)


def test_handler_abort_is_left_alone(stub) -> None:
    e = _call_error(lambda: stub.Heartbeat(pb.HeartbeatRequest(agent_id="abort"), timeout=5))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and e.details() == "go away"
    err = wire.error_from_rpc(e)
    assert err.status == "PERMISSION_DENIED"


def test_message_over_server_limit_is_refused(stub) -> None:
    e = _call_error(lambda: stub.Heartbeat(pb.HeartbeatRequest(agent_id="x" * (100 * 1024)), timeout=5))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not wire.is_retryable(e)  # resending the same oversize message never helps
    assert wire.error_from_rpc(e).reason == "message_too_large"
    # a message under the limit still goes through on the same channel
    assert stub.Heartbeat(pb.HeartbeatRequest(agent_id="x" * 1000), timeout=5).next_interval_s == 5.0


def test_health_check_serving(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        server.set_serving("strata.v1.AgentService", False)
        reply = health.Check(health_pb2.HealthCheckRequest(service="strata.v1.AgentService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_cancelled_is_retried_only_for_an_idempotent_call(stub) -> None:
    e = _call_error(lambda: stub.Heartbeat(pb.HeartbeatRequest(agent_id="cancelled"), timeout=5))
    assert e.code() == grpc.StatusCode.CANCELLED
    assert not wire.is_retryable(e) and wire.is_retryable(e, idempotent=True)
    typed = wire.error_from_rpc(e)
    assert not wire.is_retryable(typed) and wire.is_retryable(typed, idempotent=True)


def test_deadline_exceeded(stub) -> None:
    # the handler sleeps 1 s and then answers OK: only the 0.2 s deadline can end the call this way
    e = _call_error(lambda: stub.Heartbeat(pb.HeartbeatRequest(agent_id="sleep"), timeout=0.2))
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wire.is_retryable(e)
    assert isinstance(wire.error_from_rpc(e), Unavailable)


def test_retry_call_retries_unavailable_with_backoff_then_succeeds(stub) -> None:
    dead = create_server()
    dead_address = dead.address
    dead.stop(grace=0)  # nothing listens on this port any more
    dead_channel = wire.create_channel(dead_address)
    dead_stub = pb_grpc.AgentServiceStub(dead_channel)
    calls: list[str] = []

    def call() -> pb.HeartbeatReply:
        calls.append("call")
        target = dead_stub if len(calls) < 3 else stub
        return target.Heartbeat(pb.HeartbeatRequest(agent_id="ok"), timeout=2)

    delays: list[float] = []
    try:
        reply = retry_call(
            call, policy=RetryPolicy(attempts=5, base_s=0.1, max_s=1.0), retryable=wire.is_retryable,
            sleep=delays.append, rng=lambda: 1.0,
        )
    finally:
        dead_channel.close()
    assert reply.next_interval_s == 5.0
    assert len(calls) == 3
    assert delays == [0.1, 0.2]  # exponential; rng=1.0 takes the top of the jitter range


def test_retry_call_gives_up_after_attempts_and_respects_deadline() -> None:
    dead = create_server()
    address = dead.address
    dead.stop(grace=0)
    with wire.create_channel(address) as channel:
        dead_stub = pb_grpc.AgentServiceStub(channel)
        delays: list[float] = []
        e = _call_error(
            lambda: retry_call(
                lambda: dead_stub.Heartbeat(pb.HeartbeatRequest(), timeout=2),
                policy=RetryPolicy(attempts=4, base_s=1.0, max_s=3.0), retryable=wire.is_retryable,
                sleep=delays.append, rng=lambda: 1.0,
            )
        )
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert delays == [1.0, 2.0, 3.0]  # capped at max_delay_s

        now = [0.0]
        delays.clear()

        def fake_sleep(s: float) -> None:
            delays.append(s)
            now[0] += s

        _call_error(
            lambda: retry_call(
                lambda: dead_stub.Heartbeat(pb.HeartbeatRequest(), timeout=2),
                policy=RetryPolicy(attempts=10, base_s=1.0, max_s=100.0, deadline_s=5.0), retryable=wire.is_retryable,
                sleep=fake_sleep, rng=lambda: 1.0, clock=lambda: now[0],
            )
        )
        assert delays == [1.0, 2.0]  # the next wait (4 s) would end past the 5 s deadline


def test_retry_call_never_retries_invalid_argument(stub) -> None:
    calls: list[int] = []

    def call() -> pb.HeartbeatReply:
        calls.append(1)
        return stub.Heartbeat(pb.HeartbeatRequest(agent_id="invalid"), timeout=5)

    e = _call_error(
        lambda: retry_call(call, policy=RetryPolicy(attempts=5), retryable=wire.is_retryable, sleep=lambda s: None)
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert calls == [1]


def test_server_handle_lifecycle() -> None:
    with create_server() as handle:
        assert handle.port > 0
        handle.start()  # idempotent
    handle.stop()  # idempotent
    with pytest.raises(StrataError):
        handle.start()


def test_bind_failure_is_typed() -> None:
    with create_server() as first:
        with pytest.raises(Unavailable) as info:
            create_server(first.address)
        assert info.value.reason == "bind_failed"


def _self_signed(tmp_path) -> wire.TlsFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return wire.TlsFiles(cert=cert_path, key=key_path)


def test_tls_server_and_channel(tmp_path) -> None:
    tls = _self_signed(tmp_path)
    handle = create_server(tls=tls)
    pb_grpc.add_AgentServiceServicer_to_server(_Servicer(), handle.server)
    with handle:
        with wire.create_channel(handle.address, tls=wire.TlsFiles(ca=tls.cert)) as channel:
            reply = pb_grpc.AgentServiceStub(channel).Heartbeat(pb.HeartbeatRequest(agent_id="ok"), timeout=5)
            assert reply.next_interval_s == 5.0
        # a plaintext client cannot talk to a TLS server
        with wire.create_channel(handle.address) as plain:
            e = _call_error(lambda: pb_grpc.AgentServiceStub(plain).Heartbeat(pb.HeartbeatRequest(), timeout=2))
            assert e.code() == grpc.StatusCode.UNAVAILABLE
