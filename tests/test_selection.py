"""Who trains each round: eligibility by telemetry, quotas, fairness over many rounds, and the round
manager refusing the uninvited. Pure logic and a round manager on a real store: milliseconds each."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import RoundSettings, SelectionSettings
from aggregator.journal import Journal
from aggregator.rounds import RoundManager
from aggregator.selection import Selector
from aggregator.strategies import FedAvg
from intake.agents import INFERENCE, TRAIN, AgentInfo
from intake.submission import Submission
from proto.errors import Refusal, UpdateRefused
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.manifest import Producer
from storage.models import load_manifest, save_model
from storage.store import LocalStore


def agent(agent_id: str, capability: str = TRAIN, **telemetry) -> AgentInfo:
    return AgentInfo(agent_id=agent_id, capability=capability, telemetry=telemetry)


def test_eligibility_follows_the_telemetry_filters() -> None:
    selector = Selector(
        SelectionSettings(
            mode="count", count=10, min_battery_percent=30, require_charging=True, networks=["wifi"], min_uplink_kbps=500
        )
    )
    good = dict(battery_percent=80.0, charging=True, network="wifi", uplink_kbps=1000.0)
    assert selector.eligible(agent("a", **good))
    assert not selector.eligible(agent("b", INFERENCE, **good))
    assert not selector.eligible(agent("c", **{**good, "battery_percent": 20.0}))
    assert not selector.eligible(agent("d", **{**good, "charging": False}))
    assert not selector.eligible(agent("e", **{**good, "network": "cellular"}))
    assert not selector.eligible(agent("f", **{**good, "uplink_kbps": 100.0}))
    assert not selector.eligible(agent("g"))  # reports nothing: a filter needs a value
    assert Selector(SelectionSettings(mode="count")).eligible(agent("g"))  # no filters: any trainer


@pytest.mark.parametrize(
    ("settings", "eligible", "quota"),
    [
        (SelectionSettings(mode="all"), 37, 37),
        (SelectionSettings(mode="fraction", fraction=0.1), 37, 4),
        (SelectionSettings(mode="count", count=5), 37, 5),
        (SelectionSettings(mode="count", count=50), 37, 37),
    ],
)
def test_quotas(settings: SelectionSettings, eligible: int, quota: int) -> None:
    assert Selector(settings).quota(eligible) == quota


def test_the_least_invited_agents_go_first_so_nobody_is_starved_or_overused() -> None:
    selector = Selector(SelectionSettings(mode="count", count=5))
    agents = [agent(f"a{i:02d}") for i in range(50)]
    times: collections.Counter[str] = collections.Counter()
    for round_ in range(100):
        chosen = selector.choose(round_, agents, invited=set(), times_invited=times)
        assert len(chosen) == 5 == len(set(chosen))
        times.update(chosen)
    assert set(times.values()) == {10}  # 100 rounds x 5 places / 50 agents, exactly


def test_top_ups_fill_only_free_places() -> None:
    selector = Selector(SelectionSettings(mode="count", count=3))
    assert selector.choose(0, [agent("a"), agent("b")], invited={"a"}, times_invited={}) == ["b"]
    assert selector.choose(0, [agent(x) for x in "abcd"], invited={"a", "b", "c"}, times_invited={}) == []


# ---------------------------------------------------------------- in a round


@pytest.fixture
def rounds(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    key = KeyPair.generate()
    base = save_model(
        store,
        weights=encode_tensors({"w": np.zeros(2, np.float32)}),
        kind="base",
        federation="digits",
        round=0,
        producer=Producer(role="test", id="init"),
        key=key,
    ).cid
    manager = RoundManager(
        aggregator_id="agg-s",
        federation="digits",
        settings=RoundSettings(quorum=1.0, min_updates=1, max_relative_norm=0),
        store=store,
        journal=Journal(tmp_path / "journal.sqlite"),
        strategy=FedAvg(),
        key=key,
        initial_base=base,
        selector=Selector(SelectionSettings(mode="count", count=2)),
    )
    manager.start()
    manager.test_store = store  # for reading the manifests it writes
    yield manager
    manager.close()
    store.close()


def submit(manager: RoundManager, agent_id: str):
    base = manager.current
    return manager.intake.submit(
        Submission(
            agent_id=agent_id,
            round=base.round,
            base_cid=base.model_cid,
            num_samples=10,
            weights=encode_tensors({"w": np.ones(2, np.float32)}),
            federation="digits",
        )
    )


def test_only_invited_agents_train_and_quorum_counts_only_them(rounds: RoundManager) -> None:
    active = [agent(f"a{i}") for i in range(5)]
    invited = rounds.invite(active)
    assert len(invited) == 2 and rounds.invite(active) == []
    outsider = next(a.agent_id for a in active if a.agent_id not in invited)
    assert not rounds.invited(outsider) and all(rounds.invited(a) for a in invited)
    with pytest.raises(UpdateRefused) as info:
        submit(rounds, outsider)
    assert info.value.reason == Refusal.NOT_INVITED
    assert rounds.expected_trainers(active) == 2
    submit(rounds, invited[0])
    assert rounds.maybe_close(rounds.expected_trainers(active)) is None  # 1 of the 2 invited
    submit(rounds, invited[1])
    cluster = rounds.maybe_close(rounds.expected_trainers(active))
    assert cluster is not None
    record = load_manifest(rounds.test_store, cluster.cid).extra["selection"]
    assert record == {"mode": "count", "params": {"count": 2}, "invited": sorted(invited), "answered": sorted(invited)}
    # the next round prefers the agents that have not been invited yet
    assert set(rounds.invite(active)).isdisjoint(invited)


# ---------------------------------------------------------------- through a real aggregator


def test_through_a_real_aggregator_only_the_invited_clients_train(tmp_path: Path) -> None:
    import threading

    from agent.client import Client
    from aggregator.config import AggregatorConfig
    from aggregator.daemon import AggregatorDaemon
    from strata.wiring import initial_model_factory
    from tests.agent_service_contract import wait_until

    config = AggregatorConfig(
        id="agg-select",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "state"),
        store=str(tmp_path / "store"),
        round=RoundSettings(quorum=1.0, min_updates=1, deadline_s=600.0),
        selection=SelectionSettings(mode="count", count=2),
    )
    daemon = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    clients = [Client(daemon.address, agent_id=f"dev-{i}", join_timeout_s=30).connect() for i in range(4)]
    trained: list[tuple[int, str]] = []

    def train_once(client: Client) -> None:
        weights = client.wait_for_model(timeout=30)  # returns only a base this client is invited to
        receipt = client.submit({k: v + np.float32(0.01) for k, v in weights.items()}, 10)
        trained.append((receipt.round, client.agent_id))

    try:
        threads = [threading.Thread(target=train_once, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        wait_until(lambda: daemon.rounds.current.round == 1, 30, "round 0 to close on its two invited agents")
        first = daemon.rounds.closed_rounds()[0]
        selection = load_manifest(daemon.store, first.cluster_cid).extra["selection"]
        assert len(selection["invited"]) == 2 and selection["answered"] == selection["invited"]
        assert {u.agent_id for u in daemon.journal.iter_all_updates() if u.trained_round == 0} == set(selection["invited"])
        # round 1 invites the two who sat out; their watch streams wake them and they train there
        for thread in threads:
            thread.join(timeout=30)
        sat_out = {c.agent_id for c in clients} - set(selection["invited"])
        assert daemon.journal.invited(1) == sat_out
        assert sorted(trained) == sorted([(0, a) for a in selection["invited"]] + [(1, a) for a in sat_out])
    finally:
        for client in clients:
            client.close()
        daemon.stop()
