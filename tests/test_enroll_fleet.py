"""Enrollment, renewal and revocation through real daemons: a real fleet CA, real TLS, in-process on 127.0.0.1.

- bootstrap tokens from `strata certs token` buy certificates on the coordinator's TLS-only
  enrollment port: uses are counted, expired and wrong tokens are refused, the secret is
  never stored in clear;
- an agent daemon with nothing but a token enrolls, trains rounds as the identity its
  certificate names, renews before expiry, and its new connections present the new certificate;
- `strata certs revoke` reaches the aggregator (through its lease) and a relay (through its
  home's heartbeat) with no restart: the revoked caller is refused, the others go on;
- `strata agent run` with a bad token exits non-zero with one line.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.client import Client
from agent.config import AgentConfig, EnrollSettings
from agent.daemon import AgentDaemon
from agent.enrollment import Renewer, enroll
from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import ConfigError, StrataError
from proto.wire import REASON_METADATA_KEY, create_channel
from relay.config import RelayConfig, WindowSettings
from relay.daemon import RelayDaemon
from storage.keys import KeyPair
from strata.cli import main as cli_main
from strata.cli_common import EXIT_REFUSED
from strata.wiring import initial_model_factory
from tests.agent_service_contract import wait_until
from tests.procs import run_strata
from trust.bundle import Bundle
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.security import Security, TlsSettings
from trust.tokens import TokenStore

FLEET = "testfleet"


class Fleet:
    """A fleet CA in `root/ca`, and bundles issued by it the way an operator would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_dir = root / "ca"
        self.ca = FleetCA.init(self.ca_dir, FLEET)

    @property
    def ca_pem(self) -> str:
        return str(self.ca_dir / "ca.pem")

    def bundle(self, role: Role, name: str) -> str:
        directory = self.root / "bundles" / f"{role}-{name}"
        hosts = ["localhost", "127.0.0.1"] if role in (Role.AGGREGATOR, Role.COORDINATOR, Role.RELAY) else []
        self.ca.issue(Identity(role, name), KeyPair.generate(), hosts=hosts).write(directory)
        return str(directory)

    def token(self, capsys: pytest.CaptureFixture[str], *, uses: int = 1, ttl: str = "1h") -> str:
        """A bootstrap token, made as an operator makes it: `strata certs token`."""
        capsys.readouterr()
        assert cli_main(["certs", "token", "--dir", str(self.ca_dir), "--uses", str(uses), "--ttl", ttl, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["token"]

    def revoke(self, target: str) -> None:
        assert cli_main(["certs", "revoke", target, "--dir", str(self.ca_dir)]) == 0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.ca.close()


def _coordinator(fleet: Fleet, tmp_path: Path, **settings: Any) -> CoordinatorDaemon:
    return CoordinatorDaemon(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "coord"),
            tls=TlsSettings(bundle=fleet.bundle(Role.COORDINATOR, "coord")),
            ca_dir=str(fleet.ca_dir),
            enroll_listen="127.0.0.1:0",
            **settings,
        )
    ).start()


def _aggregator(fleet: Fleet, tmp_path: Path, coordinator: str, **settings: Any) -> AggregatorDaemon:
    config = AggregatorConfig(
        id="agg-a",
        listen="127.0.0.1:0",
        coordinator=coordinator,
        state_dir=str(tmp_path / "agg"),
        store=str(tmp_path / "store"),
        synthesis=SynthesisSettings(enabled=False),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        tls=TlsSettings(bundle=fleet.bundle(Role.AGGREGATOR, "agg-a")),
        **settings,
    )
    return AggregatorDaemon(config, initial_model_factory=initial_model_factory(config))


