"""A fleet under mutual TLS with real certificates from a real fleet CA: coordinator, aggregator, relay and
agents in-process on 127.0.0.1. A round closes through the relay; strangers and impostors are refused."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.client import Client, SubmitRefused
from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import create_channel, read_header_stream
from relay.config import RelayConfig, WindowSettings
from relay.daemon import RelayDaemon
from storage.cid import cid_of
from storage.keys import KeyPair
from storage.manifest import Manifest
from storage.store import LocalStore
from strata.cli import main as cli_main
from strata.wiring import initial_model_factory
from tests.agent_service_contract import wait_until
from trust.bundle import Bundle
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


@dataclass
class Running:
    coordinator: CoordinatorDaemon
    aggregator: AggregatorDaemon
    relay: RelayDaemon
    bundles: dict[str, str]


@pytest.fixture
def running(fleet: Fleet, tmp_path: Path) -> Iterator[Running]:
    """A coordinator, aggregator agg-a and relay relay-1 under mTLS; round 0 closes on two updates."""
    bundles = {
        "coord": fleet.bundle(Role.COORDINATOR, "coord"),
        "agg-a": fleet.bundle(Role.AGGREGATOR, "agg-a"),
        "relay-1": fleet.bundle(Role.RELAY, "relay-1"),
    }
    coordinator = CoordinatorDaemon(
        CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coord"), tls=TlsSettings(bundle=bundles["coord"]))
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
        tls=TlsSettings(bundle=bundles["agg-a"]),
    )
    aggregator = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    relay = RelayDaemon(
        RelayConfig(
            id="relay-1",
            seeds=[aggregator.address],
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "relay"),
            window=WindowSettings(max_devices=1, max_wait_s=600.0),
            tls=TlsSettings(bundle=bundles["relay-1"]),
        )
    ).start()
    try:
        yield Running(coordinator, aggregator, relay, bundles)
    finally:
        relay.stop()
        aggregator.stop()
        coordinator.stop()


def test_a_round_closes_under_mtls_and_strangers_are_refused(fleet: Fleet, running: Running) -> None:
    coordinator, aggregator, relay = running.coordinator, running.aggregator, running.relay
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


# ------------------------------------------------------------------ what a caller may read, and who signed what

RPC_S = 10.0


def _get_model(channel: grpc.Channel, cid: str, agent_id: str = "") -> tuple[pb.ModelHeader, bytes]:
    stream = pb_grpc.AgentServiceStub(channel).GetModel(pb.GetModelRequest(model_cid=cid, agent_id=agent_id), timeout=RPC_S)
    return read_header_stream(stream, size_of=lambda h: h.weights_size, max_size=1 << 30)


def _fetch_blob(channel: grpc.Channel, cid: str) -> bytes:
    stream = pb_grpc.PeerServiceStub(channel).FetchBlob(pb.FetchBlobRequest(cid=cid), timeout=RPC_S)
    return read_header_stream(stream, size_of=lambda h: h.size, max_size=1 << 30)[1]


def _refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """(status, strata-reason) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    trailers = dict(info.value.trailing_metadata() or ())
    return info.value.code(), str(trailers.get("strata-reason", ""))


@dataclass
class RoundZero:
    cluster: str  # the round's cluster model (the next base: synthesis is off)
    alice_update: str  # alice's local update, held by the aggregator
    relay_update: str  # relay-1's combined update, held by the aggregator
    dave_update: str  # dave's local update, held by the relay only


def _close_round_zero(fleet: Fleet, running: Running) -> RoundZero:
    aggregator, relay = running.aggregator, running.relay
    wait_until(lambda: len(running.coordinator.membership.ring()) == 1, 20, "the aggregator to register")
    alice = _agent_client(fleet, "alice", [aggregator.address])
    dave = _agent_client(fleet, "dave", [relay.address])
    try:
        for client in (alice.connect(), dave.connect()):
            weights = client.wait_for_model(timeout=30)
            client.submit({k: v + np.float32(0.01) for k, v in weights.items()}, 10)
        wait_until(lambda: aggregator.rounds.current.round == 1, 30, "round 0 to close on two updates")
    finally:
        alice.close()
        dave.close()
    held = {u.kind: u.update_cid for u in aggregator.journal.iter_all_updates()}
    (dave_update,) = [u.update_cid for u in relay.journal.iter_all_updates()]
    cluster = aggregator.rounds.closed_rounds()[0].cluster_cid
    assert cluster is not None
    return RoundZero(cluster=cluster, alice_update=held["local"], relay_update=held["relay"], dave_update=dave_update)


