"""Hot reload: a grpc.aio server on ReloadingBundle's dynamic credentials serves a renewed certificate without a restart.

Which certificate the server presents is visible from the client through host names:
each renewal changes the hosts the certificate names, and a client connecting by a
name the served certificate lacks fails its handshake.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto.serving import run_on_loop
from proto.wire import TlsFiles, create_channel
from storage.keys import KeyPair
from trust.bundle import CERT_FILE, KEY_FILE, Bundle, ReloadingBundle
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.interceptor import TrustInterceptor

SERVER = Identity(Role.AGGREGATOR, "a1")


@pytest.fixture
def ca(tmp_path) -> FleetCA:
    with FleetCA.init(tmp_path / "ca", "demo") as ca:
        yield ca


def _renew(ca: FleetCA, directory: Path, hosts: list[str]) -> Bundle:
    """What `strata certs issue` does to an existing bundle: same identity and manifest key, new TLS key."""
    return ca.issue(SERVER, KeyPair.load(directory / "manifest.key"), hosts=hosts)


def _replace(path: Path, data: bytes) -> None:
    """Replace one file the way renewals do (a new file renamed over the old), mode 0600."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.chmod(temp, 0o600)
    os.replace(temp, path)


class ReloadingServer:
    """A bare grpc.aio server (health only, plus the trust interceptor) on the dynamic credentials."""

    def __init__(self, bundle: ReloadingBundle) -> None:
        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(interceptors=[TrustInterceptor.for_bundle(bundle.current())])
            servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            port = server.add_secure_port("127.0.0.1:0", bundle.server_credentials())
            await server.start()
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            return server, port

        self.server, self.port = run_on_loop(start())

    def stop(self) -> None:
        run_on_loop(self.server.stop(None))


def _reaches(port: int, host: str, client: Bundle) -> bool:
    files = client.tls_files()
    # a private subchannel pool: every attempt is a new connection, so a new handshake
    with create_channel(f"{host}:{port}", tls=files, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return True
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            return False


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, ca: FleetCA) -> None:
    server_dir = tmp_path / "server"
    ca.issue(SERVER, KeyPair.generate(), hosts=["127.0.0.1"]).write(server_dir)
    client = ca.issue(Identity(Role.AGGREGATOR, "a2"), KeyPair.generate(), hosts=["localhost"]).write(tmp_path / "client")
    reloading = ReloadingBundle(server_dir)
    server = ReloadingServer(reloading)
    try:
        assert _reaches(server.port, "127.0.0.1", client)
        assert not _reaches(server.port, "localhost", client)

        _renew(ca, server_dir, ["localhost"]).write(server_dir)
        assert _reaches(server.port, "localhost", client)
        assert not _reaches(server.port, "127.0.0.1", client)
        assert reloading.generation == 1

        # a renewal caught half-written (new key, old certificate) keeps the last good pair in service
        third = _renew(ca, server_dir, ["127.0.0.1"])
        _replace(server_dir / KEY_FILE, third.key_pem)
        assert _reaches(server.port, "localhost", client)
        _replace(server_dir / CERT_FILE, third.cert_pem)
        assert _reaches(server.port, "127.0.0.1", client)
        assert not _reaches(server.port, "localhost", client)
        assert reloading.generation == 2
        assert reloading.identity == SERVER
    finally:
        server.stop()


def test_current_keeps_the_last_good_bundle_and_logs_once(tmp_path, ca: FleetCA, caplog) -> None:
    directory = tmp_path / "b"
    first = ca.issue(SERVER, KeyPair.generate(), hosts=["localhost"]).write(directory)
    reloading = ReloadingBundle(directory)
    assert reloading.current().certified.serial == first.certified.serial
    caplog.set_level(logging.WARNING, logger="strata.trust")
    _replace(directory / CERT_FILE, b"garbage")
    for _ in range(3):
        assert reloading.current().certified.serial == first.certified.serial
    assert [r.getMessage() for r in caplog.records].count("bundle_reload_failed") == 1
    renewed = _renew(ca, directory, ["localhost"]).write(directory)
    assert reloading.current().certified.serial == renewed.certified.serial
    assert reloading.generation == 1


def test_clients_build_channels_from_the_current_files(tmp_path, ca: FleetCA) -> None:
    directory = tmp_path / "b"
    ca.issue(SERVER, KeyPair.generate(), hosts=["localhost"]).write(directory)
    reloading = ReloadingBundle(directory)
    assert isinstance(reloading.channel_credentials(), grpc.ChannelCredentials)
    assert reloading.tls_files() == TlsFiles(cert=directory / "cert.pem", key=directory / "key.pem", ca=directory / "ca.pem")
