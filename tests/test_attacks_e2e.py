"""`strata simulate`'s hostile devices against a real aggregator: what they send is what the aggregator
journals. Inflated sample claims arrive as claimed; sign-flipped updates arrive flipped.

No timing: the round needs an update from every device (min_updates = the fleet, quorum 1.0)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.sim import SimOptions, Simulation
from agent.sim.attacks import AttackOptions
from agent.sim.schedule import plan_fleet
from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.daemon import AggregatorDaemon
from intake.config import ServingSettings
from storage.codec import decode_tensors
from storage.models import load_manifest, load_model
from strata.wiring import initial_model_factory
from tests.procs import free_port

AGENTS = 10


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[AggregatorDaemon]:
    config = AggregatorConfig(
        id="agg-a",
        listen=f"127.0.0.1:{free_port()}",
        state_dir=str(tmp_path / "agg-a"),
        store=str(tmp_path / "store"),
        round=RoundSettings(min_updates=AGENTS, quorum=1.0, deadline_s=3600.0, max_relative_norm=0),
        serving=ServingSettings(heartbeat_interval_s=5.0),
    )
    daemon = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    yield daemon
    daemon.stop(grace=0)


@pytest.mark.slow
def test_hostile_devices_claims_and_updates_reach_the_aggregator_as_sent(aggregator: AggregatorDaemon) -> None:
    attack = AttackOptions(name="inflate_samples", share=0.3, scale=1000.0)
    options = SimOptions(seeds=(aggregator.address,), agents=AGENTS, rounds=1, duration_s=120.0, ramp_s=0.2, attack=attack)
    report = asyncio.run(Simulation(options).run())
    assert report.stopped_by == "rounds" and not report.refusals, report.to_json()
    assert report.to_json()["behaviour"]["attack"]["name"] == "inflate_samples"

    hostile = {p.agent_id: p.index for p in plan_fleet(options) if p.hostile}
    assert len(hostile) == 3
    (record,) = [r for r in aggregator.journal.history() if r.closed_at is not None][:1]
    accepted = [u for u in aggregator.journal.iter_all_updates() if u.counted_round == record.round]
    assert len(accepted) == AGENTS
    _, base = load_model(aggregator.store, record.base_cid)
    base_tensors = decode_tensors(base)
    for update in accepted:
        honest_claim = 16 + (int(update.agent_id.rsplit("-", 1)[1]) * 37) % 240  # the noise trainer's claim
        _, weights = load_model(aggregator.store, update.update_cid)
        tensors = decode_tensors(weights)
        if update.agent_id in hostile:
            assert update.num_samples == honest_claim * 1000
        else:
            assert update.num_samples == honest_claim
        # every update moved away from the base (honest noise, or its flip)
        assert any(not np.array_equal(tensors[n], base_tensors[n]) for n in tensors)
    # the inflated claims reached the journal as sent, and the round credited them with at most
    # round.max_claim_ratio x its median claim (honest claims here are 16..238, within 10 x the median)
    cluster = load_manifest(aggregator.store, record.cluster_cid)
    rescaled = cluster.extra["rescaled_num_samples"]
    assert {entry["agent"] for entry in rescaled["claims"].values()} == set(hostile)
    limit = rescaled["ratio"] * rescaled["median_per_contributor"]
    assert all(entry["credited"] <= limit for entry in rescaled["claims"].values())
    # so the round's credited total is the honest claims plus at most that limit per hostile device
    honest_total = sum(u.num_samples for u in accepted if u.agent_id not in hostile)
    assert record.num_samples <= honest_total + len(hostile) * limit
    assert record.num_samples < sum(u.num_samples for u in accepted) / 50  # the claimed total is 1000x inflated
