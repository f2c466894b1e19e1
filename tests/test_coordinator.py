"""The coordinator: membership and leases, the model index, the agent directory and the gRPC service."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.index import AgentEntry, ModelIndex
from coordinator.membership import AggregatorInfo, Membership, Progress
from coordinator.ring import Member
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import ConfigError, IntegrityError, InvalidInput, NotFound
from proto.wire import create_channel
from storage.cid import cid_of
from storage.codec import TensorInfo
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, rfc3339
from trust.bundle import Bundle
from trust.ca import FleetCA
from trust.errors import PermissionDenied
from trust.identity import Identity, Role
from trust.signers import Signers


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def info(
    agg_id: str, port: int = 7070, weight: float = 1.0, federations: tuple[str, ...] = ()
) -> AggregatorInfo:
    return AggregatorInfo(
        id=agg_id, address=f"127.0.0.1:{port}", weight=weight, federations=federations
    )


def make_manifest(
    key: KeyPair,
    *,
    kind: str = "cluster",
    producer: str = "agg-a",
    round: int = 1,
    parents: tuple[str, ...] = (),
    federation: str = "digits",
    seed: str = "",
    created_at: str = "2026-01-01T00:00:00.000Z",
) -> Manifest:
    return Manifest(
        kind=kind,
        federation=federation,
        round=round,
        producer=Producer(role="aggregator", id=producer),
        weights=cid_of(f"weights {kind} {producer} {round} {seed}".encode()),
        tensors={"w": TensorInfo("F32", (2, 3))},
        parents=parents,
        num_samples=10 * (round + 1),
        metrics={"loss": 0.5},
        created_at=created_at,
    ).signed(key)


# ---------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    config = CoordinatorConfig()
    assert config.listen == "127.0.0.1:7000"
    # a dead aggregator must leave within ~10 s
    assert config.lease_ttl_s + 0.5 < 10 and config.heartbeat_interval_s < config.lease_ttl_s
    with pytest.raises(ConfigError):
        CoordinatorConfig(heartbeat_interval_s=6.0, lease_ttl_s=6.0)
    with pytest.raises(ConfigError):
        CoordinatorConfig(listen="nowhere")
    with pytest.raises(ConfigError):
        CoordinatorConfig(members=["a=127.0.0.1:1", "b"])
    assert [m.id for m in CoordinatorConfig(members=["a=h:1", "b=h:2"]).static_members()] == [
        "a",
        "b",
    ]


# ---------------------------------------------------------------- membership


def test_register_heartbeat_expire_with_injected_clock() -> None:
    clock = FakeClock()
    membership = Membership(ttl_s=6.0, heartbeat_interval_s=2.0, clock=clock)
    assert membership.ring().version == 0 and len(membership.ring()) == 0

    lease = membership.register(info("a"))
    assert (
        lease.ring_version == 1
        and lease.expires_at == clock.now + 6.0
        and lease.heartbeat_interval_s == 2.0
    )
    membership.register(info("b", 7071))
    assert membership.ring().version == 2
    assert [m.id for m in membership.ring().members] == ["a", "b"]

    # re-registering unchanged renews without a new version; a new address or weight bumps it
    assert membership.register(info("a")).ring_version == 2
    assert membership.register(info("a", weight=2.0)).ring_version == 3
    assert membership.ring().member("a").weight == 2.0

    clock.now += 4.0
    membership.heartbeat("a", Progress(round=5, agent_count=3, last_cluster_cid="c1"))
    assert membership.expire() == []
    clock.now += 2.5  # b last renewed 6.5 s ago; a 2.5 s ago
    assert membership.expire() == ["b"]
    ring = membership.ring()
    assert ring.version == 4 and [m.id for m in ring.members] == ["a"]

    statuses = {s.info.id: s for s in membership.status()}
    assert statuses["a"].alive and statuses["a"].round == 5 and statuses["a"].agent_count == 3
    assert statuses["a"].last_cluster_cid == "c1"
    assert not statuses["b"].alive

    with pytest.raises(NotFound) as refused:
        membership.heartbeat("b", Progress(round=1))
    assert refused.value.reason == "unknown_aggregator"
    # with its registration attached, a heartbeat brings it back
    membership.heartbeat("b", Progress(round=1), info=info("b", 7071))
    assert membership.ring().version == 5 and "b" in membership.ring()


def test_registration_is_validated() -> None:
    membership = Membership()
    with pytest.raises(InvalidInput):
        membership.register(AggregatorInfo(id="x", address="no-port"))
    with pytest.raises(InvalidInput):
        membership.heartbeat("x", info=info("y"))


def test_ring_per_federation() -> None:
    membership = Membership()
    membership.register(info("a", federations=("digits",)))
    membership.register(info("b", 7071, federations=("mnist",)))
    membership.register(info("c", 7072))  # serves every federation
    assert [m.id for m in membership.ring("digits").members] == ["a", "c"]
    assert membership.ring("digits").version == membership.ring().version


def test_listeners_hear_every_ring_change_and_nothing_else() -> None:
    membership = Membership()
    versions: list[int] = []
    membership.on_change(lambda: versions.append(membership.ring_version))
    membership.register(info("a"))
    membership.register(info("a"))  # a renewal changes no ring
    membership.register(info("b", 7071))
    assert versions == [1, 2] and membership.ring_version == 2


def test_restart_keeps_members_and_version_increasing(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "membership.db"
    first = Membership(ttl_s=6.0, heartbeat_interval_s=2.0, clock=clock, store=db)
    first.register(info("a"))
    first.register(info("b", 7071))
    first.heartbeat("a", Progress(round=7, agent_count=2))
    first.close()

    # the restarted coordinator serves the same ring at the same version: no agent moves
    second = Membership(ttl_s=6.0, heartbeat_interval_s=2.0, clock=clock, store=db)
    assert second.ring().version == 2 and [m.id for m in second.ring().members] == ["a", "b"]
    assert {s.info.id: s.round for s in second.status()}["a"] == 7
    # a heartbeats within its grace period (no info needed); b never does and leaves
    clock.now += 3.0
    second.heartbeat("a", Progress(round=8))
    clock.now += 3.5
    assert second.expire() == ["b"]
    assert second.ring().version == 3
    second.close()

    third = Membership(ttl_s=6.0, heartbeat_interval_s=2.0, clock=clock, store=db)
    assert third.ring().version == 3 and [m.id for m in third.ring().members] == ["a"]
    third.register(info("c", 7072))
    assert third.ring().version == 4
    third.close()


def test_static_members_form_a_permanent_ring() -> None:
    clock = FakeClock()
    members = [Member(id="a", address="h:1"), Member(id="b", address="h:2")]
    membership = Membership(clock=clock, static_members=members)
    membership.register(info("c"))
    clock.now += 100
    membership.expire()
    ring = membership.ring()
    assert ring.version == 1 and [m.id for m in ring.members] == ["a", "b"]


# ---------------------------------------------------------------- model index


@pytest.fixture
def index(tmp_path: Path) -> ModelIndex:
    idx = ModelIndex(tmp_path / "index.db")
    yield idx
    idx.close()


def test_index_records_and_queries(index: ModelIndex, keypair: KeyPair) -> None:
    base = make_manifest(keypair, kind="base", producer="agg-a", round=0)
    a1 = make_manifest(keypair, producer="agg-a", round=1, parents=(base.cid,))
    b1 = make_manifest(keypair, producer="agg-b", round=1, parents=(base.cid,))
    a2 = make_manifest(keypair, producer="agg-a", round=2, parents=(a1.cid,))
    semi = make_manifest(
        keypair, kind="semi-global", producer="agg-a", round=2, parents=(a2.cid, b1.cid)
    )
    for m in (base, a1, b1, a2, semi):
        assert index.record(m.to_bytes()) == m.cid
    # idempotent; notes merge
    assert index.record(a1.to_bytes(), {"screened": "ok"}) == a1.cid
    assert index.count() == 5
    record = index.get(a1.cid)
    assert record.notes == {"screened": "ok"}
    assert record.kind == "cluster" and record.producer == "agg-a" and record.round == 1
    assert (
        record.parents == (base.cid,) and record.weights == a1.weights and record.num_samples == 20
    )
    assert record.metrics == {"loss": 0.5} and record.manifest == a1.to_bytes()
    assert record.created_at == pytest.approx(1767225600.0)

    assert {r.cid for r in index.list(kind="cluster")} == {a1.cid, b1.cid, a2.cid}
    assert [r.cid for r in index.list(kind="cluster", aggregator="agg-a")] == [a2.cid, a1.cid]
    assert {r.cid for r in index.list(round=1)} == {a1.cid, b1.cid}
    assert [r.cid for r in index.list(round=0)] == [base.cid]
    assert index.list(federation="mnist") == []
    latest = index.list(kind="cluster", latest_per_aggregator=True)
    assert {r.producer: r.cid for r in latest} == {"agg-a": a2.cid, "agg-b": b1.cid}
    assert len(index.list(limit=2)) == 2

    assert [r.cid for r in index.parents(semi.cid)] == [a2.cid, b1.cid]
    assert {r.cid for r in index.children(base.cid)} == {a1.cid, b1.cid}
    with pytest.raises(NotFound):
        index.get(cid_of(b"never announced"))


def test_index_merges_notes_and_counts_reported_agents(tmp_path: Path, keypair: KeyPair) -> None:
    path = tmp_path / "index.db"
    model = make_manifest(keypair)
    with ModelIndex(path) as index:
        index.record(model.to_bytes(), {"screened": "ok", "by": "agg-a"})
        index.record(model.to_bytes(), {"by": "agg-b"})
        index.record(model.to_bytes())
        assert index.report_agents("agg-a", [AgentEntry(agent_id="x"), AgentEntry(agent_id="y")]) == 2
        assert index.report_agents("agg-a", [AgentEntry(agent_id="y")]) == 1
    with ModelIndex(path) as reopened:  # durable, and the same schema version
        assert reopened.get(model.cid).notes == {"screened": "ok", "by": "agg-b"}
        assert [a.agent_id for a in reopened.list_agents()] == ["y"]


def test_lineage_walks_parents_breadth_first(index: ModelIndex, keypair: KeyPair) -> None:
    unknown_parent = cid_of(b"a model the index never saw")
    base = make_manifest(keypair, kind="base", round=0, parents=(unknown_parent,))
    a1 = make_manifest(keypair, round=1, parents=(base.cid,))
    b1 = make_manifest(keypair, producer="agg-b", round=1, parents=(base.cid,))
    semi = make_manifest(keypair, kind="semi-global", round=1, parents=(a1.cid, b1.cid))
    child = make_manifest(keypair, round=2, parents=(semi.cid,))
    for m in (base, a1, b1, semi, child):
        index.record(m.to_bytes())

    lineage = index.lineage(semi.cid, depth=10)
    assert lineage.model.cid == semi.cid
    # base appears once, after both of its children
    assert [r.cid for r in lineage.ancestors] == [a1.cid, b1.cid, base.cid]
    assert [r.cid for r in lineage.children] == [child.cid]
    assert lineage.missing == [unknown_parent]
    shallow = index.lineage(semi.cid, depth=1)
    assert [r.cid for r in shallow.ancestors] == [a1.cid, b1.cid] and shallow.missing == []


def test_index_refuses_bad_manifests(index: ModelIndex, keypair: KeyPair) -> None:
    with pytest.raises(InvalidInput):
        index.record(b"{not json")
    good = make_manifest(keypair)
    tampered = dataclasses.replace(good, num_samples=999_999)  # signature no longer matches
    with pytest.raises(IntegrityError):
        index.record(tampered.to_bytes())
    unsigned = dataclasses.replace(good, signature=None)
    with pytest.raises(IntegrityError):
        index.record(unsigned.to_bytes())
    assert index.count() == 0


def test_agent_directory_snapshots(index: ModelIndex) -> None:
    index.report_agents(
        "agg-a",
        [
            AgentEntry(
                agent_id="x", last_seen=10.0, telemetry={"cpu_percent": 5.0}, capability="train"
            ),
            AgentEntry(agent_id="y", last_seen=10.0, capability="inference", display_name="phone"),
        ],
    )
    index.report_agents("agg-b", [AgentEntry(agent_id="z", last_seen=11.0)])
    assert [(a.agent_id, a.home) for a in index.list_agents()] == [
        ("x", "agg-a"),
        ("y", "agg-a"),
        ("z", "agg-b"),
    ]
    # x moved to agg-b; agg-a's next snapshot no longer lists y, and its stale view of x loses
    index.report_agents(
        "agg-b",
        [AgentEntry(agent_id="z", last_seen=12.0), AgentEntry(agent_id="x", last_seen=20.0)],
    )
    index.report_agents("agg-a", [AgentEntry(agent_id="x", last_seen=15.0)])
    agents = {a.agent_id: a for a in index.list_agents()}
    assert (
        set(agents) == {"x", "z"} and agents["x"].home == "agg-b" and agents["x"].last_seen == 20.0
    )
    assert [a.agent_id for a in index.list_agents("agg-b")] == ["x", "z"]


# ---------------------------------------------------------------- over gRPC


@pytest.fixture
def daemon(tmp_path: Path) -> CoordinatorDaemon:
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "coord"),
        lease_ttl_s=1.0,
        heartbeat_interval_s=0.2,
    )
    d = CoordinatorDaemon(config).start()
    yield d
    d.stop(grace=0)


@pytest.fixture
def stub(daemon: CoordinatorDaemon) -> pb_grpc.CoordinatorServiceStub:
    channel = create_channel(daemon.address)
    yield pb_grpc.CoordinatorServiceStub(channel)
    channel.close()


def _register(stub: pb_grpc.CoordinatorServiceStub, agg_id: str, port: int) -> pb.Lease:
    return stub.RegisterAggregator(
        pb.AggregatorInfo(id=agg_id, address=f"127.0.0.1:{port}", weight=1.0), timeout=5
    )


def test_watch_ring_delivers_register_and_expiry(stub: pb_grpc.CoordinatorServiceStub) -> None:
    lease = _register(stub, "a", 7070)
    assert (
        lease.ttl_s == 1.0
        and lease.heartbeat_interval_s == pytest.approx(0.2)
        and lease.ring_version >= 1
    )
    stream = stub.WatchRing(pb.WatchRingRequest(known_version=0), timeout=10)
    try:
        first = next(stream)
        assert first.version == lease.ring_version and [m.id for m in first.members] == ["a"]
        _register(stub, "b", 7071)
        second = next(stream)
        assert second.version == first.version + 1 and [m.id for m in second.members] == ["a", "b"]
        # nobody heartbeats: both leases run out (ttl 1 s, checked every 0.5 s); the stream's
        # 10 s deadline only makes a lease that never expires fail the test
        ring = next(stream)
        while ring.members:
            ring = next(stream)
        assert ring.version > second.version
    finally:
        stream.cancel()
    status = stub.FleetStatus(pb.FleetStatusRequest(), timeout=5)
    assert {a.info.id: a.alive for a in status.aggregators} == {"a": False, "b": False}


def test_service_models_and_agents(stub: pb_grpc.CoordinatorServiceStub, keypair: KeyPair) -> None:
    base = make_manifest(keypair, kind="base", round=0)
    cluster = make_manifest(keypair, round=1, parents=(base.cid,))
    for m in (base, cluster):
        reply = stub.AnnounceModel(
            pb.AnnounceModelRequest(manifest=m.to_bytes(), notes={"n": "1"}), timeout=5
        )
        assert reply.model_cid == m.cid
    listed = stub.ListModels(pb.ListModelsRequest(kind="cluster"), timeout=5).models
    assert [r.model_cid for r in listed] == [cluster.cid]
    assert (
        listed[0].parents == [base.cid]
        and listed[0].producer == "agg-a"
        and listed[0].manifest == cluster.to_bytes()
    )
    lineage = stub.GetLineage(pb.LineageRequest(model_cid=cluster.cid), timeout=5)
    assert [r.model_cid for r in lineage.ancestors] == [base.cid] and not lineage.missing

    with pytest.raises(grpc.RpcError) as bad:
        stub.AnnounceModel(pb.AnnounceModelRequest(manifest=b'{"kind": "cluster"}'), timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        stub.GetLineage(pb.LineageRequest(model_cid=cid_of(b"nothing")), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    stub.ReportAgents(
        pb.ReportAgentsRequest(
            aggregator_id="agg-a",
            agents=[
                pb.AgentRecord(
                    agent_id="x",
                    last_seen=5.0,
                    capability=pb.INFERENCE,
                    telemetry=pb.Telemetry(cpu_percent=12.5, network="wifi"),
                )
            ],
        ),
        timeout=5,
    )
    agents = stub.ListAgents(pb.ListAgentsRequest(aggregator="agg-a"), timeout=5).agents
    assert (
        len(agents) == 1
        and agents[0].home_aggregator == "agg-a"
        and agents[0].capability == pb.INFERENCE
    )
    assert agents[0].telemetry.cpu_percent == 12.5 and agents[0].telemetry.network == "wifi"


def test_heartbeat_of_unknown_aggregator_is_not_found(stub: pb_grpc.CoordinatorServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.HeartbeatAggregator(pb.AggregatorHeartbeat(id="ghost"), timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    lease = stub.HeartbeatAggregator(
        pb.AggregatorHeartbeat(
            id="ghost", info=pb.AggregatorInfo(id="ghost", address="127.0.0.1:1")
        ),
        timeout=5,
    )
    assert lease.ring_version >= 1
    ring = stub.GetRing(pb.GetRingRequest(), timeout=5)
    assert [m.id for m in ring.members] == ["ghost"] and ring.members[0].weight == 1.0


def test_daemon_restart_on_same_state_dir(tmp_path: Path) -> None:
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "coord"),
        lease_ttl_s=1.0,
        heartbeat_interval_s=0.2,
    )
    with CoordinatorDaemon(config) as first:
        channel = create_channel(first.address)
        stub = pb_grpc.CoordinatorServiceStub(channel)
        _register(stub, "a", 7070)
        _register(stub, "b", 7071)
        version = stub.GetRing(pb.GetRingRequest(), timeout=5).version
        channel.close()
    with CoordinatorDaemon(config) as second:
        channel = create_channel(second.address)
        stub = pb_grpc.CoordinatorServiceStub(channel)
        ring = stub.GetRing(pb.GetRingRequest(), timeout=5)
        assert ring.version == version and [m.id for m in ring.members] == ["a", "b"]
        deadline = time.monotonic() + 15.0  # b's lease runs out after 1 s; the bound only stops a hang
        while time.monotonic() < deadline:  # only a heartbeats
            stub.HeartbeatAggregator(pb.AggregatorHeartbeat(id="a"), timeout=5)
            ring = stub.GetRing(pb.GetRingRequest(), timeout=5)
            if [m.id for m in ring.members] == ["a"]:
                break
            time.sleep(0.2)
        assert [m.id for m in ring.members] == ["a"] and ring.version > version
        channel.close()
    assert second.wait(0)


def test_static_daemon(tmp_path: Path) -> None:
    config = CoordinatorConfig(
        listen="127.0.0.1:0", state_dir=str(tmp_path / "c"), members=["a=h:1", "b=h:2"]
    )
    with CoordinatorDaemon(config) as daemon:
        channel = create_channel(daemon.address)
        ring = pb_grpc.CoordinatorServiceStub(channel).GetRing(pb.GetRingRequest(), timeout=5)
        channel.close()
    assert ring.version == 1 and [m.id for m in ring.members] == ["a", "b"]


# ---------------------------------------------------------------- announcements with TLS


def test_with_tls_only_the_producer_announces_its_certified_models(index: ModelIndex, tmp_path: Path) -> None:
    now = rfc3339(time.time())
    with FleetCA.init(tmp_path / "ca", "demo") as ca:
        agg_a = ca.issue(Identity(Role.AGGREGATOR, "agg-a"), KeyPair.generate())
        agg_b = ca.issue(Identity(Role.AGGREGATOR, "agg-b"), KeyPair.generate())
        key_a = agg_a.manifest_key.with_certificate(agg_a.cert_pem.decode())
        signers = Signers(ca.cert)

        def refused(manifest: Manifest, announcer: Bundle = agg_a, check: Signers = signers) -> str:
            with pytest.raises(PermissionDenied) as info:
                index.record(manifest.to_bytes(), announcer=announcer.certified, signers=check)
            return info.value.reason

        cluster = make_manifest(key_a, created_at=now)
        assert index.record(cluster.to_bytes(), announcer=agg_a.certified, signers=signers) == cluster.cid
        # agg-b relaying agg-a's genuine model: only the producer announces
        assert refused(make_manifest(key_a, round=2, created_at=now), announcer=agg_b) == "not_producer"
        # a device update agg-a recorded for an agent is indexed when agg-a announces it, and only then
        recorded = dataclasses.replace(
            make_manifest(key_a, kind="local", created_at=now), producer=Producer(role="agent", id="a1"), extra={"recorded_by": "agg-a"}
        ).signed(key_a)
        assert refused(recorded, announcer=agg_b) == "not_producer"
        assert index.record(recorded.to_bytes(), announcer=agg_a.certified, signers=signers) == recorded.cid
        # a key of agg-a's own that its certificate does not certify; the certified key without its certificate
        assert refused(make_manifest(KeyPair.generate(), round=3, created_at=now)) == "uncertified_signer"
        assert refused(make_manifest(agg_a.manifest_key, round=4, created_at=now)) == "uncertified_signer"
        # revoked since
        revoked = Signers(ca.cert, revocations=ca.revoke(identities=[Identity(Role.AGGREGATOR, "agg-a")]))
        assert refused(make_manifest(key_a, round=5, created_at=now), check=revoked) == "uncertified_signer"
    assert sorted(r.cid for r in index.list()) == sorted([cluster.cid, recorded.cid])
