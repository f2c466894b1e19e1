"""When rounds close, through a running aggregator: the deadline, min_updates, the active set,
and the round-0 base from `initial_model`.

Aggregators run in-process (AggregatorDaemon built from its config, on 127.0.0.1) or as
real `strata aggregator serve` processes; agents are plain gRPC stubs. Rounds are
observed from outside: the Prometheus endpoint, the daemon's journal history, the
models in the store, and the structured log events. Every wait is bounded only to
turn a hang into a failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.tasks.digits import DigitsTask
from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from storage.cid import cid_of
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.manifest import Producer
from storage.models import load_manifest, save_model
from storage.store import LocalStore
from strata.wiring import initial_model_factory
from tests.agent_service_contract import (
    FEDERATION,
    RPC_TIMEOUT_S,
    base_tensors,
    get_model,
    join,
    nudged,
    stub_for,
    submit,
    wait_until,
)
from tests.procs import ProcessFactory, free_port, procs_fixture, wait_healthy  # noqa: F401 - fixture
from tests.scrape import scrape, wait_for_metric

ROUND = "strata_aggregator_round"


def start_aggregator(tmp_path: Path, settings: RoundSettings) -> tuple[AggregatorDaemon, int]:
    metrics_port = free_port()
    config = AggregatorConfig(
        id="agg-policy",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "state"),
        store=str(tmp_path / "store"),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        round=settings,
        synthesis=SynthesisSettings(enabled=False),
        metrics_port=metrics_port,
    )
    return AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start(), metrics_port


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    """The fields of every `event` logged so far, oldest first."""
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == event]


def current_base(stub: Any, agent_id: str) -> pb.ModelRef:
    """The base a (joined) agent is told to train from next."""
    return stub.Heartbeat(pb.HeartbeatRequest(agent_id=agent_id, federation=FEDERATION), timeout=RPC_TIMEOUT_S).current_base


# ------------------------------------------------------------------ deadline and min_updates


@pytest.mark.slow
def test_deadline_closes_a_round_with_min_updates_and_extends_one_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # 3 trainers make the quorum target 3; min_updates 2; 2 s deadlines
    daemon, metrics_port = start_aggregator(
        tmp_path, RoundSettings(quorum=1.0, min_updates=2, deadline_s=2.0, agent_timeout_s=600.0)
    )
    channel, stub = stub_for(daemon.address)
    try:
        homes = {agent: join(stub, agent) for agent in ("t1", "t2", "t3")}
        base = homes["t1"].base
        tensors = base_tensors(stub, base.model_cid)

        # round 0: 2 of 3 updates, short of the quorum but at min_updates: the deadline closes it
        for i, agent in enumerate(("t1", "t2")):
            assert submit(stub, nudged(tensors, 0.01 * (i + 1)), agent_id=agent, base=base).accepted
        wait_for_metric(metrics_port, lambda m: m.value(ROUND) == 1, "round 0 to close at its deadline")

        # round 1: 1 update, below min_updates: the deadline passes, the round extends and stays open
        base = current_base(stub, "t1")
        assert base.round == 1
        tensors = base_tensors(stub, base.model_cid)
        assert submit(stub, nudged(tensors, 0.03), agent_id="t1", base=base).accepted
        wait_until(
            lambda: any(e["round"] == 1 and e["accepted"] == 1 for e in logged(caplog, "round_extended")),
            30,
            "round 1 to be extended",
        )
        extended = next(e for e in logged(caplog, "round_extended") if e["round"] == 1 and e["accepted"] == 1)
        assert (extended["min_updates"], extended["quorum_target"], extended["extended_by_s"]) == (2, 3, 2.0)
        assert scrape(metrics_port).value(ROUND) == 1, "a round below min_updates closed at its deadline"
        assert [r.round for r in daemon.rounds.history() if r.closed_at is not None] == [0]

        # a second update makes min_updates: the extended deadline closes it
        assert submit(stub, nudged(tensors, 0.04), agent_id="t2", base=base).accepted
        wait_for_metric(metrics_port, lambda m: m.value(ROUND) == 2, "round 1 to close at its extended deadline")
        closed = [r for r in daemon.rounds.history() if r.closed_at is not None]
    finally:
        channel.close()
        daemon.stop()

    assert [(r.round, r.participants, r.extra["trigger"]) for r in closed] == [(0, 2, "deadline"), (1, 2, "deadline")]
    with LocalStore(tmp_path / "store") as store:
        assert [load_manifest(store, r.cluster_cid).extra["trigger"] for r in closed] == ["deadline", "deadline"]
    assert [(e["round"], e["trigger"], e["participants"]) for e in logged(caplog, "round_closed")] == [
        (0, "deadline", 2),
        (1, "deadline", 2),
    ]


# ------------------------------------------------------------------ the active set


class Heartbeats:
    """Heartbeats for a set of agents every 0.1 s, from a thread, until each is silenced."""

    def __init__(self, stub: Any, agents: list[str]) -> None:
        self._stub = stub
        self.beating = set(agents)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for agent in sorted(self.beating):
                self._stub.Heartbeat(pb.HeartbeatRequest(agent_id=agent, federation=FEDERATION), timeout=RPC_TIMEOUT_S)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=RPC_TIMEOUT_S + 1)


@pytest.mark.slow
def test_agents_that_stop_heartbeating_leave_the_active_set_and_the_quorum_shrinks(tmp_path: Path) -> None:
    # quorum 1.0 and a 10-minute deadline: only quorum can close round 0
    timeout_s = 5.0
    daemon, metrics_port = start_aggregator(
        tmp_path, RoundSettings(quorum=1.0, min_updates=1, deadline_s=600.0, agent_timeout_s=timeout_s)
    )
    channel, stub = stub_for(daemon.address)
    try:
        homes = {agent: join(stub, agent) for agent in ("t1", "t2", "quiet")}
        base = homes["t1"].base
        tensors = base_tensors(stub, base.model_cid)
        with Heartbeats(stub, list(homes)) as heartbeats:
            before = wait_for_metric(
                metrics_port, lambda m: m.value("strata_aggregator_active_agents") == 3, "3 active agents"
            )
            for i, agent in enumerate(("t1", "t2")):
                assert submit(stub, nudged(tensors, 0.01 * (i + 1)), agent_id=agent, base=base).accepted
            held = scrape(metrics_port)
            # 2 of 3 active trainers: the round waits for "quiet", who still heartbeats
            assert (held.value(ROUND), held.value("strata_aggregator_round_updates")) == (0, 2)
            assert held.value("strata_aggregator_active_agents") == 3

            heartbeats.beating.discard("quiet")
            after = wait_for_metric(
                metrics_port, lambda m: m.value(ROUND) == 1, f"round 0 to close once 'quiet' is {timeout_s}s silent"
            )
        history = daemon.rounds.history()
    finally:
        channel.close()
        daemon.stop()
    assert before.value("strata_aggregator_rounds_closed_total") == 0
    assert after.value("strata_aggregator_active_agents") == 2
    (record,) = [r for r in history if r.closed_at is not None]
    assert (record.participants, record.extra["trigger"]) == (2, "quorum")


# ------------------------------------------------------------------ initial_model=<CID>


@pytest.fixture
def stored_base(tmp_path: Path) -> Iterator[tuple[Path, str, bytes]]:
    """A store holding one base model (not the task's default initialization): (store, CID, weights)."""
    weights = encode_tensors(DigitsTask.seeded_weights(seed=1234))
    store_dir = tmp_path / "store"
    with LocalStore(store_dir) as store:
        manifest = save_model(
            store,
            weights=weights,
            kind="base",
            federation=FEDERATION,
            round=0,
            producer=Producer(role="operator", id="test"),
            key=KeyPair.generate(),
        )
    yield store_dir, manifest.cid, weights


def _serve_args(tmp_path: Path, port: int, store: Path, initial_model: str) -> list[str]:
    return [
        "aggregator", "serve",
        "--set", "id=agg-init",
        "--set", f"listen=127.0.0.1:{port}",
        "--set", f"state_dir={tmp_path / 'state'}",
        "--set", f"store={store}",
        "--set", f"initial_model={initial_model}",
    ]  # fmt: skip


def test_initial_model_cid_is_round_0_base(procs: ProcessFactory, tmp_path: Path, stored_base: tuple[Path, str, bytes]) -> None:
    store, cid, weights = stored_base
    port = free_port()
    aggregator = procs.strata(*_serve_args(tmp_path, port, store, cid), name="agg")
    started = aggregator.wait_for_event("aggregator_started", timeout=60)
    assert (started["round"], started["base"]) == (0, cid)
    wait_healthy(f"127.0.0.1:{port}", timeout=30)
    channel, stub = stub_for(f"127.0.0.1:{port}")
    with channel:
        home = join(stub, "first-agent")
        header, served = get_model(stub)
    assert (home.base.round, home.base.model_cid, home.base.weights_cid) == (0, cid, cid_of(weights))
    assert header.model_cid == cid and served == weights
    # and it is not the task's own initialization, which the aggregator would otherwise make
    assert served != encode_tensors(DigitsTask.seeded_weights())


def test_initial_model_cid_not_in_the_store_is_a_one_line_error(procs: ProcessFactory, tmp_path: Path) -> None:
    absent = cid_of(np.arange(10, dtype=np.float32).tobytes())
    aggregator = procs.strata(*_serve_args(tmp_path, free_port(), tmp_path / "empty-store", absent), name="agg")
    code = aggregator.wait_exit(timeout=60)
    stderr = aggregator.stderr_path.read_text()
    lines = stderr.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("strata: ") and absent in lines[0] and "not in store" in lines[0], lines
    assert not aggregator.events("aggregator_started")


def test_initial_model_cid_not_in_the_store_names_the_setting(procs: ProcessFactory, tmp_path: Path) -> None:
    absent = cid_of(b"not a model anyone stored")
    aggregator = procs.strata(*_serve_args(tmp_path, free_port(), tmp_path / "empty-store", absent), name="agg")
    assert aggregator.wait_exit(timeout=60) == 2  # usage or invalid input: a config error
    assert "initial_model" in aggregator.stderr_path.read_text()