def _audit_reads(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.fields for r in caplog.records if r.name == "strata.audit" and r.getMessage() == "device_update_read"]


def test_no_agent_reads_another_agents_update_by_any_path_and_an_auditor_can_with_a_log_line(
    fleet: Fleet, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="strata.audit")
    aggregator, relay, coordinator = running.aggregator, running.relay, running.coordinator
    zero = _close_round_zero(fleet, running)
    alice_manifest = Manifest.from_bytes(aggregator.store.get(zero.alice_update))
    assert alice_manifest.producer.id == "alice"
    # every model the fleet made embeds its producer's certificate
    assert alice_manifest.certificate is not None

    bob = Security(fleet.bundle(Role.AGENT, "bob"))  # an enrolled agent that knows every CID
    with bob.channel(aggregator.address) as to_agg, bob.channel(relay.address) as to_relay, bob.channel(
        coordinator.address
    ) as to_coord:
        # the aggregator's GetModel: neither a device's update nor a relay's combined one, whatever the CID
        for cid in (zero.alice_update, zero.relay_update):
            assert _refusal(lambda cid=cid: _get_model(to_agg, cid, "bob")) == (grpc.StatusCode.PERMISSION_DENIED, "device_update")
        # ... while the current base, by CID too, is served
        assert _get_model(to_agg, zero.cluster, "bob")[0].model_cid == zero.cluster
        # PeerService.FetchBlob with an agent certificate: the role table refuses it
        for cid in (zero.alice_update, alice_manifest.weights):
            assert _refusal(lambda cid=cid: _fetch_blob(to_agg, cid)) == (grpc.StatusCode.PERMISSION_DENIED, "role_not_allowed")
        # the relay's GetModel: the device update it holds, and (fetched upstream as the relay) the aggregator's
        for cid in (zero.dave_update, zero.alice_update, zero.relay_update):
            assert _refusal(lambda cid=cid: _get_model(to_relay, cid, "bob")) == (grpc.StatusCode.PERMISSION_DENIED, "device_update")
        # the coordinator: an agent reads nothing of its index
        coordinator_stub = pb_grpc.CoordinatorServiceStub(to_coord)
        assert _refusal(
            lambda: coordinator_stub.GetLineage(pb.LineageRequest(model_cid=zero.alice_update), timeout=RPC_S)
        ) == (grpc.StatusCode.PERMISSION_DENIED, "role_not_allowed")
        assert _refusal(lambda: coordinator_stub.ListModels(pb.ListModelsRequest(), timeout=RPC_S)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "role_not_allowed",
        )
    # a peer aggregator fetches published models only
    peer = Security(fleet.bundle(Role.AGGREGATOR, "agg-b"))
    with peer.channel(aggregator.address) as channel:
        for cid in (zero.alice_update, alice_manifest.weights):
            assert _refusal(lambda cid=cid: _fetch_blob(channel, cid)) == (grpc.StatusCode.NOT_FOUND, "not_found")
        assert cid_of(_fetch_blob(channel, zero.cluster)) == zero.cluster
    # an operator sees the lineage down to the device updates an aggregator accepted (their manifests,
    # CIDs and fields), never their weights; dave's update stays in the relay's private store
    operator = Security(fleet.bundle(Role.OPERATOR, "ops"))
    indexed = {zero.cluster, zero.alice_update, zero.relay_update}
    wait_until(
        lambda: indexed <= {r.cid for r in running.coordinator.index.list(limit=100)}, 20, "the round's models to be indexed"
    )
    with operator.channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        listed = {m.model_cid for m in stub.ListModels(pb.ListModelsRequest(), timeout=RPC_S).models}
        assert indexed <= listed and zero.dave_update not in listed
        lineage = stub.GetLineage(pb.LineageRequest(model_cid=zero.cluster), timeout=RPC_S)
        assert {zero.alice_update, zero.relay_update} <= {r.model_cid for r in lineage.ancestors}
    assert _audit_reads(caplog) == []

    # an auditor reads them, through every path, and each read is one line: who, what
    auditor = Security(fleet.bundle(Role.AUDIT, "auditor"))
    with auditor.channel(aggregator.address) as to_agg, auditor.channel(relay.address) as to_relay:
        header, weights = _get_model(to_agg, zero.alice_update)
        assert cid_of(header.manifest) == zero.alice_update and cid_of(weights) == alice_manifest.weights
        assert _fetch_blob(to_agg, zero.alice_update) == aggregator.store.get(zero.alice_update)
        assert cid_of(_fetch_blob(to_agg, alice_manifest.weights)) == alice_manifest.weights
        header, _ = _get_model(to_relay, zero.dave_update)
        assert Manifest.from_bytes(header.manifest).producer.id == "dave"
    reads = [(f["who"], f["cid"], f["what"], f["via"]) for f in _audit_reads(caplog)]
    assert reads == [
        ("audit/auditor", zero.alice_update, "model", "AgentService.GetModel"),
        ("audit/auditor", zero.alice_update, "manifest", "PeerService.FetchBlob"),
        ("audit/auditor", alice_manifest.weights, "weights", "PeerService.FetchBlob"),
        ("audit/auditor", zero.dave_update, "model", "AgentService.GetModel"),
    ]


