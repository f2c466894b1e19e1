"""A restarted agent resumes from its state directory.

Same identity; no second training or submission for a base it already submitted on;
an update left pending on disk (written, never acknowledged) is resent after the restart
and counted exactly once, whether the aggregator had already accepted it or not.
The aggregator runs in-process on 127.0.0.1:0 with min_updates 2, so a round stays open
until a second agent ("other") submits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import Client
from agent.config import AgentConfig
from agent.daemon import AgentDaemon
from agent.state import AgentState, PendingUpdate
from agent.submit import local_update
from agent.tasks.digits import DigitsTask
from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.daemon import AggregatorDaemon
from intake.config import ServingSettings
from storage.cid import cid_of
from storage.models import load_manifest
from strata.wiring import initial_model_factory

RUN_TIMEOUT_S = 30.0


class CountingTrainer:
    """The digits task, remembering which rounds it trained on."""

    def __init__(self, index: int) -> None:
        self.task = DigitsTask(partition={"scheme": "iid", "index": index, "count": 4})
        self.trained_rounds: list[int] = []

    def train(self, weights: Mapping[str, np.ndarray], round_config: Mapping[str, Any]) -> Any:
        self.trained_rounds.append(int(round_config["round"]))
        return self.task.train(weights, round_config)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self.task.evaluate(weights)


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[AggregatorDaemon]:
    config = AggregatorConfig(
        id="agg-resume",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "agg"),
        store=str(tmp_path / "store"),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        round=RoundSettings(min_updates=2, quorum=1.0, deadline_s=600.0),
    )
    daemon = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    try:
        yield daemon
    finally:
        daemon.stop()


_threads: dict[int, threading.Thread] = {}


def run_agent(aggregator: AggregatorDaemon, state_dir: Path, trainer: CountingTrainer, **settings: Any) -> AgentDaemon:
    """Start an AgentDaemon in a thread; the caller joins it (bounded) via finish()."""
    config = AgentConfig(
        seeds=[aggregator.address], state_dir=str(state_dir), join_timeout_s=10, backoff_max_s=0.5, **settings
    )
    daemon = AgentDaemon(config, trainer=trainer)
    thread = _threads[id(daemon)] = threading.Thread(target=daemon.run, name="agent-under-test", daemon=True)
    thread.start()
    return daemon


def finish(daemon: AgentDaemon, timeout: float = RUN_TIMEOUT_S) -> None:
    """Wait (bounded) for the agent's run() to return; stop it and fail if it does not."""
    thread = _threads.pop(id(daemon))
    thread.join(timeout)
    if thread.is_alive():
        daemon.stop()
        thread.join(5.0)
        pytest.fail(f"agent did not finish within {timeout}s")


def other_agent_closes_round(aggregator: AggregatorDaemon, round_: int) -> None:
    """A second agent submits on the current base, which makes the round's second update."""
    with Client(aggregator.address, agent_id="other", watch=False, join_timeout_s=10) as other:
        base = other.wait_for_model(timeout=10)
        assert other.round == round_
        other.submit({n: a + np.float32(0.001) for n, a in base.items()}, 50)
    eventually(lambda: aggregator.rounds.current.round > round_, f"round {round_} did not close")


def eventually(condition: Callable[[], bool], message: str, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"{message} within {timeout}s")
        time.sleep(0.05)


def updates_by(aggregator: AggregatorDaemon, agent_id: str) -> list[tuple[int, str]]:
    return sorted((u.trained_round, u.update_cid) for u in aggregator.journal.iter_all_updates() if u.agent_id == agent_id)


def test_restart_keeps_identity_and_does_not_retrain_a_submitted_base(
    aggregator: AggregatorDaemon, tmp_path: Path
) -> None:
    state_dir = tmp_path / "agent"
    first_trainer = CountingTrainer(0)
    first = run_agent(aggregator, state_dir, first_trainer, max_rounds=1)
    finish(first)
    agent_id = first.client.agent_id
    assert agent_id.startswith("agent-"), "an id is generated when none is configured"
    assert first_trainer.trained_rounds == [0]
    assert updates_by(aggregator, agent_id)[0][0] == 0

    # restarted while round 0 is still open: it must not train or submit on base 0 again
    second_trainer = CountingTrainer(0)
    second = run_agent(aggregator, state_dir, second_trainer, max_rounds=1)
    threading.Event().wait(1.5)
    assert second.client is not None and second.client.agent_id == agent_id
    assert second_trainer.trained_rounds == []
    assert aggregator.rounds.accepted_count == 1

    other_agent_closes_round(aggregator, 0)
    finish(second)
    assert second_trainer.trained_rounds == [1]
    assert [r for r, _ in updates_by(aggregator, agent_id)] == [0, 1]
    assert not aggregator.journal.refusal_counts(0) and not aggregator.journal.refusal_counts(1)
    progress = AgentState(state_dir).progress
    assert progress.agent_id == agent_id and progress.pending is None
    assert progress.last_submitted_round == 1


