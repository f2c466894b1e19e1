"""Consistent-hash placement: remapping on leave and join, ring walk order, and join redirects between real aggregators."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.client import Client
from aggregator.config import AggregatorConfig
from aggregator.daemon import AggregatorDaemon
from coordinator.ring import Member, Ring, remapped_fraction
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import create_channel
from strata.supervise import free_port
from strata.wiring import initial_model_factory

AGENTS = [f"agent-{i}" for i in range(20_000)]


def _members(n: int) -> list[Member]:
    return [Member(id=f"agg-{i}", address=f"10.0.0.{i}:7070") for i in range(n)]


@pytest.mark.parametrize("n", [3, 5, 10])
def test_a_leaving_member_moves_only_its_own_agents(n: int) -> None:
    before = Ring(_members(n), version=1)
    gone = before.members[1].id
    after = Ring([m for m in before.members if m.id != gone], version=2)
    owners_before, owners_after = before.assignments(AGENTS), after.assignments(AGENTS)
    moved = [a for a in AGENTS if owners_before[a] != owners_after[a]]
    assert all(owners_before[a] == gone for a in moved), "only the departed member's agents may move"
    fraction = remapped_fraction(before, after, AGENTS)
    assert abs(fraction - 1 / n) < 0.5 / n, f"moved {fraction:.3f}, expected about {1 / n:.3f}"


@pytest.mark.parametrize("n", [3, 5, 10])
def test_a_joining_member_takes_about_its_share(n: int) -> None:
    before = Ring(_members(n), version=1)
    after = Ring(_members(n + 1), version=2)
    owners_after = after.assignments(AGENTS)
    moved = [a for a in AGENTS if before.owner(a).id != owners_after[a]]
    assert all(owners_after[a] == f"agg-{n}" for a in moved), "agents only move to the newcomer"
    assert abs(len(moved) / len(AGENTS) - 1 / (n + 1)) < 0.5 / (n + 1)


def test_ring_is_a_pure_function_of_membership() -> None:
    members = _members(4)
    one, two = Ring(members, version=7), Ring(list(reversed(members)), version=7)
    assert one.assignments(AGENTS[:2000]) == two.assignments(AGENTS[:2000])


def test_join_at_a_non_owner_is_redirected_to_the_owner(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    peers = [f"agg-{c}=127.0.0.1:{p}" for c, p in zip("abc", ports, strict=True)]
    daemons = []
    try:
        for c, port in zip("abc", ports, strict=True):
            config = AggregatorConfig(
                id=f"agg-{c}", listen=f"127.0.0.1:{port}", peers=peers, state_dir=str(tmp_path / c), store=str(tmp_path / "store")
            )
            daemons.append(AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start())
        ring = daemons[0].ring_view.ring
        agent = next(a for a in AGENTS if ring.owner(a).id != "agg-a")
        owner = ring.owner(agent)

        stub = pb_grpc.AgentServiceStub(create_channel(daemons[0].address))
        reply = stub.Join(pb.JoinRequest(agent_id=agent, federation="digits"), timeout=5)
        assert reply.WhichOneof("outcome") == "redirect"
        assert (reply.redirect.aggregator_id, reply.redirect.address) == (owner.id, owner.address)

        with Client([daemons[0].address], agent_id=agent, federation="digits", watch=False) as client:
            assert client.home_id == owner.id and client.home_address == owner.address
    finally:
        for daemon in daemons:
            daemon.stop()
