"""The aggregator's CoordinatorLink against a real coordinator over gRPC; its outbox alone."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from aggregator.coordination import CoordinatorLink
from aggregator.ringview import RingView
from coordinator.client import CoordinatorClient
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.membership import AggregatorInfo
from coordinator.ring import Member, Ring
from intake.agents import AgentInfo
from proto.errors import InvalidInput
from proto.wire import create_channel
from storage.keys import KeyPair
from tests.agent_service_contract import wait_until
from tests.test_coordinator import make_manifest

TTL_S, HEARTBEAT_S = 1.0, 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coordinator(state_dir: Path, port: int = 0) -> CoordinatorDaemon:
    config = CoordinatorConfig(
        listen=f"127.0.0.1:{port}",
        state_dir=str(state_dir),
        lease_ttl_s=TTL_S,
        heartbeat_interval_s=HEARTBEAT_S,
    )
    return CoordinatorDaemon(config).start()


def own_ring(agg_id: str, port: int) -> RingView:
    # what an aggregator starts with before it hears from the coordinator
    return RingView(Ring([Member(id=agg_id, address=f"127.0.0.1:{port}")], version=1))


def make_link(
    address: str, agg_id: str, port: int, tmp_path: Path, **kwargs: object
) -> CoordinatorLink:
    channel_factory = kwargs.pop("channel_factory", None)
    client = CoordinatorClient(address) if channel_factory is None else CoordinatorClient(address, channel_factory=channel_factory)
    return CoordinatorLink(
        client,
        info=AggregatorInfo(id=agg_id, address=f"127.0.0.1:{port}", federations=("digits",)),
        ring_view=kwargs.pop("ring_view", None) or own_ring(agg_id, port),
        status_fn=kwargs.pop("status_fn", lambda: {"round": 3, "agent_count": 2}),
        state_dir=tmp_path / f"link-{agg_id}",
        retry_max_s=0.5,
        **kwargs,
    )


def test_links_and_coordinator_build_identical_rings(tmp_path: Path) -> None:
    daemon = coordinator(tmp_path / "coord")
    links = [make_link(daemon.address, f"agg-{n}", 7000 + n, tmp_path) for n in range(3)]
    try:
        for link in links:
            link.start()
        assert daemon.membership is not None
        assert wait_until(lambda: len(daemon.membership.ring()) == 3)
        central = daemon.membership.ring()
        assert wait_until(
            lambda: all(link.ring_view.ring.version == central.version for link in links)
        )
        agents = [f"agent-{i}" for i in range(1000)]
        expected = central.assignments(agents)
        assert len(set(expected.values())) == 3
        for link in links[:2]:
            assert link.ring_view.ring.assignments(agents) == expected
    finally:
        for link in links:
            link.stop()
        daemon.stop(grace=0)


def test_link_survives_a_late_coordinator_and_catches_up(tmp_path: Path, keypair: KeyPair) -> None:
    port = free_port()
    agents = [
        AgentInfo(
            agent_id="phone-1",
            capability="inference",
            telemetry={"cpu_percent": 3.0},
            last_seen=9.0,
        )
    ]
    link = make_link(
        f"127.0.0.1:{port}",
        "agg-a",
        7070,
        tmp_path,
        agents_fn=lambda: agents,
        agents_interval_s=0.1,
    )
    manifests = [make_manifest(keypair, round=r, seed="late") for r in (1, 2)]
    daemon = None
    try:
        link.start()  # returns at once: test_start_never_waits_for_the_coordinator
        for m in manifests:
            link.announce(m.to_bytes(), notes={"source": "test"})
        time.sleep(0.6)
        assert not link.registered.is_set() and link.pending_announcements() == 2
        assert link.ring_view.ring.version == 1  # still its own ring

        daemon = coordinator(tmp_path / "coord", port)
        assert link.flush(timeout_s=5.0)
        assert daemon.index is not None and daemon.membership is not None
        assert [r.cid for r in daemon.index.list()] == [m.cid for m in reversed(manifests)]
        assert daemon.index.get(manifests[0].cid).notes == {"source": "test"}
        assert wait_until(link.registered.is_set)
        assert wait_until(
            lambda: (
                link.ring_view.ring.member("agg-a") is not None and link.ring_view.ring.version >= 1
            )
        )
        assert wait_until(
            lambda: [a.agent_id for a in daemon.index.list_agents("agg-a")] == ["phone-1"]
        )
        assert daemon.index.list_agents()[0].capability == "inference"
        assert wait_until(
            lambda: {s.info.id: s.round for s in daemon.membership.status()}.get("agg-a") == 3
        )
    finally:
        link.stop()
        if daemon is not None:
            daemon.stop(grace=0)


def test_backlog_survives_a_link_restart(tmp_path: Path, keypair: KeyPair) -> None:
    port = free_port()
    manifest = make_manifest(keypair, seed="durable")
    first = make_link(f"127.0.0.1:{port}", "agg-a", 7070, tmp_path).start()
    first.announce(manifest.to_bytes())
    first.stop()
    daemon = coordinator(tmp_path / "coord", port)
    second = make_link(daemon.address, "agg-a", 7070, tmp_path).start()
    try:
        assert second.flush(timeout_s=5.0)
        assert daemon.index is not None and daemon.index.get(manifest.cid).cid == manifest.cid
    finally:
        second.stop()
        daemon.stop(grace=0)


def test_refused_announcement_is_dropped(tmp_path: Path) -> None:
    daemon = coordinator(tmp_path / "coord")
    link = make_link(daemon.address, "agg-a", 7070, tmp_path).start()
    try:
        link.announce(b"not a manifest")
        assert link.flush(timeout_s=5.0)
        assert daemon.index is not None and daemon.index.count() == 0
    finally:
        link.stop()
        daemon.stop(grace=0)


def test_a_backlog_with_a_refused_manifest_catches_up(tmp_path: Path, keypair: KeyPair) -> None:
    port = free_port()
    manifests = [make_manifest(keypair, round=r, seed="backlog") for r in range(7)]
    link = make_link(f"127.0.0.1:{port}", "agg-a", 7070, tmp_path).start()
    daemon = None
    try:
        for n, m in enumerate(manifests):  # queued while the coordinator is away
            link.announce(m.to_bytes(), notes={"n": str(n)})
            if n == 3:
                link.announce(b"not a manifest")
        daemon = coordinator(tmp_path / "coord", port)
        assert link.flush(timeout_s=10.0) and link.pending_announcements() == 0
        assert daemon.index is not None and daemon.index.count() == 7
        assert daemon.index.get(manifests[5].cid).notes == {"n": "5"}
    finally:
        link.stop()
        if daemon is not None:
            daemon.stop(grace=0)


@pytest.mark.slow
def test_coordinator_restart_brings_the_ring_back(tmp_path: Path, keypair: KeyPair) -> None:
    port = free_port()
    state = tmp_path / "coord"
    daemon = coordinator(state, port)
    view_a = own_ring("agg-a", 7070)
    link_a = make_link(daemon.address, "agg-a", 7070, tmp_path, ring_view=view_a).start()
    link_b = make_link(daemon.address, "agg-b", 7071, tmp_path).start()
    try:
        assert wait_until(lambda: [m.id for m in view_a.ring.members] == ["agg-a", "agg-b"])
        before = view_a.ring

        daemon.stop(grace=0)
        link_b.stop()  # b dies while the coordinator is down
        manifest = make_manifest(keypair, seed="while-down")
        link_a.announce(manifest.to_bytes())
        time.sleep(2 * TTL_S)
        assert view_a.ring is before  # the last ring stays in force

        daemon = coordinator(state, port)
        assert daemon.membership is not None and daemon.index is not None
        # a keeps its lease by heartbeating; b, silent, leaves after one ttl
        assert wait_until(lambda: [m.id for m in view_a.ring.members] == ["agg-a"], timeout=5.0)
        assert view_a.ring.version > before.version
        assert link_a.flush(timeout_s=5.0) and daemon.index.get(manifest.cid)

        # a coordinator that lost its state learns about a from its heartbeats
        daemon.stop(grace=0)
        daemon = coordinator(tmp_path / "coord-lost-state", port)
        assert daemon.membership is not None
        assert wait_until(
            lambda: [m.id for m in daemon.membership.ring().members] == ["agg-a"], timeout=5.0
        )
    finally:
        link_a.stop()
        link_b.stop()
        daemon.stop(grace=0)


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "held by the test, then released"


class _Gate(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Holds every RPC on a channel, counting them; once released, each fails as UNAVAILABLE.
    No call ever reaches the channel (grpc crashes a continuation run after close())."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.held = 0

    def _hold(self, continuation, details, request):  # noqa: ANN001, ANN202 - grpc's interceptor signature
        self.held += 1
        self.released.wait(60)
        raise _Unavailable()

    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = _hold


def test_start_never_waits_for_the_coordinator(tmp_path: Path) -> None:
    gate = _Gate()
    link = make_link(
        f"127.0.0.1:{free_port()}",
        "agg-a",
        7070,
        tmp_path,
        channel_factory=lambda address: grpc.intercept_channel(create_channel(address), gate),
    )
    starter = threading.Thread(target=link.start, daemon=True)
    try:
        starter.start()
        starter.join(timeout=30)  # every RPC is held: a start() that waits for one never returns
        assert not starter.is_alive(), "start() waited for a call to the coordinator"
        assert wait_until(lambda: gate.held >= 1), "the link never called the coordinator"
        assert not link.registered.is_set()
    finally:
        gate.released.set()
        link.stop()


def test_stop_is_idempotent_and_bounded(tmp_path: Path) -> None:
    link = make_link(f"127.0.0.1:{free_port()}", "agg-a", 7070, tmp_path).start()
    stopper = threading.Thread(target=lambda: (link.stop(), link.stop()), daemon=True)
    stopper.start()
    stopper.join(timeout=30)  # stop() joins its threads within about 2 s; this only catches a hang
    assert not stopper.is_alive(), "stop() did not return"
    with pytest.raises(InvalidInput):
        link.start()


def test_ring_view_takes_an_authoritative_ring_with_a_lower_version() -> None:
    a, b = Member(id="a", address="h:1"), Member(id="b", address="h:2")
    view = RingView(Ring([a, b], version=9))
    assert not view.update(Ring([a], version=2)), "an older version from a stream is ignored"
    assert view.update(Ring([a], version=2), authoritative=True), "the coordinator's answer after a reset wins"
    assert [m.id for m in view.ring.members] == ["a"] and view.ring.version == 2


def test_a_coordinator_that_lost_its_state_is_followed_again(tmp_path: Path) -> None:
    """Its versions restart at 1; the aggregators must still follow its ring."""
    port = free_port()
    first = coordinator(tmp_path / "one", port)
    view = own_ring("agg-a", 7100)
    link = make_link(first.address, "agg-a", 7100, tmp_path, ring_view=view).start()
    second = None
    try:
        assert first.membership is not None
        for n in range(3):
            first.membership.register(AggregatorInfo(id=f"agg-{'bcd'[n]}", address=f"127.0.0.1:{7101 + n}"))
        assert wait_until(lambda: len(view.ring) == 4, 10), view.ring.members
        held = view.ring.version
        first.stop()
        second = coordinator(tmp_path / "two", port)  # a fresh state dir: the count starts over
        assert wait_until(lambda: [m.id for m in view.ring.members] == ["agg-a"], 15), view.ring.members
        assert view.ring.version < held
        assert second.membership is not None
        second.membership.register(AggregatorInfo(id="agg-e", address="127.0.0.1:7105"))
        assert wait_until(lambda: [m.id for m in view.ring.members] == ["agg-a", "agg-e"], 10), view.ring.members
    finally:
        link.stop()
        first.stop()
        if second is not None:
            second.stop()