def test_a_manifest_signed_by_a_key_of_the_agents_own_but_not_its_certified_one_is_refused(
    fleet: Fleet, running: Running
) -> None:
    _close_round_zero(fleet, running)
    security = Security(fleet.bundle(Role.AGENT, "erin"))
    own_key = KeyPair.generate()  # erin's own, not the one her certificate certifies
    with Client(
        [running.aggregator.address], agent_id="erin", key=own_key, channel_factory=security.channel, join_timeout_s=30
    ) as client:
        weights = client.connect().wait_for_model(timeout=30)
        with pytest.raises(SubmitRefused) as info:
            client.submit({k: v + np.float32(0.01) for k, v in weights.items()}, 10)
    assert info.value.reason == "uncertified_signer"
    assert running.aggregator.journal.refusal_counts().get("uncertified_signer") == 1


def _verify(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli_main(["verify", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_strata_verify_ca_names_every_signer_and_fails_on_an_uncertified_or_revoked_one(
    fleet: Fleet, running: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zero = _close_round_zero(fleet, running)
    running.relay.stop()
    running.aggregator.stop()
    ca_pem = str(fleet.root / "ca" / "ca.pem")
    stores = ["--store", str(tmp_path / "store"), "--store", str(tmp_path / "relay" / "store")]

    code, result = _verify(zero.cluster, *stores, "--ca", ca_pem, capsys=capsys)
    assert code == 0 and result["ok"] and result["fleet"] == FLEET, result
    signed_by = {row["cid"]: row["signer"]["identity"] for row in result["signers"]}
    assert signed_by == {
        zero.cluster: "aggregator/agg-a",
        zero.alice_update: "agent/alice",
        zero.relay_update: "relay/relay-1",
        zero.dave_update: "agent/dave",
    }
    # the text form says who signed what, one line per model
    capsys.readouterr()
    assert cli_main(["verify", zero.cluster, *stores, "--ca", ca_pem]) == 0
    text = capsys.readouterr().out
    assert "signed by agent/dave" in text and "signed by relay/relay-1" in text

    # alice's update re-signed by an uncertified key (her certificate still embedded), and everything above
    # it re-hashed and properly re-signed: only that one signer is wrong
    store = LocalStore(tmp_path / "store")
    alice = Manifest.from_bytes(store.get(zero.alice_update))
    forged = alice.signed(KeyPair.generate())
    assert forged.certificate == alice.certificate
    cluster = Manifest.from_bytes(store.get(zero.cluster))
    agg_key = Bundle.load(running.bundles["agg-a"])
    reparented = dataclasses.replace(
        cluster, parents=tuple(sorted(forged.cid if p == zero.alice_update else p for p in cluster.parents))
    ).signed(agg_key.manifest_key.with_certificate(agg_key.cert_pem.decode()))
    for manifest in (forged, reparented):
        store.put(manifest.to_bytes())
    store.close()
    # self-consistent: every hash and signature holds ...
    assert _verify(reparented.cid, *stores, capsys=capsys)[0] == 0
    # ... but the fleet CA never certified that key for alice
    code, result = _verify(reparented.cid, *stores, "--ca", ca_pem, capsys=capsys)
    assert code == 4 and not result["ok"]
    assert [(p["cid"], p["reason"]) for p in result["problems"]] == [(forged.cid, "key_mismatch")]

    # a revoked signer: the CA's signed list, given as a file
    fleet.ca.revoke(identities=[Identity(Role.AGENT, "dave")])
    revocations = str(fleet.root / "ca" / "revocations.json")
    code, result = _verify(zero.cluster, *stores, "--ca", ca_pem, "--revocations", revocations, capsys=capsys)
    assert code == 4
    assert [(p["cid"], p["reason"]) for p in result["problems"]] == [(zero.dave_update, "revoked")]

    # a certificate from another CA: the same fleet name, another CA
    FleetCA.init(tmp_path / "other-ca", FLEET).close()
    other_pem = str(tmp_path / "other-ca" / "ca.pem")
    code, result = _verify(zero.cluster, *stores, "--ca", other_pem, capsys=capsys)
    assert code == 4 and {p["reason"] for p in result["problems"]} == {"wrong_ca"} and len(result["problems"]) == 4
    # --revocations means nothing without the CA that signed the list
    assert cli_main(["verify", zero.cluster, *stores, "--revocations", revocations]) == 2


def test_the_coordinator_serves_manifests_and_lineage_never_weights() -> None:
    """No CoordinatorService reply carries a chunk of weights, or any bytes but manifests and PEM/revocations."""
    service = pb.DESCRIPTOR.services_by_name["CoordinatorService"]
    seen: set[str] = set()

    def walk(message: Any) -> None:
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        for field in message.fields:
            if field.message_type is not None:
                assert field.message_type.name not in ("Chunk", "ModelChunk", "BlobChunk"), (message.full_name, field.name)
                walk(field.message_type)
            elif field.type == field.TYPE_BYTES:
                # manifests, the certificates and revocation lists of enrollment, and the hub's signed
                # release tags (canonical JSON naming a model CID): never weights
                assert field.name in ("manifest", "certificate_pem", "ca_pem", "revocations", "tag"), (
                    message.full_name,
                    field.name,
                )

    for method in service.methods:
        walk(method.output_type)
    assert "strata.v1.ModelRecord" in seen  # the walk reached the index's records


def test_two_aggregators_under_mtls_blend_each_others_certified_cluster_models(fleet: Fleet, tmp_path: Path) -> None:
    """Synthesis with the fleet CA: each aggregator's semi-global model uses its peer's cluster model, whose
    embedded certificate names that ring member; nothing is refused."""
    coordinator = CoordinatorDaemon(
        CoordinatorConfig(
            listen="127.0.0.1:0", state_dir=str(tmp_path / "coord"), tls=TlsSettings(bundle=fleet.bundle(Role.COORDINATOR, "coord"))
        )
    ).start()
    aggregators: list[AggregatorDaemon] = []
    clients: list[Client] = []
    try:
        for name in ("agg-a", "agg-b"):
            config = AggregatorConfig(
                id=name,
                listen="127.0.0.1:0",
                coordinator=coordinator.address,
                state_dir=str(tmp_path / name),
                store=str(tmp_path / f"{name}-store"),
                round=RoundSettings(quorum=1.0, min_updates=1, deadline_s=600.0),
                synthesis=SynthesisSettings(peer_wait_s=10.0),
                serving=ServingSettings(heartbeat_interval_s=0.5),
                tls=TlsSettings(bundle=fleet.bundle(Role.AGGREGATOR, name)),
            )
            aggregators.append(AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start())
        wait_until(lambda: len(coordinator.membership.ring()) == 2, 20, "both aggregators to register")
        wait_until(lambda: all(len(a.ring_view.ring) == 2 for a in aggregators), 20, "both to follow the ring of two")
        ring = aggregators[0].ring_view.ring
        # one agent homed at each aggregator
        names = {ring.owner(f"agent-{i}").id: f"agent-{i}" for i in range(64)}
        for name in ("agg-a", "agg-b"):
            client = _agent_client(fleet, names[name], [a.address for a in aggregators]).connect()
            clients.append(client)
            weights = client.wait_for_model(timeout=30)
            client.submit({k: v + np.float32(0.01) for k, v in weights.items()}, 10)
        wait_until(lambda: all(a.rounds.current.round == 1 for a in aggregators), 60, "round 0 to close on both")
        for aggregator, peer in zip(aggregators, reversed(aggregators), strict=True):
            semi = Manifest.from_bytes(aggregator.store.get(aggregator.rounds.current.model_cid))
            assert semi.kind == "semi-global", semi.kind
            assert semi.extra["refused_peers"] == []
            peer_cluster = peer.rounds.closed_rounds()[0].cluster_cid
            assert peer_cluster in semi.parents
            assert aggregator.security is not None
            assert aggregator.security.signers.check(semi).certified.identity == Identity(Role.AGGREGATOR, aggregator.id)
    finally:
        for client in clients:
            client.close()
        for aggregator in aggregators:
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