def _refusal(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    reason = dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")
    return error.code(), reason


# ---------------------------------------------------------------- tokens


def test_tokens_buy_certificates_counted_expiring_and_never_stored_in_clear(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coordinator = _coordinator(fleet, tmp_path)
    try:
        token = fleet.token(capsys, uses=2)
        settings = EnrollSettings(coordinator=coordinator.enroll_address, token=token, ca=fleet.ca_pem)

        # two uses: two devices enroll, each as the id it asked for, with a bundle that checks out
        for name in ("dev-1", "dev-2"):
            bundle = enroll(settings, tmp_path / name, requested_id=name)
            assert bundle.identity == Identity(Role.AGENT, name)
            assert Bundle.load(tmp_path / name).certified.serial == bundle.certified.serial
            assert fleet.ca.verify(bundle.cert_pem).identity == bundle.identity

        # the third use is refused, and nothing is written
        with pytest.raises(StrataError) as info:
            enroll(settings, tmp_path / "dev-3", requested_id="dev-3")
        assert (info.value.status, info.value.reason) == ("UNAUTHENTICATED", "token_used_up")
        assert not (tmp_path / "dev-3" / "cert.pem").exists()
        with TokenStore(fleet.ca_dir / "tokens.db", readonly=True) as tokens:
            assert [(t.uses, t.max_uses) for t in tokens.list()] == [(2, 2)]

        # an expired token (made two hours ago with one hour to live)
        with TokenStore(fleet.ca_dir / "tokens.db", clock=lambda: time.time() - 7200) as tokens:
            expired = tokens.create(ttl_s=3600)
        with pytest.raises(StrataError) as info:
            enroll(EnrollSettings(**{**settings.__dict__, "token": expired}), tmp_path / "late", requested_id="late")
        assert (info.value.status, info.value.reason) == ("UNAUTHENTICATED", "token_expired")

        # the right id with the wrong secret
        wrong = token.split(".")[0] + "." + "0" * 16
        assert wrong != token
        with pytest.raises(StrataError) as info:
            enroll(EnrollSettings(**{**settings.__dict__, "token": wrong}), tmp_path / "guess", requested_id="guess")
        assert (info.value.status, info.value.reason) == ("UNAUTHENTICATED", "token_bad_secret")

        # the token database holds the secret's SHA-256, never the secret
        secret = token.split(".")[1]
        with sqlite3.connect(f"file:{fleet.ca_dir / 'tokens.db'}?mode=ro", uri=True) as db:
            stored = db.execute("SELECT secret_sha256 FROM tokens WHERE id = ?", (token.split(".")[0],)).fetchone()[0]
        assert stored == hashlib.sha256(secret.encode()).hexdigest()
        for path in fleet.ca_dir.iterdir():  # the database, its WAL, everything the CA keeps
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path

        # the enrollment port speaks TLS only, and serves nothing but Enroll to callers without certificates
        with create_channel(coordinator.enroll_address) as plain, pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.CoordinatorServiceStub(plain).Enroll(pb.EnrollRequest(token=token), timeout=5)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(root_certificates=(fleet.ca_dir / "ca.pem").read_bytes())
        with create_channel(coordinator.enroll_address, credentials=credentials) as channel, pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.CoordinatorServiceStub(channel).FleetStatus(pb.FleetStatusRequest(), timeout=5)
        assert _refusal(rpc.value) == (grpc.StatusCode.UNAUTHENTICATED, "no_certificate")
        # and a token holder cannot reach the mutual-TLS port at all
        with create_channel(coordinator.address, credentials=credentials) as channel, pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.CoordinatorServiceStub(channel).Enroll(pb.EnrollRequest(token=token), timeout=5)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        coordinator.stop()


def test_renewal_is_for_the_callers_own_valid_unrevoked_identity(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coordinator = _coordinator(fleet, tmp_path)
    try:
        settings = EnrollSettings(coordinator=coordinator.enroll_address, token=fleet.token(capsys), ca=fleet.ca_pem)
        first = enroll(settings, tmp_path / "dev", requested_id="dev-1")
        security = Security(str(tmp_path / "dev"))
        renewer = Renewer(security.bundle, address=coordinator.address, channel_factory=security.channel)
        renewed = renewer.renew_now()
        assert renewed.identity == first.identity and renewed.certified.serial != first.certified.serial
        assert security.bundle.current().certified.serial == renewed.certified.serial

        # only agents renew this way (daemons' bundles are re-issued by their operator)
        aggregator = Security(fleet.bundle(Role.AGGREGATOR, "agg-x"))
        with aggregator.channel(coordinator.address) as channel, pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.CoordinatorServiceStub(channel).Renew(pb.RenewRequest(), timeout=5)
        assert _refusal(rpc.value) == (grpc.StatusCode.PERMISSION_DENIED, "role_not_allowed")

        # a revoked identity renews no more: the coordinator enforces the CA directory's list itself
        fleet.revoke("agent/dev-1")
        wait_until(lambda: coordinator.security.revocations_version == 1, 5, "the coordinator to enforce the list")
        with pytest.raises(StrataError) as info:
            renewer.renew_now()
        assert (info.value.status, info.value.reason) == ("PERMISSION_DENIED", "revoked")
        # nor enrolls again with a fresh token
        with pytest.raises(StrataError) as info:
            enroll(EnrollSettings(**{**settings.__dict__, "token": fleet.token(capsys)}), tmp_path / "again", requested_id="dev-1")
        assert (info.value.status, info.value.reason) == ("PERMISSION_DENIED", "revoked")
    finally:
        coordinator.stop()


def test_a_coordinator_refuses_a_ca_dir_its_own_bundle_does_not_trust(fleet: Fleet, tmp_path: Path) -> None:
    with FleetCA.init(tmp_path / "other-ca", FLEET) as other:
        other_dir = other.directory
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "coord"),
        tls=TlsSettings(bundle=fleet.bundle(Role.COORDINATOR, "coord")),
        ca_dir=str(other_dir),
        enroll_listen="127.0.0.1:0",
    )
    with pytest.raises(ConfigError, match="another CA"):
        CoordinatorDaemon(config).start()


# ---------------------------------------------------------------- an enrolled agent


class Nudge:
    """A trainer that moves every weight a little, slowly enough that rounds do not spin."""

    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any]) -> tuple[dict, int, dict]:
        time.sleep(0.3)
        return {k: v + np.float32(0.01) for k, v in weights.items()}, 10, {"loss": 0.5}


