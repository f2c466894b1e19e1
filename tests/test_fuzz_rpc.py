"""Attack your own daemons: a live coordinator, aggregator and relay take a few hundred fuzzed calls on
every RPC of strata.proto, then must still be healthy, have accepted nothing, and have logged no traceback.

The fuzzer (tests/fuzz) builds its cases from the descriptors: random valid messages, mutated and
garbage bytes, boundary values, hostile encodings, broken chunk streams and updates forged against the
real base model. Set STRATA_FUZZ_SEED to draw other cases and STRATA_FUZZ_PER_RPC for more of them
(`pytest -s` prints the status histogram per daemon); `bench/fuzz.py` is the long run.

Below the fuzz runs, each finding of the fuzzer is replayed byte for byte against the daemon it broke.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from intake.agents import AgentRegistry
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import telemetry_to_dict
from proto.errors import InvalidInput
from proto.serving import create_server, serving_loop
from proto.wire import create_channel
from relay.config import RelayConfig, UpstreamSettings
from relay.daemon import RelayDaemon
from storage.cid import cid_of
from storage.codec import encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from strata.wiring import initial_model_factory
from tests.agent_service_contract import wait_until
from tests.fuzz import AGGREGATOR_SERVICES, COORDINATOR_SERVICES, RELAY_SERVICES, Target, fetch_base
from tests.fuzz.cases import CaseFactory
from tests.fuzz.runner import Tally, run
from tests.fuzz.streams import UpdateForger, chunk_framing, signed_manifests

SEED = int(os.environ.get("STRATA_FUZZ_SEED", "20260501"))
PER_RPC = int(os.environ.get("STRATA_FUZZ_PER_RPC", "16"))  # 18 RPCs on three daemons: about 290 calls
STREAM_IDLE_S = 1.0
SUBMIT = "/strata.v1.AgentService/SubmitUpdate"


@dataclass
class Fleet:
    coordinator: CoordinatorDaemon
    aggregator: AggregatorDaemon
    relay: RelayDaemon


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    coordinator = CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"))).start()
    serving = ServingSettings(workers=2, stream_idle_s=STREAM_IDLE_S)
    config = AggregatorConfig(
        id="agg-fuzz",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "agg"),
        store=str(tmp_path / "agg-store"),
        coordinator=coordinator.address,
        round=RoundSettings(min_updates=1, quorum=1.0, deadline_s=600.0),
        synthesis=SynthesisSettings(enabled=False),
        serving=serving,
    )
    aggregator = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    relay = RelayDaemon(
        RelayConfig(
            id="relay-fuzz",
            seeds=[aggregator.address],
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "relay"),
            serving=serving,
            upstream=UpstreamSettings(join_timeout_s=5.0, backoff_base_s=0.1, backoff_max_s=0.5, rpc_timeout_s=5.0),
        )
    ).start()
    try:
        wait_until(lambda: relay.relay.has_base, 30, "the relay to adopt the aggregator's base")
        yield Fleet(coordinator, aggregator, relay)
    finally:
        relay.stop(grace=0)
        aggregator.stop(grace=0)
        coordinator.stop(grace=0)


def factory_for(target: Target, rng: random.Random, seeds: list[str], byte_seeds: list[bytes]) -> CaseFactory:
    forgers = {}
    if "strata.v1.AgentService" in target.services:
        framing = chunk_framing(pb.UpdateChunk.DESCRIPTOR)
        assert framing is not None
        forgers[SUBMIT] = UpdateForger(fetch_base(target.address), framing, rng)
    return CaseFactory(rng, seeds=seeds, byte_seeds=byte_seeds, stall_s=STREAM_IDLE_S + 0.5, forgers=forgers)


def attack(targets: list[Target], seeds: list[str], byte_seeds: list[bytes]) -> dict[str, Tally]:
    """Fuzz every target at once, from the serving loop (one thread for every client call)."""
    factories = {t.name: factory_for(t, random.Random(f"{SEED}:{t.name}"), seeds, byte_seeds) for t in targets}

    async def all_targets() -> list[Tally]:
        return await asyncio.gather(
            *(
                run(t.address, factories[t.name].cases(t.rpcs(), PER_RPC), concurrency=8, learn=factories[t.name].learn)
                for t in targets
            )
        )

    tallies = asyncio.run_coroutine_threadsafe(all_targets(), serving_loop()).result(timeout=240)
    return {t.name: tally for t, tally in zip(targets, tallies, strict=True)}


def healthy(address: str) -> bool:
    with create_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# about 2 s on a quiet machine (three in-process daemons and ~290 calls); 8 s seen at load average 35
@pytest.mark.slow
def test_fuzzed_calls_on_every_rpc_are_refused_cleanly_and_every_daemon_serves_on(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    targets = [
        Target("coordinator", fleet.coordinator.address, COORDINATOR_SERVICES),
        Target("aggregator", fleet.aggregator.address, AGGREGATOR_SERVICES),
        Target("relay", fleet.relay.address, RELAY_SERVICES),
    ]
    base = fleet.aggregator.rounds.current
    seeds = [base.model_cid, base.weights_cid, "digits", "agg-fuzz", "relay-fuzz", fleet.aggregator.address, "h:1", "local"]

    tallies = attack(targets, seeds, signed_manifests(fetch_base(fleet.aggregator.address)))

    total = Tally()
    for name, tally in tallies.items():
        print(f"--- {name}\n{tally.render()}")
        total.merge(tally)
    assert sum(total.calls.values()) >= 250
    assert set(total.calls) == {rpc.path for t in targets for rpc in t.rpcs()}, "every RPC was fuzzed"
    histogram = total.histogram()
    assert histogram["UNKNOWN"] == 0 and histogram["INTERNAL"] == 0, total.render()
    assert total.finding_count == 0, total.render()
    assert histogram["INVALID_ARGUMENT"] > 0, histogram
    assert any(status.startswith("OK refused:") for status in histogram), histogram  # SubmitUpdate answers refusals

    # every daemon serves on: health, a normal Join at both homes, the ring at the coordinator
    assert all(healthy(t.address) for t in targets)
    for home in (fleet.aggregator.address, fleet.relay.address):
        with create_channel(home) as channel:
            reply = pb_grpc.AgentServiceStub(channel).Join(pb.JoinRequest(agent_id="after-the-fuzz", federation="digits"), timeout=10)
        # the fuzzer may have registered aggregators on the ring, so a redirect is a fine answer too
        assert reply.WhichOneof("outcome") in ("home", "redirect")
    with create_channel(fleet.coordinator.address) as channel:
        ring = pb_grpc.CoordinatorServiceStub(channel).GetRing(pb.GetRingRequest(), timeout=10)
    assert "agg-fuzz" in {m.id for m in ring.members}

    # nothing the fuzzer sent was accepted, and no daemon logged a traceback
    assert fleet.aggregator.journal.accepted_count() == 0
    assert fleet.relay.journal.accepted_count() == 0
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert tracebacks == [], [f"{r.name}: {r.getMessage()}" for r in tracebacks]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [f"{r.name}: {r.getMessage()}" for r in errors]


def test_a_forged_update_is_refused_for_its_own_reason(fleet: Fleet) -> None:
    """The forger's updates reach the checks they target (a hole behind an earlier check would hide)."""
    framing = chunk_framing(pb.UpdateChunk.DESCRIPTOR)
    assert framing is not None
    forger = UpdateForger(fetch_base(fleet.aggregator.address), framing, random.Random(SEED))
    expected = {
        "nan": "not_finite",
        "shape": "shape_mismatch",
        "norm_blowup": "norm_bound",
        "json_garbage": "invalid_safetensors",
        "cid_mismatch": "hash_mismatch",
        "unknown_base": "unknown_base",
        "garbage_manifest": "bad_manifest",
        "manifest_disagrees": "bad_manifest",
    }
    with create_channel(fleet.aggregator.address) as channel:
        call = channel.stream_unary(SUBMIT, response_deserializer=pb.SubmitUpdateReply.FromString)
        reasons = {kind: call(iter(forger.stream(kind, pb.UpdateHeader.DESCRIPTOR)), timeout=30).reason for kind in expected}
    assert reasons == expected


