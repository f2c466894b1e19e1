"""CoordinatorClient against the real CoordinatorServicer on an in-process server: domain values
back, and every gRPC failure translated once into a typed error."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from coordinator.client import AgentEntry, AggregatorInfo, CoordinatorClient, Progress
from coordinator.index import MAX_BATCH, ModelIndex
from coordinator.membership import Membership
from coordinator.service import ANNOUNCE_CONCURRENCY, CoordinatorServicer
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import (
    FailedPrecondition,
    IntegrityError,
    InvalidInput,
    NotFound,
    StrataError,
    Unavailable,
)
from proto.serving import ServerHandle, create_server
from proto.wire import create_channel, is_retryable
from storage.cid import cid_of
from storage.keys import KeyPair
from tests.test_coordinator import make_manifest


@pytest.fixture
def served() -> Iterator[tuple[ServerHandle, Membership, ModelIndex]]:
    membership, index = Membership(), ModelIndex(None)
    handle = create_server("127.0.0.1:0", workers=4)
    pb_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(membership, index, offload=handle.offload), handle.server
    )
    with handle:
        yield handle, membership, index
    membership.close()
    index.close()


@pytest.fixture
def client(served: tuple[ServerHandle, Membership, ModelIndex]) -> Iterator[CoordinatorClient]:
    with CoordinatorClient(served[0].address, timeout_s=5.0) as c:
        yield c


def test_membership_calls_return_domain_values(
    client: CoordinatorClient, served: tuple[ServerHandle, Membership, ModelIndex]
) -> None:
    _, membership, _ = served
    lease = client.register(AggregatorInfo(id="a", address="127.0.0.1:7070", federations=("digits",)))
    assert lease.ring_version == 1 and lease.heartbeat_interval_s == membership.heartbeat_interval_s
    client.register(AggregatorInfo(id="b", address="127.0.0.1:7071", federations=("mnist",)))
    lease = client.heartbeat("a", Progress(round=4, agent_count=2, last_cluster_cid="c1"))
    assert lease.ring_version == 2

    ring = client.ring()
    assert ring.version == 2 and ring.same_members(membership.ring())
    assert [m.id for m in client.ring("digits").members] == ["a"]

    fleet = client.fleet_status()
    assert fleet.ring.same_members(ring)
    status = {s.info.id: s for s in fleet.aggregators}
    assert status["a"].round == 4 and status["a"].last_cluster_cid == "c1" and status["a"].alive
    assert status["b"].info.federations == ("mnist",)


def test_models_and_agents_round_trip(
    client: CoordinatorClient, served: tuple[ServerHandle, Membership, ModelIndex], keypair: KeyPair
) -> None:
    _, _, index = served
    base = make_manifest(keypair, kind="base", round=0)
    cluster = make_manifest(keypair, round=1, parents=(base.cid,))
    assert [client.announce(m.to_bytes(), {"n": "1"}) for m in (base, cluster)] == [base.cid, cluster.cid]

    [record] = client.list_models(kind="cluster")
    assert record.cid == cluster.cid and record.parents == (base.cid,) and record.manifest == cluster.to_bytes()
    assert record.weights == cluster.weights and record.metrics == {"loss": 0.5}
    lineage = client.lineage(cluster.cid)
    assert [r.cid for r in lineage.ancestors] == [base.cid] and lineage.missing == []
    assert lineage.model.manifest == cluster.to_bytes()
    slim = client.lineage(cluster.cid, with_manifests=False)
    assert slim.model.manifest == b"" and slim.model.parents == (base.cid,) and slim.model.kind == "cluster"

    client.report_agents(
        "agg-a", [AgentEntry(agent_id="x", last_seen=5.0, capability="inference", telemetry={"cpu_percent": 12.5})]
    )
    [entry] = index.list_agents("agg-a")
    assert entry.capability == "inference" and entry.telemetry["cpu_percent"] == 12.5
    [listed] = client.list_agents()
    assert listed.agent_id == "x" and listed.home == "agg-a" and listed.telemetry["cpu_percent"] == 12.5
    assert client.list_agents("agg-b") == []


def test_a_batch_of_announcements_answers_item_by_item(
    client: CoordinatorClient, served: tuple[ServerHandle, Membership, ModelIndex], keypair: KeyPair
) -> None:
    _, _, index = served
    base = make_manifest(keypair, kind="base", round=0, seed="batch")
    cluster = make_manifest(keypair, round=1, parents=(base.cid,), seed="batch")
    forged = dataclasses.replace(make_manifest(keypair, round=2, seed="batch"), num_samples=1)
    results = client.announce_many(
        [
            (base.to_bytes(), {"n": "1"}),
            (b"not a manifest", None),
            (forged.to_bytes(), None),
            (cluster.to_bytes(), None),
        ]
    )
    assert [(r.cid, r.reason) for r in results] == [
        (base.cid, ""),
        ("", "invalid_manifest"),
        ("", "bad_signature"),
        (cluster.cid, ""),
    ]
    assert results[2].refused and "signature" in results[2].message
    assert index.count() == 2 and index.get(base.cid).notes == {"n": "1"}
    assert [r.cid for r in client.lineage(cluster.cid).ancestors] == [base.cid]
    # resending is safe: the same verdicts, nothing indexed twice
    assert client.announce_many([(cluster.to_bytes(), None), (b"not a manifest", None)])[0].cid == cluster.cid
    assert index.count() == 2 and client.announce_many([]) == []


def test_a_batch_over_the_coordinators_limit_is_refused_whole(client: CoordinatorClient) -> None:
    with pytest.raises(InvalidInput) as refused:
        client.announce_many([(b"{}", None)] * (MAX_BATCH + 1))
    assert refused.value.reason == "batch_too_large" and not is_retryable(refused.value)


class _SlowIndex(ModelIndex):
    """Takes 0.2 s a batch and remembers how many batches it held at once."""

    def __init__(self) -> None:
        super().__init__(None)
        self._guard = threading.Lock()
        self.inside = self.most = 0

    def record_many(self, items, **checks):  # type: ignore[no-untyped-def]
        with self._guard:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.2)
        with self._guard:
            self.inside -= 1
        return super().record_many(items, **checks)


def test_batches_take_at_most_two_offload_workers() -> None:
    membership, index = Membership(), _SlowIndex()
    handle = create_server("127.0.0.1:0", workers=4)
    pb_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(membership, index, offload=handle.offload), handle.server
    )
    with handle, CoordinatorClient(handle.address, timeout_s=10.0) as client:
        with ThreadPoolExecutor(6) as senders:
            batches = [senders.submit(client.announce_many, [(b"not a manifest", None)]) for _ in range(6)]
            # the other two workers stay free for membership meanwhile
            client.register(AggregatorInfo(id="a", address="127.0.0.1:7070"))
            assert [f.result()[0].reason for f in batches] == ["invalid_manifest"] * 6
    assert 1 <= index.most <= ANNOUNCE_CONCURRENCY == 2
    membership.close()
    index.close()


def test_refusals_become_typed_errors(client: CoordinatorClient, keypair: KeyPair) -> None:
    with pytest.raises(NotFound) as unknown:
        client.heartbeat("ghost")
    assert unknown.value.reason == "unknown_aggregator"
    assert isinstance(unknown.value.__cause__, grpc.RpcError)  # translated once, the cause kept

    with pytest.raises(InvalidInput):
        client.announce(b"not a manifest")
    tampered = dataclasses.replace(make_manifest(keypair), num_samples=999_999)  # the signature no longer matches
    with pytest.raises(IntegrityError):
        client.announce(tampered.to_bytes())
    with pytest.raises(NotFound) as missing:
        client.lineage(cid_of(b"never announced"))
    assert missing.value.reason == "unknown_model"
    with pytest.raises(InvalidInput) as bad:
        client.lineage("not-a-cid")
    assert not is_retryable(bad.value)


def test_transport_failures_are_unavailable_and_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with CoordinatorClient(f"127.0.0.1:{port}", timeout_s=2.0) as nobody:
        with pytest.raises(Unavailable) as down:
            nobody.ring()
    assert is_retryable(down.value)


def test_a_watch_ends_at_its_deadline_as_unavailable(client: CoordinatorClient) -> None:
    client.register(AggregatorInfo(id="a", address="127.0.0.1:7070"))
    watch = client.watch_ring(timeout_s=0.3)
    rings = []
    with pytest.raises(Unavailable) as ended:
        for ring in watch:
            rings.append(ring)
    assert [r.version for r in rings] == [1]  # known_version 0: the current ring first
    assert ended.value.reason == "deadline_exceeded" and is_retryable(ended.value)


def test_a_server_without_the_service_is_unimplemented() -> None:
    with create_server("127.0.0.1:0") as bare, CoordinatorClient(bare.address) as client:
        with pytest.raises(StrataError) as refused:
            client.ring()
    assert refused.value.status == "UNIMPLEMENTED" and not is_retryable(refused.value)


def test_channel_factory_is_used_and_closed_clients_refuse_calls(
    served: tuple[ServerHandle, Membership, ModelIndex],
) -> None:
    opened: list[str] = []

    def factory(address: str) -> grpc.Channel:
        opened.append(address)
        return create_channel(address)

    client = CoordinatorClient(served[0].address, channel_factory=factory)
    assert client.ring().version == 0 and opened == [served[0].address]
    client.close()
    client.close()
    with pytest.raises(FailedPrecondition) as closed:
        client.ring()
    assert closed.value.reason == "closed"