def test_an_enrolled_agent_trains_renews_and_dials_with_its_new_certificate(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # agent certificates live 6 s, so the agent renews about 4 s after it enrolled
    coordinator = _coordinator(fleet, tmp_path, enroll_validity_s=6.0)
    aggregator = _aggregator(
        fleet, tmp_path, coordinator.address, round=RoundSettings(quorum=1.0, min_updates=1, deadline_s=600.0)
    )
    # which certificate each call to the aggregator presented
    presented: list[tuple[str, str]] = []
    authorize = aggregator.security.interceptor.authorize

    def recording(method: str, auth_context: Mapping[str, Any]) -> Any:
        certified = authorize(method, auth_context)
        if certified is not None:
            presented.append((certified.identity.id, certified.serial))
        return certified

    aggregator.security.interceptor.authorize = recording  # type: ignore[method-assign]
    aggregator.start()
    bundle_dir = tmp_path / "agent-bundle"
    daemon = AgentDaemon(
        AgentConfig(
            seeds=[aggregator.address],
            state_dir=str(tmp_path / "agent-state"),
            tls=TlsSettings(bundle=str(bundle_dir)),
            enroll=EnrollSettings(coordinator=coordinator.enroll_address, token=fleet.token(capsys), ca=fleet.ca_pem),
            start_jitter_s=0.0,
            rpc_timeout_s=5.0,
            join_timeout_s=30.0,
            backoff_base_s=0.1,
            backoff_max_s=1.0,
        ),
        trainer=Nudge(),
    )
    runner = threading.Thread(target=daemon.run, daemon=True)
    try:
        runner.start()
        wait_until(lambda: daemon.rounds_done >= 1, 30, "the enrolled agent to train a round")
        first = Bundle.load(bundle_dir)
        agent_id = first.identity.id
        assert first.identity.role is Role.AGENT and daemon.client.agent_id == agent_id
        assert agent_id in {u.agent_id for u in aggregator.journal.iter_all_updates()}
        assert (agent_id, first.certified.serial) in presented
        assert json.loads((bundle_dir / "enrollment.json").read_text())["renew_address"] == coordinator.address

        # renewal: a new TLS key and certificate for the same identity and manifest key
        wait_until(lambda: daemon.renewer is not None and daemon.renewer.renewals >= 1, 20, "a renewal")
        renewed = Bundle.load(bundle_dir)
        assert renewed.identity == first.identity
        assert renewed.certified.serial != first.certified.serial
        assert renewed.key_pem != first.key_pem
        assert renewed.certified.manifest_key == first.certified.manifest_key
        serials = {b.serial for b in (i.certified for i in fleet.ca.issued(first.identity))}
        assert {first.certified.serial, renewed.certified.serial} <= serials

        # new connections present the new certificate, and the agent trains on past the first one's expiry
        wait_until(lambda: (agent_id, renewed.certified.serial) in presented, 10, "a call with the new certificate")
        wait_until(lambda: time.time() > first.certified.not_after + 0.5, 10, "the first certificate to expire")
        rounds = daemon.rounds_done
        wait_until(lambda: daemon.rounds_done > rounds, 20, "a round after the first certificate expired")
    finally:
        daemon.stop()
        runner.join(timeout=15)
        aggregator.stop()
        coordinator.stop()


# ---------------------------------------------------------------- revocation


def _agent(fleet: Fleet, name: str, seeds: list[str]) -> tuple[Client, Security]:
    security = Security(fleet.bundle(Role.AGENT, name))
    client = Client(seeds, agent_id=name, key=security.manifest_key, channel_factory=security.channel, join_timeout_s=30)
    return client, security


def _train(client: Client) -> dict[str, np.ndarray]:
    weights = client.wait_for_model(timeout=30)
    client.submit({k: v + np.float32(0.01) for k, v in weights.items()}, 10)
    return weights


def test_a_revoked_agent_is_refused_within_a_heartbeat_and_the_others_go_on(fleet: Fleet, tmp_path: Path) -> None:
    heartbeat_s = 1.0
    coordinator = _coordinator(fleet, tmp_path, heartbeat_interval_s=heartbeat_s, lease_ttl_s=4.0)
    aggregator = _aggregator(
        fleet,
        tmp_path,
        coordinator.address,
        # rounds close on whatever arrived within 2 s: a revoked agent does not hold them up
        round=RoundSettings(quorum=1.0, min_updates=1, deadline_s=2.0),
    ).start()
    relay = RelayDaemon(
        RelayConfig(
            id="relay-1",
            seeds=[aggregator.address],
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "relay"),
            window=WindowSettings(max_devices=1, max_wait_s=600.0),
            tls=TlsSettings(bundle=fleet.bundle(Role.RELAY, "relay-1")),
        )
    ).start()
    clients: list[Client] = []
    try:
        wait_until(lambda: len(coordinator.membership.ring()) == 1, 20, "the aggregator to register")
        (alice, _), (bob, bob_security) = _agent(fleet, "alice", [aggregator.address]), _agent(fleet, "bob", [aggregator.address])
        dave, dave_security = _agent(fleet, "dave", [relay.address])
        clients += [alice.connect(), bob.connect(), dave.connect()]
        held = {client.agent_id: _train(client) for client in clients}
        wait_until(lambda: aggregator.rounds.current.round >= 1, 30, "a round with everyone in it")
        bob_channel = bob_security.channel(aggregator.address)
        watch = pb_grpc.AgentServiceStub(bob_channel).WatchModels(pb.WatchModelsRequest(agent_id="bob"), timeout=60)
        next(watch)  # a stream admitted before the revocation

        # bob is revoked while he is submitting; the aggregator hears of it through its lease
        revoked_at = time.monotonic()
        fleet.revoke("agent/bob")
        wait_until(lambda: aggregator.security.revocations_version == 1, 10, "the aggregator to enforce the list")
        assert time.monotonic() - revoked_at < heartbeat_s + 1.0
        # his next call is refused
        with pytest.raises(StrataError) as info:
            bob.submit({k: v + np.float32(0.02) for k, v in held["bob"].items()}, 10)
        assert (info.value.status, info.value.reason) == ("PERMISSION_DENIED", "revoked")
        with pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.AgentServiceStub(bob_channel).Join(pb.JoinRequest(agent_id="bob"), timeout=5)
        assert _refusal(rpc.value) == (grpc.StatusCode.PERMISSION_DENIED, "revoked")
        # kept for the next start
        assert (tmp_path / "agg" / "revocations.json").is_file()

        # alice goes on: her next round closes; bob's open watch stream ends at its next event
        round_now = aggregator.rounds.current.round
        _train(alice)
        wait_until(lambda: aggregator.rounds.current.round > round_now, 30, "alice's next round")
        with pytest.raises(grpc.RpcError) as rpc:
            for _ in watch:
                pass
        assert _refusal(rpc.value) == (grpc.StatusCode.PERMISSION_DENIED, "revoked")
        bob_channel.close()

        # dave, behind the relay: the relay hears of the list through its home's heartbeat
        revoked_at = time.monotonic()
        fleet.revoke("agent/dave")
        wait_until(lambda: relay.security.revocations_version == 2, 15, "the relay to enforce the list")
        assert time.monotonic() - revoked_at < heartbeat_s + 0.5 + 2.0  # the lease, then the home's heartbeat
        with dave_security.channel(relay.address) as channel, pytest.raises(grpc.RpcError) as rpc:
            pb_grpc.AgentServiceStub(channel).Heartbeat(pb.HeartbeatRequest(agent_id="dave"), timeout=5)
        assert _refusal(rpc.value) == (grpc.StatusCode.PERMISSION_DENIED, "revoked")
        # the relay itself still reaches its home, and alice still trains
        assert relay.client.revocations(0) is not None
        round_now = aggregator.rounds.current.round
        _train(alice)
        wait_until(lambda: aggregator.rounds.current.round > round_now, 30, "alice's round after dave's revocation")
    finally:
        for client in clients:
            client.close()
        relay.stop()
        aggregator.stop()
        coordinator.stop()


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_strata_agent_run_with_a_bad_token_exits_with_one_line(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coordinator = _coordinator(fleet, tmp_path)
    try:
        token = fleet.token(capsys)
        cases = {
            "token_bad_secret": token.split(".")[0] + "." + "1" * 16,
            "token_unknown": "zzzzzz." + "1" * 16,
        }
        for reason, bad in cases.items():
            result = run_strata(
                "agent", "run",
                "--set", f"enroll.coordinator={coordinator.enroll_address}",
                "--set", f"enroll.token={bad}",
                "--set", f"enroll.ca={fleet.ca_pem}",
                "--set", f"tls.bundle={tmp_path / 'bundle'}",
                "--set", "seeds=127.0.0.1:1",
                home=tmp_path / "home",
                timeout=60,
            )  # fmt: skip
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == EXIT_REFUSED, result.stderr
            assert len(lines) == 1 and lines[0].startswith("strata: ") and f"[{reason}]" in lines[0], result.stderr
            assert "Traceback" not in result.stderr
            assert not (tmp_path / "bundle" / "cert.pem").exists()
    finally:
        coordinator.stop()
