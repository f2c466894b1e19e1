"""The fleet under failure, with real processes on loopback: a coordinator, 3 aggregators and 6 agents.

- kill -9 one aggregator mid-round: its lease expires, the ring changes, its agents
  re-home and continue within 15 s, the others keep going and synthesis skips it;
  restarted, it rejoins the ring, recovers its journal, and its agents come back;
- the coordinator stops for 60 s: rounds keep closing everywhere, semi-global
  synthesis goes on peer to peer, and the restarted index catches up.
In both, no acknowledged update is lost: every update an agent saw acknowledged
is in the journal of the aggregator that acknowledged it.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from aggregator.journal import Journal
from storage.models import load_manifest
from storage.store import LocalStore
from tests.procs import (  # noqa: F401
    ProcessFactory,
    StrataProcess,
    free_port,
    procs_fixture,
    run_strata,
    wait_healthy,
)

pytestmark = pytest.mark.slow

AGGREGATORS = ("agg-a", "agg-b", "agg-c")


class Fleet:
    def __init__(self, procs: ProcessFactory, root: Path) -> None:
        self.procs = procs
        self.root = root
        self.home = root / "home"
        self.store = root / "store"
        self.coordinator_port = free_port()
        self.ports = {name: free_port() for name in AGGREGATORS}
        self.aggregators: dict[str, StrataProcess] = {}
        self.coordinator: StrataProcess | None = None
        self.agents: StrataProcess | None = None

    @property
    def coordinator_address(self) -> str:
        return f"127.0.0.1:{self.coordinator_port}"

    def _config(self, name: str, values: dict) -> str:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)

    def start_coordinator(self) -> StrataProcess:
        config = self._config(
            "coordinator",
            {"listen": self.coordinator_address, "state_dir": str(self.root / "coordinator"), "lease_ttl_s": 4.0, "heartbeat_interval_s": 1.0},
        )
        self.coordinator = self.procs.strata("coordinator", "serve", "--config", config, name="coordinator", home=self.home)
        self.coordinator.wait_for_event("coordinator_started", timeout=30)
        return self.coordinator

    def start_aggregator(self, name: str) -> StrataProcess:
        config = self._config(
            name,
            {
                "id": name,
                "listen": f"127.0.0.1:{self.ports[name]}",
                "coordinator": self.coordinator_address,
                "state_dir": str(self.root / name),
                "store": str(self.store),
                "serving": {"heartbeat_interval_s": 1.0},
                "round": {"quorum": 1.0, "deadline_s": 3.0, "min_updates": 1, "agent_timeout_s": 6.0},
                "synthesis": {"fetch_timeout_s": 2.0},
            },
        )
        process = self.procs.strata("aggregator", "serve", "--config", config, name=name, home=self.home)
        process.wait_for_event("aggregator_started", timeout=60)
        self.aggregators[name] = process
        return process

    def start_agents(self, count: int = 6) -> StrataProcess:
        configs = []
        for i in range(count):
            configs += [
                "--config",
                self._config(
                    f"agent-{i}",
                    {
                        "id": f"agent-{i}",
                        "seeds": [f"127.0.0.1:{p}" for p in self.ports.values()],
                        "task_options": {"partition": {"scheme": "iid", "index": i, "count": count}, "epochs": 1},
                        "state_dir": str(self.root / "agents" / f"agent-{i}"),
                        "backoff_max_s": 1.0,
                        "rpc_timeout_s": 5.0,
                    },
                ),
            ]
        self.agents = self.procs.strata("agent", "run", *configs, name="agents", home=self.home)
        return self.agents

    def rounds_closed(self, name: str, after: int = 0) -> int:
        return len(self.aggregators[name].events("round_closed")[after:]) if name in self.aggregators else 0

    def wait_rounds(self, names: tuple[str, ...], count: int, timeout: float, *, since: dict[str, int] | None = None) -> None:
        since = since or {}
        deadline = time.monotonic() + timeout
        while True:
            closed = {n: len(self.aggregators[n].events("round_closed")) - since.get(n, 0) for n in names}
            if all(c >= count for c in closed.values()):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(self.aggregators[n].tail(8) for n in names)
                raise AssertionError(f"rounds closed {closed}, wanted {count} each within {timeout}s\n{tails}")
            time.sleep(0.2)

    def acknowledged_updates(self) -> set[str]:
        assert self.agents is not None
        return {e["update"] for e in self.agents.events("update_submitted")}

    def journaled_updates(self) -> set[str]:
        found: set[str] = set()
        for name in AGGREGATORS:
            path = self.root / name / "journal.sqlite"
            if path.exists():
                with Journal(path, readonly=True) as journal:
                    found |= {u.update_cid for u in journal.iter_all_updates()}
        return found

    def homes(self) -> dict[str, str]:
        """agent -> the home it last joined."""
        assert self.agents is not None
        homes: dict[str, str] = {}
        for event in self.agents.events("joined"):
            homes[event["agent"]] = event["home"]
        return homes


@pytest.fixture
def fleet(procs: ProcessFactory, tmp_path: Path) -> Fleet:
    fleet = Fleet(procs, tmp_path)
    fleet.start_coordinator()
    for name in AGGREGATORS:
        fleet.start_aggregator(name)
    for name in AGGREGATORS:
        wait_healthy(f"127.0.0.1:{fleet.ports[name]}", timeout=20)
    fleet.start_agents()
    fleet.wait_rounds(AGGREGATORS, 2, timeout=90)
    return fleet


def test_kill_an_aggregator_then_restart_it(fleet: Fleet) -> None:
    victim, survivors = "agg-b", ("agg-a", "agg-c")
    homed_at_victim = {a for a, h in fleet.homes().items() if h == victim}
    assert homed_at_victim, f"no agent lives on {victim}: {fleet.homes()}"
    coordinator = fleet.coordinator
    assert coordinator is not None
    mark = coordinator.event_count()
    agents_mark = fleet.agents.event_count()
    since = {n: len(fleet.aggregators[n].events("round_closed")) for n in survivors}
    synth_since = {n: len(fleet.aggregators[n].events("semi_global_synthesized")) for n in survivors}

    fleet.aggregators[victim].kill9()
    dead_since = datetime.now(UTC)  # reaped: from here on nothing the victim served can answer

    coordinator.wait_for_event("aggregator_expired", lambda e: e.get("aggregator") == victim, timeout=15, after=mark)
    # its agents re-home on a survivor and submit there (the bounds only stop a hang)
    for agent in homed_at_victim:
        joined = fleet.agents.wait_for_event(
            "joined", lambda e, a=agent: e["agent"] == a and e["home"] in survivors, timeout=25, after=agents_mark
        )
        fleet.agents.wait_for_event(
            "update_submitted", lambda e, a=agent: e["agent"] == a, timeout=25, after=fleet.agents.events().index(joined)
        )

    # the others keep going; no semi-global model made after the kill has the dead aggregator's
    # cluster model among its parents, and each survivor blended the other one's
    fleet.wait_rounds(survivors, 2, timeout=60, since=since)
    store = LocalStore(fleet.store)  # the fleet's one store: every model any aggregator made
    peers_blended: dict[str, set[str]] = {name: set() for name in survivors}
    for name in survivors:
        for event in fleet.aggregators[name].events("semi_global_synthesized")[synth_since[name]:]:
            semi = load_manifest(store, event["model"])
            parents = [load_manifest(store, cid) for cid in semi.parents]
            (own,) = [m for m in parents if m.producer.id == name]
            if datetime.fromisoformat(own.created_at) <= dead_since:
                continue  # its synthesis may have asked the victim before it died
            peers = {m.producer.id for m in parents if m is not own}
            assert all(m.kind == "cluster" for m in parents), [m.kind for m in parents]
            assert victim not in peers, f"{name}'s {semi.cid} (round {semi.round}) blended dead {victim}'s cluster model"
            assert len(peers) == event["peers_used"], (peers, event)
            peers_blended[name] |= peers
    assert peers_blended == {name: set(survivors) - {name} for name in survivors}, peers_blended
    store.close()

    # restart: it rejoins the ring, recovers its journal, and its agents come back
    mark = coordinator.event_count()
    restarted = fleet.start_aggregator(victim)
    started = restarted.events("aggregator_started")[0]
    assert started["round"] >= 1, "the journal was recovered: it does not start over at round 0"
    coordinator.wait_for_event("aggregator_registered", lambda e: e.get("aggregator") == victim, timeout=20, after=mark)
    agents_mark = fleet.agents.event_count()
    fleet.agents.wait_for_event("joined", lambda e: e["home"] == victim, timeout=30, after=agents_mark)
    fleet.wait_rounds((victim,), 1, timeout=60)

    lost = fleet.acknowledged_updates() - fleet.journaled_updates()
    assert not lost, f"acknowledged but not journaled: {lost}"


def test_coordinator_outage_of_60s(fleet: Fleet) -> None:
    coordinator = fleet.coordinator
    assert coordinator is not None
    since = {n: len(fleet.aggregators[n].events("round_closed")) for n in AGGREGATORS}
    synth_since = {n: len(fleet.aggregators[n].events("semi_global_synthesized")) for n in AGGREGATORS}
    coordinator.terminate()
    outage_started = time.monotonic()

    fleet.wait_rounds(AGGREGATORS, 2, timeout=60, since=since)
    for name in AGGREGATORS:
        peer_to_peer = [e for e in fleet.aggregators[name].events("semi_global_synthesized")[synth_since[name]:] if e["peers_used"] >= 1]
        assert peer_to_peer, f"{name} synthesized no semi-global model from peers while the coordinator was down"
    clusters_during_outage = {
        e["cluster"] for n in AGGREGATORS for e in fleet.aggregators[n].events("round_closed")[since[n]:]
    }
    time.sleep(max(0.0, 60 - (time.monotonic() - outage_started)))
    fleet.wait_rounds(AGGREGATORS, 3, timeout=30, since=since)

    fleet.start_coordinator()
    deadline = time.monotonic() + 30
    while True:
        listed = run_strata(
            "models", "list", "--kind", "cluster", "--limit", "1000", "--json", "--coordinator", fleet.coordinator_address, home=fleet.home
        )
        indexed = {m["model"] for m in json.loads(listed.stdout)["models"]} if listed.returncode == 0 else set()
        if clusters_during_outage <= indexed:
            break
        assert time.monotonic() < deadline, f"index missing {clusters_during_outage - indexed}"
        time.sleep(1.0)

    lost = fleet.acknowledged_updates() - fleet.journaled_updates()
    assert not lost, f"acknowledged but not journaled: {lost}"
