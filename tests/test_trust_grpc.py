"""Trust on the wire: mTLS with certificates the fleet CA issued, and the interceptor on a real grpc.aio server.

One server (proto.serving.create_server, so ErrorInterceptor stays outermost) with the
TrustInterceptor, serving a tiny AgentService and PeerService that answer with
`caller()`. It listens twice: an mTLS port (client certificates required) and a
TLS-only port, the shape enrollment and probes need (gRPC Python cannot ask for an
optional client certificate: without require_client_auth it asks for none).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import serving
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import IntegrityError
from proto.serving import ServerHandle, create_server, run_on_loop
from proto.wire import REASON_METADATA_KEY, TlsFiles, create_channel, error_from_rpc
from storage.keys import KeyPair
from tests.test_trust_identity import _cert  # a self-signed certificate with chosen SAN URIs
from trust.bundle import Bundle
from trust.ca import FleetCA
from trust.errors import PermissionDenied, Unauthenticated
from trust.identity import Identity, Role
from trust.interceptor import TrustInterceptor, caller, caller_certificate

TIMEOUT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _who() -> str:
    identity = caller()
    return "nobody" if identity is None else str(identity)


class TinyAgentService(pb_grpc.AgentServiceServicer):
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        return pb.JoinReply(home=pb.Home(aggregator_id=_who()))

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        certificate = caller_certificate()
        return pb.HeartbeatReply(current_base=pb.ModelRef(model_cid=_who(), weights_cid=certificate.manifest_key if certificate else ""))

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdateChunk], context: grpc.aio.ServicerContext
    ) -> pb.SubmitUpdateReply:
        count = 0
        async for _ in request_iterator:
            count += 1
        return pb.SubmitUpdateReply(accepted=True, message=f"{_who()} sent {count}")

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelEvent]:
        for _ in range(2):
            yield pb.ModelEvent(new_base=pb.ModelRef(model_cid=_who()))


class TinyPeerService(pb_grpc.PeerServiceServicer):
    async def GetLatest(self, request: pb.LatestRequest, context: grpc.aio.ServicerContext) -> pb.LatestReply:
        return pb.LatestReply(aggregator_id=_who())


class Fleet:
    """A CA, bundles for every role, a server with the interceptor, and channels as anyone."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = FleetCA.init(root / "ca", "demo")
        self.bundles: dict[str, Bundle] = {}
        for role, id_ in [
            (Role.AGGREGATOR, "a1"),
            (Role.AGGREGATOR, "a2"),
            (Role.AGENT, "d1"),
            (Role.AGENT, "d-revoked"),
            (Role.AGENT, "d-serial"),
            (Role.RELAY, "r1"),
            (Role.OPERATOR, "ops"),
            (Role.AUDIT, "aud"),
        ]:
            self.bundle(role, id_)
        self.clock = Clock()
        self.interceptor = TrustInterceptor.for_bundle(self.bundles["aggregator/a1"], clock=self.clock)
        server_bundle = self.bundles["aggregator/a1"]
        self.handle: ServerHandle = create_server(interceptors=[self.interceptor], tls=server_bundle.tls_files())
        pb_grpc.add_AgentServiceServicer_to_server(TinyAgentService(), self.handle.server)
        pb_grpc.add_PeerServiceServicer_to_server(TinyPeerService(), self.handle.server)

        async def open_port() -> int:
            return self.handle.server.add_secure_port("127.0.0.1:0", server_bundle.server_credentials(require_client_auth=False))

        self.open_port = run_on_loop(open_port())
        self.handle.start()

    def bundle(self, role: Role, id_: str, *, ca: FleetCA | None = None) -> Bundle:
        ca = ca or self.ca
        hosts = ["localhost", "127.0.0.1"] if role in (Role.AGGREGATOR, Role.RELAY, Role.COORDINATOR) else []
        directory = self.root / f"{ca.directory.name}-{role.value}-{id_}"
        bundle = ca.issue(Identity(role, id_), KeyPair.generate(), hosts=hosts).write(directory)
        if ca is self.ca:
            self.bundles[f"{role.value}/{id_}"] = bundle
        return bundle

    def channel(self, who: str | Bundle | None, *, host: str = "localhost", open_port: bool = False) -> grpc.Channel:
        port = self.open_port if open_port else self.handle.port
        ca_pem = self.bundles["aggregator/a1"].tls_files().ca
        if who is None:
            tls = TlsFiles(ca=ca_pem)
        else:
            bundle = who if isinstance(who, Bundle) else self.bundles[who]
            tls = TlsFiles(cert=bundle.tls_files().cert, key=bundle.tls_files().key, ca=ca_pem)
        return create_channel(f"{host}:{port}", tls=tls, options=[("grpc.use_local_subchannel_pool", 1)])

    def close(self) -> None:
        self.handle.stop(grace=None)
        self.ca.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    fleet = Fleet(tmp_path_factory.mktemp("trust-grpc"))
    yield fleet
    fleet.close()