def test_configured_id_survives_restart(aggregator: AggregatorDaemon, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    finish(run_agent(aggregator, state_dir, CountingTrainer(1), id="edge-7", max_rounds=1))
    key_before = (state_dir / "agent.key").read_bytes()
    assert AgentState(state_dir).agent_id == "edge-7"
    # the second run finds nothing to do on the open round; stop it and check nothing changed
    second = run_agent(aggregator, state_dir, CountingTrainer(1), max_rounds=1)
    threading.Event().wait(1.0)
    second.stop()
    finish(second)
    assert second.client.agent_id == "edge-7"
    assert (state_dir / "agent.key").read_bytes() == key_before
    assert updates_by(aggregator, "edge-7") == [(0, updates_by(aggregator, "edge-7")[0][1])]


def write_pending(state_dir: Path, aggregator: AggregatorDaemon, seed: int) -> tuple[str, PendingUpdate, bytes]:
    """Leave an update on disk exactly as Client.submit writes it before sending: the state of an
    agent killed between writing its pending update and hearing the aggregator's answer."""
    state = AgentState(state_dir)
    base = aggregator.rounds.current
    rng = np.random.default_rng(seed)
    tensors = {n: (a + rng.normal(0, 0.01, a.shape)).astype(a.dtype) for n, a in aggregator.rounds.base_tensors.items()}
    pending, blob = local_update(
        tensors,
        base=load_manifest(aggregator.store, base.model_cid),
        federation="digits",
        round=base.round,
        agent_id=state.agent_id,
        key=state.key,
        num_samples=123,
        metrics={"loss": 0.5},
    )
    state.progress.last_base_cid = base.model_cid  # it had downloaded this base before training
    state.set_pending(pending, blob)
    return state.agent_id, pending, blob


def test_pending_update_never_sent_is_sent_once_after_restart(aggregator: AggregatorDaemon, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent"
    agent_id, pending, blob = write_pending(state_dir, aggregator, seed=1)
    trainer = CountingTrainer(2)
    daemon = run_agent(aggregator, state_dir, trainer, max_rounds=1)
    eventually(lambda: AgentState(state_dir).progress.pending is None, "the pending update was not resent")
    threading.Event().wait(0.5)  # time to (wrongly) train on base 0 again

    accepted = updates_by(aggregator, agent_id)
    assert len(accepted) == 1 and accepted[0][0] == 0
    assert aggregator.journal.find_update(agent_id, pending.base_cid).weights_cid == cid_of(blob)
    assert aggregator.rounds.accepted_count == 1
    assert trainer.trained_rounds == [], "it must not train again on the base its pending update used"
    assert AgentState(state_dir).progress.pending is None
    assert not (state_dir / pending.weights_file).exists()

    other_agent_closes_round(aggregator, 0)
    finish(daemon)
    assert trainer.trained_rounds == [1]
    history = aggregator.journal.history()
    assert history[0].participants == 2 and history[0].num_samples == 123 + 50


def test_pending_update_already_accepted_is_a_duplicate_after_restart(
    aggregator: AggregatorDaemon, tmp_path: Path
) -> None:
    state_dir = tmp_path / "agent"
    agent_id, pending, blob = write_pending(state_dir, aggregator, seed=2)
    # the aggregator got it and acknowledged it, but the agent died before clearing it
    with Client(aggregator.address, state_dir=str(state_dir), watch=False, join_timeout_s=10) as client:
        receipt = client.resend_pending()
        assert receipt is not None and not receipt.duplicate
    AgentState(state_dir).set_pending(pending, blob)

    daemon = run_agent(aggregator, state_dir, CountingTrainer(3), max_rounds=1)
    eventually(lambda: AgentState(state_dir).progress.pending is None, "the pending update was not resent")
    daemon.stop()
    finish(daemon)
    assert updates_by(aggregator, agent_id) == [(0, receipt.update_cid)]
    assert aggregator.rounds.accepted_count == 1, "a resend was counted twice"
    assert not aggregator.journal.refusal_counts(0), "the restarted agent sent something different"
    progress = AgentState(state_dir).progress
    assert progress.pending is None and progress.last_update_cid == receipt.update_cid
