"""`strata simulate`'s engine against real aggregators: 400 virtual devices, two aggregators on a ring,
three rounds with the cheap trainer. Every round has every device of its home in it, and every update
the simulator saw acknowledged is in its aggregator's journal.

Nothing here depends on timing: each aggregator's round needs an update from every device the ring
gives it (min_updates = its share, quorum 1.0, a deadline far beyond the test), so a round closes
exactly when its last device submitted; waits are bounded only as hang guards.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim import SimOptions, Simulation
from agent.sim.schedule import agent_id
from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.ring import Member, Ring
from intake.config import ServingSettings
from strata.wiring import initial_model_factory
from tests.procs import free_port

AGENTS = 400
ROUNDS = 3
HANG_GUARD_S = 240.0


@pytest.fixture
def ring_of_two(tmp_path: Path) -> Iterator[dict[str, AggregatorDaemon]]:
    ports = [free_port() for _ in range(2)]  # the static membership names both addresses
    members = [Member(id=f"agg-{n}", address=f"127.0.0.1:{p}") for n, p in zip("ab", ports, strict=True)]
    options = SimOptions(agents=AGENTS)
    share = Counter(Ring(members).owner(agent_id(options, i)).id for i in range(AGENTS))
    daemons = {}
    for member in members:
        config = AggregatorConfig(
            id=member.id,
            listen=member.address,
            state_dir=str(tmp_path / member.id),
            store=str(tmp_path / "store"),
            peers=[f"{m.id}={m.address}" for m in members],
            round=RoundSettings(min_updates=share[member.id], quorum=1.0, deadline_s=3600.0),
            serving=ServingSettings(heartbeat_interval_s=5.0),
        )
        daemons[member.id] = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    yield daemons
    for daemon in daemons.values():
        daemon.stop(grace=0)


@pytest.mark.slow
def test_a_simulated_fleet_trains_rounds_and_every_acknowledged_update_is_journaled(
    ring_of_two: dict[str, AggregatorDaemon],
) -> None:
    options = SimOptions(
        seeds=tuple(d.address for d in ring_of_two.values())[:1],  # every device joins through agg-a
        agents=AGENTS,
        rounds=ROUNDS,
        duration_s=HANG_GUARD_S,
        ramp_s=1.0,
    )
    report = asyncio.run(Simulation(options).run())

    assert report.stopped_by == "rounds", report.to_json()
    assert report.joined == AGENTS and report.online_at_end == AGENTS
    assert sum(report.homes.values()) == AGENTS and set(report.homes) == set(ring_of_two)
    assert report.counts["redirects"] == report.homes["agg-b"]  # only agg-b's devices were sent on
    assert not report.refusals and not report.errors

    for home, devices in report.homes.items():
        closed = [r for r in report.rounds if r.home == home and r.closed]
        assert len(closed) >= ROUNDS
        for stats in closed:  # every device of the home, exactly once, in every round
            assert (stats.devices, stats.accepted, stats.duplicates) == (devices, devices, 0), stats.to_json()
            assert stats.to_json()["participation"] == 1.0 and stats.round_s is not None

    # nothing acknowledged is lost: each receipt is the update its aggregator journaled for that device and base
    assert len(report.receipts) == report.counts["acknowledged"] >= AGENTS * ROUNDS
    for receipt in report.receipts:
        journaled = ring_of_two[receipt.home].journal.find_update(receipt.agent_id, receipt.base_cid)
        assert journaled is not None, receipt
        assert (journaled.update_cid, journaled.counted_round) == (receipt.update_cid, receipt.round)

    # each model was decoded once for the whole fleet, not once per device
    assert report.models_decoded <= len({r.model for r in report.rounds})
    assert report.counts["downloads"] >= AGENTS * ROUNDS
    assert report.latency["update"].count == len(report.receipts)
    assert report.bytes["uploaded"] > 0 and report.bytes["downloaded"] > 0