def _join(channel: grpc.Channel, agent_id: str = "", *, wait: bool = True) -> str:
    """Join; `wait` rides out a connection that is still coming up (only a failing handshake wants it off)."""
    stub = pb_grpc.AgentServiceStub(channel)
    return stub.Join(pb.JoinRequest(agent_id=agent_id), timeout=TIMEOUT_S, wait_for_ready=wait).home.aggregator_id


def _refusal(call) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    reason = dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY)
    return error.code(), reason


# ---------------------------------------------------------------- mTLS


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_mtls_end_to_end_with_certificates_the_ca_issued(fleet: Fleet, host: str) -> None:
    with fleet.channel("agent/d1", host=host) as channel:
        assert _join(channel, "d1") == "agent/d1"


def test_a_client_certificate_from_another_ca_is_refused_by_the_handshake(fleet: Fleet, tmp_path) -> None:
    with FleetCA.init(tmp_path / "rogue", "demo") as rogue:
        stranger = fleet.bundle(Role.AGENT, "d1", ca=rogue)  # same fleet name, same identity: wrong CA
    with fleet.channel(stranger) as channel:
        code, _ = _refusal(lambda: _join(channel, "d1", wait=False))
    assert code == grpc.StatusCode.UNAVAILABLE  # no TLS session, so no RPC at all


