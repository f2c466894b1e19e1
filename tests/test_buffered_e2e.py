"""Buffered rounds (FedBuff) through real aggregators: real gRPC on 127.0.0.1, real processes.

1. kill -9 of a `strata aggregator serve` in buffered mode with a stale update in its buffer: the
   restarted process still holds it, and the next step applies its delta rebased onto the current base;
2. a relay forwards its devices' combined update into a buffer, and follows the steps;
3. (slow) three buffered aggregators with in-process AgentDaemons, one of them a straggler: the fast
   agents keep training on the newest base without waiting for it, its stale updates count discounted,
   and semi-global models are blended on their own cadence.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import Client
from aggregator.config import RoundSettings
from storage.codec import decode_tensors
from storage.models import load_manifest, load_model
from storage.store import LocalStore
from tests.agent_service_contract import connect_client, noisy, wait_until
from tests.procs import procs_fixture  # noqa: F401  (registers the `procs` fixture)
from tests.test_relay import aggregator_config, relay_config, start_aggregator, start_relay

BUFFERED_PROCESS = (
    "round.mode=buffered",
    "round.buffer_size=2",
    "round.deadline_s=600",
    "synthesis.enabled=false",
)


def _read(store_path: Path, model_cid: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    store = LocalStore(store_path)
    try:
        manifest, weights = load_model(store, model_cid)
        return manifest.extra, decode_tensors(weights)
    finally:
        store.close()


def test_kill9_of_a_buffered_aggregator_keeps_its_buffer(procs, tmp_path: Path, clients: list[Client]) -> None:  # noqa: ANN001
    from tests.procs import free_port
    from tests.test_loop_e2e import start_aggregator as start_process

    port = free_port()
    address = f"127.0.0.1:{port}"
    agg = start_process(procs, tmp_path, port, *BUFFERED_PROCESS)
    early = [connect_client(clients, address, f"a{i}") for i in range(3)]
    base0 = early[0].wait_for_model(timeout=10)
    for agent in early[1:]:
        agent.wait_for_model(timeout=10)
    # step 0: a buffer of two fresh updates
    early[0].submit(noisy(base0, 0), 100)
    early[1].submit(noisy(base0, 1), 100)
    step0 = agg.wait_for_event("round_closed", lambda e: e["round"] == 0, timeout=15)
    assert step0["trigger"] == "buffer_full"
    base1 = _read(tmp_path / "store", step0["next_base"])[1]
    # a2 trained on base 0 all along: acknowledged one step stale, then the aggregator is killed
    late = noisy(base0, 2)
    receipt = early[2].submit(late, 60)
    assert receipt.round == 1
    agg.kill9()

    agg = start_process(procs, tmp_path, port, *BUFFERED_PROCESS)
    assert agg.wait_for_event("round_recovered", timeout=10)["updates"] == 1
    fresh = connect_client(clients, address, "a3")
    held = fresh.wait_for_model(timeout=10)
    assert all(np.array_equal(held[n], base1[n]) for n in base1)
    current = noisy(base1, 3)
    fresh.submit(current, 40)
    step1 = agg.wait_for_event("round_closed", lambda e: e["round"] == 1, timeout=15)

    extra, cluster = _read(tmp_path / "store", step1["cluster"])
    by_agent = {entry["agent"]: entry for entry in extra["buffer"]["updates"]}
    assert by_agent["a2"]["cid"] == receipt.update_cid and by_agent["a2"]["staleness"] == 1
    w_late, w_fresh = 60 * (1 + 1) ** -0.5, 40.0  # the default polynomial discount, exponent 0.5
    assert by_agent["a2"]["weight"] == pytest.approx(w_late) and by_agent["a3"]["weight"] == pytest.approx(w_fresh)
    for name in base1:
        delta = (w_late * (late[name] - base0[name]).astype(np.float64) + w_fresh * (current[name] - base1[name])) / (
            w_late + w_fresh
        )
        np.testing.assert_allclose(cluster[name], base1[name] + delta, rtol=1e-5, atol=1e-6)


def test_a_relay_forwards_into_a_buffer_and_follows_its_steps(tmp_path: Path, clients: list[Client]) -> None:
    config = aggregator_config(tmp_path, mode="buffered", buffer_size=2, deadline_s=600.0)
    aggregator = start_aggregator(config)
    relay = start_relay(relay_config(tmp_path, aggregator.address, max_devices=1))
    try:
        # both follow new bases on their WatchModels stream, as a daemon's client does
        device = connect_client(clients, relay.address, "d1", watch=True)
        direct = connect_client(clients, aggregator.address, "a1", watch=True)
        base0 = device.wait_for_model(timeout=10)
        direct.wait_for_model(timeout=10)
        device.submit(noisy(base0, 1), 30)
        direct.submit(noisy(base0, 2), 70)
        wait_until(lambda: len(aggregator.rounds.closed_rounds()) >= 1, 20, "the first step")
        step0 = aggregator.rounds.closed_rounds()[0]
        cluster = load_manifest(aggregator.store, step0.cluster_cid)
        kinds = {load_manifest(aggregator.store, cid).kind for cid in cluster.parents}
        assert kinds == {"relay", "local"}
        assert {e["agent"] for e in cluster.extra["buffer"]["updates"]} == {"relay-1", "a1"}
        # the relay follows the step: its device trains on the new base, forwarded into the next buffer
        base1 = device.wait_for_model(timeout=15)
        assert device.current().round == 1
        device.submit(noisy(base1, 3), 30)
        direct.wait_for_model(timeout=10)
        direct.submit(noisy(base1, 4), 70)
        wait_until(lambda: len(aggregator.rounds.closed_rounds()) >= 2, 20, "the second step")
        step1 = aggregator.rounds.closed_rounds()[1]
        assert {e["agent"] for e in load_manifest(aggregator.store, step1.cluster_cid).extra["buffer"]["updates"]} == {
            "relay-1",
            "a1",
        }
    finally:
        relay.stop()
        aggregator.stop()


class _Slow:
    """A trainer that takes `factor` times as long as the one it wraps (a straggler device)."""

    def __init__(self, inner: Any, factor: float) -> None:
        self._inner = inner
        self._factor = factor

    def train(self, weights: Any, round_config: Any) -> Any:
        started = time.perf_counter()
        result = self._inner.train(weights, round_config)
        time.sleep((self._factor - 1) * (time.perf_counter() - started) + 1.0)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.slow
def test_buffered_aggregators_step_without_waiting_for_a_straggler_and_blend_on_their_cadence(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.daemon import AgentDaemon
    from agent.trainer import load_trainer
    from aggregator.config import AggregatorConfig, SynthesisSettings
    from aggregator.daemon import AggregatorDaemon
    from coordinator.ring import Member, Ring
    from intake.config import ServingSettings
    from strata.wiring import initial_model_factory
    from tests.procs import free_port

    ports = [free_port() for _ in range(3)]
    members = [Member(id=f"agg-{n}", address=f"127.0.0.1:{p}") for n, p in zip("abc", ports, strict=True)]
    daemons: list[AggregatorDaemon] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    agents: dict[str, AgentDaemon] = {}
    try:
        for member in members:
            config = AggregatorConfig(
                id=member.id,
                listen=member.address,
                state_dir=str(tmp_path / member.id),
                store=str(tmp_path / "store"),
                peers=[f"{m.id}={m.address}" for m in members],
                round=RoundSettings(mode="buffered", buffer_size=2, max_staleness=20, deadline_s=600.0),
                synthesis=SynthesisSettings(decay_unit="seconds", decay_params={"half_life": 30.0}, max_age=120.0, every_steps=2),
                serving=ServingSettings(heartbeat_interval_s=0.5),
                round_config={"max_batches": "2"},
            )
            daemons.append(AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start())
        # three agents homed on each aggregator by the ring (one update per agent per base: a buffer
        # of 2 needs 2 agents), the first of agg-a's a straggler
        ring = Ring(members)
        homed: dict[str, list[str]] = {m.id: [] for m in members}
        candidate = 0
        while min(len(ids) for ids in homed.values()) < 3:
            agent_id, candidate = f"agent-{candidate}", candidate + 1
            owner = ring.owner(agent_id)
            if len(homed[owner.id]) < 3:
                homed[owner.id].append(agent_id)
        straggler = homed["agg-a"][0]
        for member in members:
            for agent_id in homed[member.id]:
                trainer = load_trainer("digits", {})
                if agent_id == straggler:
                    trainer = _Slow(trainer, 10.0)
                config = AgentConfig(
                    id=agent_id, seeds=[member.address], state_dir=str(tmp_path / agent_id), start_jitter_s=0.1,
                    backoff_max_s=0.5,
                )  # fmt: skip
                agents[agent_id] = daemon = AgentDaemon(config, trainer=trainer, stop=stop)
                threads.append(threading.Thread(target=daemon.run, name=agent_id, daemon=True))
        for thread in threads:
            thread.start()
        a = daemons[0]
        wait_until(lambda: all(len(d.rounds.closed_rounds()) >= 8 for d in daemons), 180, "8 steps on each aggregator")
        wait_until(lambda: agents[straggler].rounds_done >= 1, 60, "the straggler's first update")
        wait_until(lambda: len(a.rounds.closed_rounds()) >= 10, 60, "more steps on agg-a")
        stop.set()
        # the straggler never held its aggregator back: the fast ones trained on step after step
        fast = [agents[agent_id].rounds_done for agent_id in homed["agg-a"][1:]]
        assert min(fast) > 2 * agents[straggler].rounds_done, (fast, agents[straggler].rounds_done)
        updates = list(a.journal.iter_all_updates())
        assert any(u.agent_id == straggler and u.staleness > 0 for u in updates)
        for daemon in daemons:
            closed = daemon.rounds.closed_rounds()
            # semi-global synthesis every 2 steps (the first at step 1), the cluster model the base in between
            assert [r.extra["synthesis"] for r in closed[:6]] == [False, True] * 3
            blended = [r for r in closed[:6] if r.extra["synthesis"]]
            assert any(r.extra["next_base_kind"] == "semi-global" for r in blended)
            assert all(r.next_base_cid == r.cluster_cid for r in closed[:6] if not r.extra["synthesis"])
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for daemon in daemons:
            daemon.stop(grace=0)

