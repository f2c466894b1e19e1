"""Differential privacy through real aggregators: two aggregators on a ring with central DP and local DP
on, a simulated fleet training three rounds. Every cluster manifest carries the round's (ε, δ), the
devices' updates name the local DP they applied, and `strata history --json` and `strata model show`
report it.

Nothing depends on timing: each aggregator's round needs an update from every device the ring gives
it (min_updates = its share, quorum 1.0, a deadline far beyond the test)."""

from __future__ import annotations

import asyncio
import json
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
from privacy import PrivacyEvent, epsilon_of
from privacy.config import CentralDpSettings, LocalDpSettings, PrivacySettings
from storage.manifest import Manifest
from storage.store import LocalStore
from strata.wiring import initial_model_factory
from tests.procs import free_port, run_strata

AGENTS = 20
ROUNDS = 3
HANG_GUARD_S = 180.0
PRIVACY = PrivacySettings(
    delta=1e-5,
    central=CentralDpSettings(clip=0.5, noise_multiplier=1.2, adaptive=True, seed=0),
    local=LocalDpSettings(clip=1.0, noise_multiplier=0.05),
)


@pytest.fixture
def private_ring(tmp_path: Path) -> Iterator[dict[str, AggregatorDaemon]]:
    ports = [free_port() for _ in range(2)]
    members = [Member(id=f"agg-{n}", address=f"127.0.0.1:{p}") for n, p in zip("ab", ports, strict=True)]
    share = Counter(Ring(members).owner(agent_id(SimOptions(agents=AGENTS), i)).id for i in range(AGENTS))
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
            privacy=PRIVACY,
        )
        daemons[member.id] = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    yield daemons
    for daemon in daemons.values():
        daemon.stop(grace=0)


@pytest.mark.slow
def test_dp_through_real_aggregators_is_recorded_in_manifests_and_history(
    private_ring: dict[str, AggregatorDaemon], tmp_path: Path
) -> None:
    options = SimOptions(
        seeds=(next(iter(private_ring.values())).address,),
        agents=AGENTS,
        rounds=ROUNDS,
        duration_s=HANG_GUARD_S,
        ramp_s=0.5,
        noise_scale=0.1,
    )
    report = asyncio.run(Simulation(options).run())
    assert report.stopped_by == "rounds", report.to_json()
    assert not report.refusals and not report.errors

    store = LocalStore(tmp_path / "store")
    per_round = epsilon_of([PrivacyEvent(1.2)], 1e-5)
    for aggregator_id, daemon in private_ring.items():
        closed = [r for r in daemon.journal.history() if r.closed_at is not None][:ROUNDS]
        assert len(closed) == ROUNDS
        epsilons = [r.extra["privacy"]["epsilon"] for r in closed]
        # the central bound: composed over the rounds released so far
        expected = [epsilon_of([PrivacyEvent(1.2, count=k)], 1e-5) for k in range(1, ROUNDS + 1)]
        assert epsilons == pytest.approx(expected, rel=1e-6) and epsilons[0] == pytest.approx(per_round)
        for record in closed:
            cluster = Manifest.from_bytes(store.get(record.cluster_cid))
            assert cluster.extra["privacy"] == record.extra["privacy"]
            assert cluster.algorithm["dp"]["central"]["noise_multiplier"] == 1.2
            central = cluster.extra["privacy"]["central"]
            assert central["updates"] == record.participants and "next_clip" in central
            assert cluster.extra["privacy"]["local"]["devices"] == record.participants
            for parent in cluster.parents:
                update = Manifest.from_bytes(store.get(parent))
                assert update.extra["dp"] == {"mechanism": "gaussian", "clip": 1.0, "noise_multiplier": 0.05}

        # the Prometheus gauges say the same as the journal
        # the aggregator keeps closing (empty) rounds: read the gauge first, then the journal, which then
        # holds the round the gauge spoke of
        gauges = {m.name: m.samples[0].value for m in daemon._collect_metrics() if "privacy" in m.name}
        all_closed = [r for r in daemon.journal.history() if r.closed_at is not None]
        released = [pytest.approx(r.extra["privacy"]["epsilon"]) for r in all_closed[ROUNDS - 1 :]]
        assert gauges["strata_aggregator_privacy_epsilon"] in released
        assert gauges["strata_aggregator_privacy_budget_spent"] == 0.0
        history = run_strata("history", "--state-dir", str(tmp_path / aggregator_id), "--json", home=tmp_path / "cli")
        assert history.returncode == 0, history.stderr
        rows = [r for r in json.loads(history.stdout)[aggregator_id] if r["closed"]][:ROUNDS]
        assert [r["epsilon"] for r in rows] == pytest.approx(epsilons) and {r["delta"] for r in rows} == {1e-5}
        table = run_strata("history", "--state-dir", str(tmp_path / aggregator_id), home=tmp_path / "cli")
        assert "epsilon" in table.stdout

    shown = run_strata(
        "model", "show", closed[-1].cluster_cid, home=tmp_path / "cli", env={"STRATA_STORE": str(tmp_path / "store")}
    )
    assert shown.returncode == 0, shown.stderr
    assert "privacy    ε=" in shown.stdout and "central(clip=" in shown.stdout and "adaptive" in shown.stdout
    lineage = run_strata(
        "lineage", closed[-1].cluster_cid, "--depth", "1", home=tmp_path / "cli", env={"STRATA_STORE": str(tmp_path / "store")}
    )
    assert lineage.returncode == 0, lineage.stderr
    assert "DP ε=" in lineage.stdout and "local DP σ=0.05 C=1.0" in lineage.stdout
    store.close()
