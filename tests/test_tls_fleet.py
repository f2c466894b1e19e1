"""A fleet under mutual TLS with real certificates from a real fleet CA: coordinator, aggregator, relay and
agents in-process on 127.0.0.1. A round closes through the relay; strangers and impostors are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from agent.client import Client
from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import create_channel
from relay.config import RelayConfig, WindowSettings
from relay.daemon import RelayDaemon
from storage.keys import KeyPair
from strata.cli import main as cli_main
from strata.wiring import initial_model_factory
from tests.agent_service_contract import wait_until
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.security import Security, TlsSettings

FLEET = "testfleet"


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = FleetCA.init(root / "ca", FLEET)

    def bundle(self, role: Role, name: str) -> str:
        directory = self.root / "bundles" / f"{role}-{name}"
        hosts = ["localhost", "127.0.0.1"] if role in (Role.AGGREGATOR, Role.COORDINATOR, Role.RELAY) else []
        self.ca.issue(Identity(role, name), KeyPair.generate(), hosts=hosts).write(directory)
        return str(directory)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.ca.close()


def _agent_client(fleet: Fleet, name: str, seeds: list[str]) -> Client:
    security = Security(fleet.bundle(Role.AGENT, name))
    return Client(
        seeds, agent_id=name, key=security.manifest_key, channel_factory=security.channel, join_timeout_s=30
    )


def test_a_round_closes_under_mtls_and_strangers_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    coordinator = CoordinatorDaemon(
        CoordinatorConfig(
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "coord"),
            tls=TlsSettings(bundle=fleet.bundle(Role.COORDINATOR, "coord")),
        )
    ).start()
    config = AggregatorConfig(
        id="agg-a",
        listen="127.0.0.1:0",
        coordinator=coordinator.address,
        state_dir=str(tmp_path / "agg"),
        store=str(tmp_path / "store"),
        round=RoundSettings(quorum=1.0, min_updates=2, deadline_s=600.0),
        synthesis=SynthesisSettings(enabled=False),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        tls=TlsSettings(bundle=fleet.bundle(Role.AGGREGATOR, "agg-a")),
    )
    aggregator = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
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
        # the aggregator registered with the coordinator over mTLS
        wait_until(lambda: len(coordinator.membership.ring()) == 1, 20, "the aggregator to register")
        direct = _agent_client(fleet, "alice", [aggregator.address])
        device = _agent_client(fleet, "dave", [relay.address])
        clients += [direct.connect(), device.connect()]
        for client in clients:
            weights = client.wait_for_model(timeout=30)
            client.submit({k: v + np.float32(0.01) for k, v in weights.items()}, 10)
        # alice directly, and the relay's combined update carrying dave's
        wait_until(lambda: aggregator.rounds.current.round == 1, 30, "round 0 to close on two updates")
        kinds = sorted(u.kind for u in aggregator.journal.iter_all_updates())
        assert kinds == ["local", "relay"]

        # no certificate: the handshake itself fails
        with create_channel(aggregator.address) as plain, pytest.raises(grpc.RpcError) as info:
            pb_grpc.AgentServiceStub(plain).Join(pb.JoinRequest(agent_id="mallory"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        # a real certificate, but someone else's id in the message
        alice = Security(fleet.bundle(Role.AGENT, "alice2"))
        with alice.channel(aggregator.address) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.AgentServiceStub(channel).Join(pb.JoinRequest(agent_id="bob"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not_own_id" in info.value.details()

        # an agent may not act as an aggregator towards the coordinator
        with alice.channel(coordinator.address) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.CoordinatorServiceStub(channel).RegisterAggregator(
                pb.AggregatorInfo(id="alice2", address="127.0.0.1:1"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(coordinator.membership.ring()) == 1

        # the operator CLI: with an operator bundle it reads the fleet; without one the handshake fails
        operator = fleet.bundle(Role.OPERATOR, "ops")
        assert cli_main(["fleet", "status", "--coordinator", coordinator.address, "--bundle", operator, "--json"]) == 0
        assert cli_main(["health", aggregator.address, "--bundle", operator]) == 0
        assert cli_main(["fleet", "status", "--coordinator", coordinator.address, "--bundle", "", "--timeout", "2"]) == 5
    finally:
        for client in clients:
            client.close()
        relay.stop()
        aggregator.stop()
        coordinator.stop()


def test_one_identity_over_its_share_is_refused_while_others_are_served(fleet: Fleet, tmp_path: Path) -> None:
    config = AggregatorConfig(
        id="agg-fair",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "agg"),
        store=str(tmp_path / "store"),
        synthesis=SynthesisSettings(enabled=False),
        serving=ServingSettings(caller_max_streams=4, caller_calls_per_s=2.0),
        tls=TlsSettings(bundle=fleet.bundle(Role.AGGREGATOR, "agg-fair")),
    )
    aggregator = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    greedy, polite = Security(fleet.bundle(Role.AGENT, "greedy")), Security(fleet.bundle(Role.AGENT, "polite"))
    try:
        with greedy.channel(aggregator.address) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            watches = [stub.WatchModels(pb.WatchModelsRequest(agent_id="greedy"), timeout=30) for _ in range(5)]
            refused = []
            for watch in watches:  # the first event of each, or its refusal
                try:
                    next(watch)
                except grpc.RpcError as exc:
                    refused.append((exc.code(), exc.details().split(":")[0]))
            assert refused == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_streams")]
            # a burst of 10 calls passes, then the bucket is empty: the caller must slow down
            codes = []
            for _ in range(15):
                try:
                    stub.Heartbeat(pb.HeartbeatRequest(agent_id="greedy"), timeout=5)
                    codes.append("ok")
                except grpc.RpcError as exc:
                    codes.append(exc.details().split(":")[0])
            assert "rate_limited" in codes and codes[0] == "ok"
            # someone else is not affected
            with polite.channel(aggregator.address) as other:
                reply = pb_grpc.AgentServiceStub(other).Join(pb.JoinRequest(agent_id="polite"), timeout=5)
                assert reply.WhichOneof("outcome") == "home"
            for watch in watches:
                watch.cancel()
    finally:
        aggregator.stop()