def test_a_client_that_does_not_trust_the_fleet_ca_does_not_connect(fleet: Fleet, tmp_path) -> None:
    with FleetCA.init(tmp_path / "rogue", "demo") as rogue:
        rogue_ca = rogue.directory / "ca.pem"
    agent = fleet.bundles["agent/d1"].tls_files()
    tls = TlsFiles(cert=agent.cert, key=agent.key, ca=rogue_ca)
    with create_channel(f"localhost:{fleet.handle.port}", tls=tls, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        code, _ = _refusal(lambda: _join(channel, "d1", wait=False))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_an_agent_certificate_cannot_serve(fleet: Fleet) -> None:
    """Agents get clientAuth only; BoringSSL refuses such a certificate as a server's."""
    agent = fleet.bundles["agent/d1"]
    with create_server(tls=agent.tls_files()) as handle:
        tls = TlsFiles(cert=fleet.bundles["relay/r1"].tls_files().cert, key=fleet.bundles["relay/r1"].tls_files().key, ca=agent.tls_files().ca)
        with create_channel(f"127.0.0.1:{handle.port}", tls=tls, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            code, _ = _refusal(lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_the_mtls_port_refuses_callers_without_a_certificate(fleet: Fleet) -> None:
    with fleet.channel(None) as channel:
        code, _ = _refusal(lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- the interceptor matrix


def test_no_certificate_is_unauthenticated_but_probes_pass(fleet: Fleet) -> None:
    with fleet.channel(None, open_port=True) as channel:
        code, reason = _refusal(lambda: _join(channel, "d1"))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "no_certificate")
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_wrong_role_is_permission_denied(fleet: Fleet) -> None:
    with fleet.channel("operator/ops") as channel:
        assert _refusal(lambda: _join(channel, "ops")) == (grpc.StatusCode.PERMISSION_DENIED, "role_not_allowed")
    with fleet.channel("agent/d1") as channel:
        stub = pb_grpc.PeerServiceStub(channel)
        assert _refusal(lambda: stub.GetLatest(pb.LatestRequest(), timeout=TIMEOUT_S)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "role_not_allowed",
        )


def test_the_right_role_passes_and_the_handler_sees_the_caller(fleet: Fleet) -> None:
    with fleet.channel("relay/r1") as channel:  # a relay is an agent upstream
        assert _join(channel, "r1") == "relay/r1"
    with fleet.channel("aggregator/a2") as channel:
        assert pb_grpc.PeerServiceStub(channel).GetLatest(pb.LatestRequest(), timeout=TIMEOUT_S).aggregator_id == "aggregator/a2"
    with fleet.channel("agent/d1") as channel:
        reply = pb_grpc.AgentServiceStub(channel).Heartbeat(pb.HeartbeatRequest(agent_id="d1"), timeout=TIMEOUT_S)
        assert reply.current_base.model_cid == "agent/d1"
        # the certified manifest key reaches the handler too (manifests must be signed by it)
        assert reply.current_base.weights_cid == fleet.bundles["agent/d1"].manifest_key.public_key


def test_every_rpc_shape_carries_the_caller(fleet: Fleet) -> None:
    with fleet.channel("agent/d1") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        events = list(stub.WatchModels(pb.WatchModelsRequest(agent_id="d1"), timeout=TIMEOUT_S))
        assert [e.new_base.model_cid for e in events] == ["agent/d1", "agent/d1"]
        chunks = [pb.UpdateChunk(header=pb.UpdateHeader(agent_id="d1")), pb.UpdateChunk(chunk=pb.Chunk(offset=0, data=b"x"))]
        assert stub.SubmitUpdate(iter(chunks), timeout=TIMEOUT_S).message == "agent/d1 sent 2"


def test_an_id_in_a_message_must_be_the_callers_own(fleet: Fleet) -> None:
    with fleet.channel("agent/d1") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        assert _refusal(lambda: _join(channel, "d2")) == (grpc.StatusCode.PERMISSION_DENIED, "not_own_id")
        forged = [pb.UpdateChunk(header=pb.UpdateHeader(agent_id="d2")), pb.UpdateChunk(chunk=pb.Chunk(offset=0, data=b"x"))]
        assert _refusal(lambda: stub.SubmitUpdate(iter(forged), timeout=TIMEOUT_S)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "not_own_id",
        )
        events = stub.WatchModels(pb.WatchModelsRequest(agent_id="d2"), timeout=TIMEOUT_S)
        assert _refusal(lambda: list(events)) == (grpc.StatusCode.PERMISSION_DENIED, "not_own_id")
        assert _join(channel, "") == "agent/d1"  # an empty id claims no one; the handler decides


def test_revoked_identities_and_serials_are_permission_denied(fleet: Fleet) -> None:
    with fleet.channel("agent/d-revoked") as revoked, fleet.channel("agent/d-serial") as by_serial, fleet.channel("agent/d1") as fine:
        assert _join(revoked, "d-revoked") == "agent/d-revoked"
        assert fleet.interceptor.set_revocations(fleet.ca.revoke(identities=[Identity(Role.AGENT, "d-revoked")]))
        # the connection is already open: revocation applies to the next call on it
        assert _refusal(lambda: _join(revoked, "d-revoked")) == (grpc.StatusCode.PERMISSION_DENIED, "revoked")
        assert _join(by_serial, "d-serial") == "agent/d-serial"
        older = fleet.ca.revocations()
        newer = fleet.ca.revoke(serials=[fleet.bundles["agent/d-serial"].certified.serial])
        assert fleet.interceptor.set_revocations(newer)
        assert not fleet.interceptor.set_revocations(older)  # no replay of an older list
        assert _refusal(lambda: _join(by_serial, "d-serial")) == (grpc.StatusCode.PERMISSION_DENIED, "revoked")
        assert _join(fine, "d1") == "agent/d1"
        # revoked callers can still probe, anonymously
        reply = health_pb2_grpc.HealthStub(revoked).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_certificate_that_expires_mid_connection_is_unauthenticated(fleet: Fleet) -> None:
    with fleet.channel("audit/aud") as channel:
        stub = pb_grpc.PeerServiceStub(channel)
        # audit may not GetLatest (only FetchBlob): PERMISSION_DENIED while valid ...
        assert _refusal(lambda: stub.GetLatest(pb.LatestRequest(), timeout=TIMEOUT_S))[0] == grpc.StatusCode.PERMISSION_DENIED
        fleet.clock.offset = timedelta(days=400).total_seconds()
        try:
            # ... and UNAUTHENTICATED once its certificate has expired, before any role check
            assert _refusal(lambda: stub.GetLatest(pb.LatestRequest(), timeout=TIMEOUT_S)) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "certificate_expired",
            )
        finally:
            fleet.clock.offset = 0.0


def test_refusals_become_typed_errors_on_the_client(fleet: Fleet) -> None:
    with fleet.channel("operator/ops") as channel:
        with pytest.raises(grpc.RpcError) as info:
            _join(channel, "ops")
    error = error_from_rpc(info.value)
    assert (error.status, error.reason) == ("PERMISSION_DENIED", "role_not_allowed")
    assert "operator" in error.message


def test_a_revocation_list_from_another_ca_is_refused(fleet: Fleet, tmp_path) -> None:
    with FleetCA.init(tmp_path / "rogue", "demo") as rogue:
        forged = rogue.revoke(identities=[Identity(Role.AGENT, "d1")])
    version = fleet.interceptor.revocations.version if fleet.interceptor.revocations else None
    with pytest.raises(IntegrityError):
        fleet.interceptor.set_revocations(forged)
    assert (fleet.interceptor.revocations.version if fleet.interceptor.revocations else None) == version


def test_refusals_log_one_line_per_method_and_reason(fleet: Fleet, caplog, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="strata.serving")
    # the limiter is process-wide: start from a clean slate, whatever earlier tests in this process refused
    monkeypatch.setattr(serving._log_refusal, "_last", {})
    with fleet.channel("relay/r1") as channel:
        stub = pb_grpc.PeerServiceStub(channel)
        for _ in range(3):
            assert _refusal(lambda: stub.Announce(pb.ClusterPointer(producer="r1"), timeout=TIMEOUT_S))[0] == grpc.StatusCode.PERMISSION_DENIED
    lines = [r for r in caplog.records if r.getMessage() == "rpc_refused" and r.fields.get("method") == "/strata.v1.PeerService/Announce"]
    assert len(lines) == 1
    assert lines[0].fields["reason"] == "role_not_allowed" and "relay/r1" in lines[0].fields["error"]


# ---------------------------------------------------------------- decisions without the wire


def _context(pem: bytes | None) -> dict[str, list[bytes]]:
    return {"x509_pem_cert": [pem]} if pem else {}


def test_authorize_fails_closed_on_methods_outside_the_table(fleet: Fleet) -> None:
    with pytest.raises(PermissionDenied) as info:
        fleet.interceptor.authorize("/strata.v1.AgentService/Unlisted", _context(fleet.bundles["agent/d1"].cert_pem))
    assert info.value.reason == "not_in_role_table"


def test_authorize_refuses_certificates_without_a_strata_identity(fleet: Fleet) -> None:


    pem = _cert(uris=["https://example.com"]).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(Unauthenticated) as info:
        fleet.interceptor.authorize("/strata.v1.AgentService/Join", _context(pem))
    assert info.value.reason == "no_identity"
    # on a public method the same caller is simply anonymous
    assert fleet.interceptor.authorize("/grpc.health.v1.Health/Check", _context(pem)) is None
    assert fleet.interceptor.authorize("/strata.v1.CoordinatorService/Enroll", _context(None)) is None
    certified = fleet.interceptor.authorize("/strata.v1.CoordinatorService/Enroll", _context(fleet.bundles["agent/d1"].cert_pem))
    assert certified is not None and certified.identity == Identity(Role.AGENT, "d1")  # renewal knows its caller