# ------------------------------------------------------------------ findings, replayed byte for byte

U64_MAX = (1 << 64) - 1


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorDaemon]:
    daemon = CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"))).start()
    yield daemon
    daemon.stop(grace=0)


def raw_status(address: str, method: str, request: bytes) -> grpc.StatusCode:
    with create_channel(address) as channel:
        try:
            channel.unary_unary(f"/strata.v1.CoordinatorService/{method}")(request, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("round_", [1 << 63, U64_MAX])
def test_list_models_with_a_round_past_sqlite_integers_is_invalid_argument(coordinator: CoordinatorDaemon, round_: int) -> None:
    """Found by the fuzzer: ListModelsRequest round=2^64-1 (bytes 20ffffffffffffffffff01) was INTERNAL
    (OverflowError from sqlite3 in ModelIndex.list)."""
    request = pb.ListModelsRequest(round=round_).SerializeToString()
    assert raw_status(coordinator.address, "ListModels", request) == grpc.StatusCode.INVALID_ARGUMENT
    assert raw_status(coordinator.address, "ListModels", pb.ListModelsRequest(round=(1 << 63) - 1).SerializeToString()) == grpc.StatusCode.OK


def test_a_heartbeat_with_a_round_past_sqlite_integers_is_refused_and_the_lease_stays_sound(coordinator: CoordinatorDaemon) -> None:
    """Found by the fuzzer: AggregatorHeartbeat id=<registered> round=2^64-1 was INTERNAL, and the status
    had already been replaced in memory with a round no later write could store."""
    with create_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        info = pb.AggregatorInfo(id="agg-a", address="127.0.0.1:1", federations=["digits"])
        stub.RegisterAggregator(info, timeout=10)
        request = pb.AggregatorHeartbeat(id="agg-a", round=U64_MAX).SerializeToString()
        assert raw_status(coordinator.address, "HeartbeatAggregator", request) == grpc.StatusCode.INVALID_ARGUMENT
        stub.HeartbeatAggregator(pb.AggregatorHeartbeat(id="agg-a", round=3), timeout=10)
        statuses = {s.info.id: s for s in stub.FleetStatus(pb.FleetStatusRequest(), timeout=10).aggregators}
    assert statuses["agg-a"].round == 3
    assert coordinator.membership is not None
    coordinator.membership.register(coordinator.membership.status()[0].info)  # still writable


@pytest.mark.parametrize("edge", ["round", "num_samples"])
def test_announcing_a_signed_manifest_with_a_count_past_sqlite_integers_is_invalid_argument(
    coordinator: CoordinatorDaemon, edge: str
) -> None:
    """Found by the fuzzer: AnnounceModel with a correctly signed manifest whose round or num_samples
    is 2^63 or more was INTERNAL (OverflowError from sqlite3 in ModelIndex.record)."""
    blob = encode_tensors({"w": np.zeros(3, np.float32)})

    def announce(value: int) -> grpc.StatusCode:
        manifest = Manifest(
            kind="cluster",
            federation="digits",
            producer=Producer(role="aggregator", id="agg-a"),
            weights=cid_of(blob),
            tensors=summarize(blob),
            **{"round": 1, "num_samples": 1, edge: value},
        ).signed(KeyPair.generate())
        request = pb.AnnounceModelRequest(manifest=manifest.to_bytes()).SerializeToString()
        return raw_status(coordinator.address, "AnnounceModel", request)

    assert announce(1 << 63) == grpc.StatusCode.INVALID_ARGUMENT
    assert announce(U64_MAX) == grpc.StatusCode.INVALID_ARGUMENT
    assert announce((1 << 63) - 1) == grpc.StatusCode.OK


@pytest.mark.parametrize("weight", [math.inf, 1.7976931348623157e308])
def test_a_registration_with_an_unbounded_weight_is_refused_and_leaves_the_ring_working(
    coordinator: CoordinatorDaemon, weight: float
) -> None:
    """Found by the fuzzer: AggregatorInfo weight=inf (or any weight whose ×100 overflows) was INTERNAL,
    and it stayed on the lease table, so every registration after it failed too until its lease expired."""
    poisoned = pb.AggregatorInfo(id="agg-heavy", address="127.0.0.1:1", weight=weight).SerializeToString()
    assert raw_status(coordinator.address, "RegisterAggregator", poisoned) == grpc.StatusCode.INVALID_ARGUMENT
    with create_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        stub.RegisterAggregator(pb.AggregatorInfo(id="agg-b", address="127.0.0.1:2"), timeout=10)
        ring = stub.GetRing(pb.GetRingRequest(), timeout=10)
    assert [m.id for m in ring.members] == ["agg-b"]


@pytest.mark.parametrize("last_seen", [math.nan, math.inf])
def test_a_report_of_an_agent_seen_at_nan_is_invalid_argument(coordinator: CoordinatorDaemon, last_seen: float) -> None:
    """Found by the fuzzer: ReportAgentsRequest with an AgentRecord last_seen=NaN was INTERNAL
    (SQLite stores NaN as NULL, and agents.last_seen is NOT NULL)."""
    request = pb.ReportAgentsRequest(aggregator_id="agg-a", agents=[pb.AgentRecord(agent_id="d1", last_seen=last_seen)])
    assert raw_status(coordinator.address, "ReportAgents", request.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
    with create_channel(coordinator.address) as channel:
        listed = pb_grpc.CoordinatorServiceStub(channel).ListAgents(pb.ListAgentsRequest(), timeout=10)
    assert list(listed.agents) == []


def test_a_refusal_that_quotes_a_megabyte_input_still_reaches_the_caller_as_itself() -> None:
    """Found by the fuzzer: RegisterAggregator id=<1 MiB> address="x" was refused with a message quoting
    the id; over 16 KiB of status details broke gRPC's metadata limit, so the caller got
    RESOURCE_EXHAUSTED (which clients retry) instead of INVALID_ARGUMENT with its reason."""

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidInput(f"name {request.decode()!r} is not allowed", reason="bad_name")

    handler = grpc.method_handlers_generic_handler("fuzz.Echo", {"Say": grpc.unary_unary_rpc_method_handler(refuse)})
    with create_server() as server:
        server.server.add_generic_rpc_handlers((handler,))
        with create_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/fuzz.Echo/Say")(b"n" * (1 << 20), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("bad_name: name 'nnn") and len(info.value.details()) < 4096
    assert ("strata-reason", "bad_name") in tuple(info.value.trailing_metadata())


MIB = 1 << 20


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("RegisterAggregator", pb.AggregatorInfo(id="a" * MIB, address="127.0.0.1:1")),
        ("RegisterAggregator", pb.AggregatorInfo(id="agg-x", address="127.0.0.1:" + "1" * MIB)),
        ("RegisterAggregator", pb.AggregatorInfo(id="agg-x", address="127.0.0.1:1", federations=["f"] * 100_000)),
        ("RegisterAggregator", pb.AggregatorInfo(id="agg-x", address="127.0.0.1:1", federations=["f" * MIB])),
        ("HeartbeatAggregator", pb.AggregatorHeartbeat(id="agg-a", last_cluster_cid="Q" * MIB)),
        ("HeartbeatAggregator", pb.AggregatorHeartbeat(id="agg-a", last_semi_global_cid="Q" * MIB)),
        ("HeartbeatAggregator", pb.AggregatorHeartbeat(id="agg-a", federations=[pb.FederationProgress(federation="f")] * 100_000)),
        ("HeartbeatAggregator", pb.AggregatorHeartbeat(id="agg-a", federations=[pb.FederationProgress(federation="f" * MIB)])),
        ("HeartbeatAggregator", pb.AggregatorHeartbeat(id="agg-a", federations=[pb.FederationProgress(round=U64_MAX, federation="f")])),
        ("HeartbeatAggregator", pb.AggregatorHeartbeat(id="agg-a", federations=[pb.FederationProgress()])),
        ("ReportAgents", pb.ReportAgentsRequest(aggregator_id="agg-a", agents=[pb.AgentRecord(agent_id="d" * MIB)])),
        ("ReportAgents", pb.ReportAgentsRequest(aggregator_id="agg-a", agents=[pb.AgentRecord(agent_id="d1", display_name="n" * MIB)])),
        ("ReportAgents", pb.ReportAgentsRequest(aggregator_id="agg-a", agents=[pb.AgentRecord(agent_id="d1", home_aggregator="h" * MIB)])),
        ("ReportAgents", pb.ReportAgentsRequest(aggregator_id="agg-a", agents=[pb.AgentRecord(agent_id="d1", telemetry=pb.Telemetry(network="w" * MIB))])),
        # the hub: every name, text, list and map is bounded before it is kept
        ("CreateFederation", pb.CreateFederationRequest(name="n" * MIB)),
        ("CreateFederation", pb.CreateFederationRequest(name="f", description="d" * MIB)),
        ("CreateFederation", pb.CreateFederationRequest(name="f", owners=["operator/o"] * 100_000)),
        ("CreateFederation", pb.CreateFederationRequest(name="f", round_policy={str(i): "v" for i in range(100_000)})),
        ("CreateFederation", pb.CreateFederationRequest(name="f", base_manifest=b"{" * MIB)),
        ("CreateRelease", pb.CreateReleaseRequest(tag=b"t" * MIB)),
        ("ResolveModel", pb.ResolveModelRequest(ref="r" * MIB)),
        ("GetFederation", pb.GetFederationRequest(name="n" * MIB)),
        ("ListReleases", pb.ListReleasesRequest(federation="n" * MIB)),
        ("GetLineage", pb.LineageRequest(model_cid="Q" * MIB, follow_base=True, depth=2**32 - 1)),
        ("ListProposals", pb.ListProposalsRequest(state="s" * MIB)),
        ("CreateProposal", pb.CreateProposalRequest(manifest=b"m" * MIB)),
        ("DecideProposal", pb.DecideProposalRequest(proposal_cid="Q" * MIB, accept=True)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_megabyte_names_are_refused_before_they_are_kept(coordinator: CoordinatorDaemon, method: str, request_: object) -> None:
    """Found by the fuzzer: the coordinator kept whatever a caller named (1 MiB aggregator ids and
    addresses, 100k federations, megabyte CIDs, agent names and telemetry), in memory and in SQLite, for
    good; a few of them pushed FleetStatus, GetRing and ListAgents replies past the 4 MiB limit, so those
    RPCs failed with RESOURCE_EXHAUSTED (and a grpc traceback in the log) from then on, restarts included."""
    with create_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        stub.RegisterAggregator(pb.AggregatorInfo(id="agg-a", address="127.0.0.1:1"), timeout=10)
        for _ in range(5):
            assert raw_status(coordinator.address, method, request_.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert stub.FleetStatus(pb.FleetStatusRequest(), timeout=10).ByteSize() < 10_000
        assert stub.GetRing(pb.GetRingRequest(), timeout=10).ByteSize() < 10_000
        assert stub.ListAgents(pb.ListAgentsRequest(), timeout=10).ByteSize() < 10_000


def test_a_coordinator_starts_over_a_lease_table_that_holds_a_megabyte_registration(tmp_path: Path) -> None:
    """What the bounds above leave behind on a coordinator that ran before them: the old entry is skipped."""
    state = tmp_path / "coordinator"
    CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(state))).start().stop(grace=0)
    with sqlite3.connect(state / "membership.db") as db:
        db.execute(
            "INSERT INTO aggregators (id, address, federations, weight, in_ring, round, agent_count,"
            " last_cluster_cid, last_semi_global_cid, last_seen) VALUES (?, '127.0.0.1:1', '[]', 1.0, 1, 0, 0, '', '', 0)",
            ("a" * MIB,),
        )
    daemon = CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(state))).start()
    try:
        with create_channel(daemon.address) as channel:
            fleet = pb_grpc.CoordinatorServiceStub(channel).FleetStatus(pb.FleetStatusRequest(), timeout=10)
        assert list(fleet.aggregators) == []
    finally:
        daemon.stop(grace=0)


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("Join", pb.JoinRequest(agent_id="a" * MIB)),
        ("Join", pb.JoinRequest(agent_id="d1", display_name="n" * MIB)),
        ("Join", pb.JoinRequest(agent_id="d1", telemetry=pb.Telemetry(network="w" * MIB))),
        ("Heartbeat", pb.HeartbeatRequest(agent_id="a" * MIB)),
        ("Heartbeat", pb.HeartbeatRequest(agent_id="d1", telemetry=pb.Telemetry(network="w" * MIB))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_home_refuses_megabyte_agent_names_instead_of_keeping_them(method: str, request_: object) -> None:
    """Found by the fuzzer: a home (aggregator or relay) kept any agent id, display name and telemetry
    network a Join or Heartbeat named, for ten agent timeouts (300 s by default): 3 MiB per call held in
    memory, and the aggregator's whole agent report to the coordinator refused while it lasted."""
    registry = AgentRegistry(timeout_s=30.0)
    convert = {"Join": _join, "Heartbeat": _heartbeat}[method]
    with pytest.raises(InvalidInput) as info:
        convert(registry, request_)
    assert len(str(info.value)) < 200
    assert registry.all() == []


def _join(registry: AgentRegistry, request: pb.JoinRequest) -> None:
    registry.join(request.agent_id, display_name=request.display_name, capability="train", telemetry=telemetry_to_dict(request.telemetry))


def _heartbeat(registry: AgentRegistry, request: pb.HeartbeatRequest) -> None:
    registry.touch(request.agent_id, telemetry_to_dict(request.telemetry))


def test_megabyte_agent_names_are_invalid_argument_at_both_homes(fleet: Fleet) -> None:
    huge = "a" * MIB
    calls = [
        ("Join", pb.JoinRequest(agent_id="d1", display_name=huge, federation="digits"), False),
        ("Heartbeat", pb.HeartbeatRequest(agent_id=huge), False),
        ("GetModel", pb.GetModelRequest(agent_id=huge), True),
        ("WatchModels", pb.WatchModelsRequest(agent_id=huge), True),
    ]
    for home in (fleet.aggregator, fleet.relay):
        with create_channel(home.address) as channel:
            for method, request, streams in calls:
                path = f"/strata.v1.AgentService/{method}"
                with pytest.raises(grpc.RpcError) as info:
                    if streams:
                        next(iter(channel.unary_stream(path)(request.SerializeToString(), timeout=10)))
                    else:
                        channel.unary_unary(path)(request.SerializeToString(), timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
        assert all(len(a.agent_id) < 300 and len(a.display_name) < 300 for a in home.agents.all())


def _signed_manifest_bytes(**fields: object) -> bytes:
    blob = encode_tensors({"w": np.zeros(3, np.float32)})
    values = {"round": 1, "num_samples": 1, **fields}
    return (
        Manifest(
            kind="cluster",
            federation="digits",
            producer=Producer(role="aggregator", id="agg-a"),
            weights=cid_of(blob),
            tensors=summarize(blob),
            **values,  # type: ignore[arg-type]
        )
        .signed(KeyPair.generate())
        .to_bytes()
    )


def test_announcing_a_model_with_100k_notes_is_refused_at_once_and_the_index_serves_on(coordinator: CoordinatorDaemon) -> None:
    """Found by tests/fuzz (bench/fuzz.py: 740 DEADLINE_EXCEEDED on every coordinator RPC that touches SQLite):
    AnnounceModel of a valid manifest with notes=<100k entries> merged them with SQLite's json_patch, which
    is quadratic in the keys: ~16 s per call holding the index lock and an offload thread, so a few such calls
    starved ListModels, GetLineage, ReportAgents and even RegisterAggregator/HeartbeatAggregator (same pool),
    and real aggregators lost their leases."""
    manifest = _signed_manifest_bytes()
    notes = {f"k{i}": "v" for i in range(100_000)}
    with create_channel(coordinator.address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        stub.AnnounceModel(pb.AnnounceModelRequest(manifest=manifest), timeout=10)
        for _ in range(2):
            request = pb.AnnounceModelRequest(manifest=manifest, notes=notes).SerializeToString()
            assert raw_status(coordinator.address, "AnnounceModel", request) == grpc.StatusCode.INVALID_ARGUMENT
        big_value = pb.AnnounceModelRequest(manifest=manifest, notes={"refused_peers": "x" * MIB}).SerializeToString()
        assert raw_status(coordinator.address, "AnnounceModel", big_value) == grpc.StatusCode.INVALID_ARGUMENT
        stub.AnnounceModel(pb.AnnounceModelRequest(manifest=manifest, notes={"refused_peers": '{"agg-b": "outlier"}'}), timeout=10)
        assert len(stub.ListModels(pb.ListModelsRequest(), timeout=5).models) == 1
