"""Buffered rounds (FedBuff) with a test clock, a real store and a real journal: the step's math with
known answers, the buffer size, staleness bounds, restart, the synthesis cadence and the config
combinations refused at load. Milliseconds each."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.buffered import rebase, synthesis_due
from aggregator.config import AggregatorConfig, RoundSettings, SelectionSettings, SynthesisSettings
from aggregator.rules import make_strategy
from privacy.config import CentralDpSettings, PrivacySettings
from proto.errors import ConfigError, Refusal, UpdateRefused
from storage.manifest import Manifest
from storage.models import load_manifest
from tests.test_rounds import Rounds

BUFFERED = {"mode": "buffered", "quorum": 1.0, "min_updates": 1, "deadline_s": 600.0}


class SynthesisCalls:
    """A synthesizer that records when it ran and hands back the cluster model (no peers here)."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def __call__(self, cluster: Manifest, tensors: Mapping[str, np.ndarray]) -> Manifest:
        self.rounds.append(cluster.round)
        return cluster


class BufferedRounds(Rounds):
    """tests.test_rounds.Rounds with a synthesizer and a cadence."""

    def __init__(self, tmp_path: Path, *, every_steps: int = 1, every_s: float = 0.0, **kwargs) -> None:
        self.synthesis = SynthesisCalls()
        self.every = (every_steps, every_s)
        super().__init__(tmp_path, **{**BUFFERED, **kwargs})

    def _manager_options(self) -> dict[str, object]:
        return {
            "synthesize": self.synthesis,
            "synthesis_every_steps": self.every[0],
            "synthesis_every_s": self.every[1],
        }

    def step(self) -> Manifest | None:
        # the active-trainer count is the sync quorum's business: a buffer ignores it
        return self.manager.maybe_close(active_trainers=1)


def test_rebase_moves_a_delta_onto_the_current_base() -> None:
    update = {"w": np.array([1.5, -2.0], np.float32), "steps": np.array([7], np.int64)}
    trained_on = {"w": np.array([1.0, 1.0], np.float32), "steps": np.array([3], np.int64)}
    current = {"w": np.array([10.0, 20.0], np.float32), "steps": np.array([5], np.int64)}
    moved = rebase(update, trained_on, current)
    np.testing.assert_array_equal(moved["w"], np.array([10.5, 17.0], np.float32))
    assert moved["w"].dtype == np.float32
    assert moved["steps"][0] == 7  # a non-float tensor is no delta: taken as sent
    assert update["w"][0] == np.float32(1.5)  # inputs untouched


def test_synthesis_is_due_every_m_steps_or_t_seconds() -> None:
    assert synthesis_due(steps_since=1, seconds_since=0.0, every_steps=1, every_s=0.0)
    assert not synthesis_due(steps_since=2, seconds_since=100.0, every_steps=3, every_s=0.0)
    assert synthesis_due(steps_since=3, seconds_since=0.0, every_steps=3, every_s=0.0)
    assert synthesis_due(steps_since=1, seconds_since=30.0, every_steps=0, every_s=30.0)
    assert not synthesis_due(steps_since=9, seconds_since=29.9, every_steps=0, every_s=30.0)


def test_a_buffer_steps_at_k_updates_whatever_the_quorum(tmp_path: Path) -> None:
    rounds = BufferedRounds(tmp_path, buffer_size=3)
    try:
        rounds.submit("a1", 1.0, 10)
        rounds.submit("a2", 2.0, 10)
        assert rounds.step() is None  # a sync round with quorum 1.0 of one active trainer would close
        rounds.submit("a3", 3.0, 20)
        closed = rounds.step()
        assert closed is not None
        np.testing.assert_allclose(rounds.tensors(closed.cid), (10 + 20 + 60) / 40)
        record = rounds.manager.closed_rounds()[0]
        assert record.extra["trigger"] == "buffer_full" and record.extra["mode"] == "buffered"
        assert rounds.manager.current.round == 1
    finally:
        rounds.close()


def _step_one(rounds: BufferedRounds) -> str:
    """Step 0: three fresh updates of values 1, 2 and 3 (10, 10, 20 samples): base 1 = 2.25."""
    base0 = rounds.manager.current.model_cid
    for agent, value, samples in (("a1", 1.0, 10), ("a2", 2.0, 10), ("a3", 3.0, 20)):
        rounds.submit(agent, value, samples)
    assert rounds.step() is not None
    np.testing.assert_allclose(rounds.tensors(rounds.manager.current.model_cid), 2.25)
    return base0


def test_the_step_applies_staleness_weighted_deltas_to_the_current_base(tmp_path: Path) -> None:
    """Step 1 on base 2.25: a late update trained on base 0 (value 4: delta 4, 10 samples, one step stale,
    discount (1 + 1)^-1 = 0.5: weight 5), and fresh ones with deltas 1 (weight 10) and 0 (weight 5):
    2.25 + (5·4 + 10·1 + 5·0) / 20 = 3.75. A FedAvg of the weights would give 3.25."""
    rounds = BufferedRounds(tmp_path, buffer_size=3, staleness_discount="polynomial", staleness_params={"exponent": 1.0})
    try:
        base0 = _step_one(rounds)
        rounds.submit("late", 4.0, 10, base=base0, round_=0)
        rounds.submit("b1", 3.25, 10)
        rounds.submit("b2", 2.25, 5)
        closed = rounds.step()
        assert closed is not None
        np.testing.assert_allclose(rounds.tensors(closed.cid), 3.75)
        buffer = load_manifest(rounds.store, closed.cid).extra["buffer"]
        assert buffer["buffer_size"] == 3
        by_agent = {entry["agent"]: entry for entry in buffer["updates"]}
        assert by_agent["late"]["staleness"] == 1 and by_agent["late"]["trained_round"] == 0
        assert by_agent["late"]["discount"] == pytest.approx(0.5) and by_agent["late"]["weight"] == pytest.approx(5.0)
        assert by_agent["b1"]["staleness"] == 0 and by_agent["b1"]["weight"] == pytest.approx(10.0)
        assert set(closed.parents) == {entry["cid"] for entry in buffer["updates"]}
    finally:
        rounds.close()


def test_a_server_learning_rate_scales_the_step(tmp_path: Path) -> None:
    """FedBuff's server lr η as FedAvgM with momentum 0: 2.25 + 0.5 · 1.5 = 3.0."""
    strategy = make_strategy("fedavg", server_opt="fedavgm", server_opt_params={"lr": 0.5, "momentum": 0.0})
    rounds = BufferedRounds(
        tmp_path, strategy=strategy, buffer_size=3, staleness_discount="polynomial", staleness_params={"exponent": 1.0}
    )
    try:
        rounds.submit("a1", 1.0, 10)
        rounds.submit("a2", 2.0, 10)
        rounds.submit("a3", 3.0, 20)
        rounds.step()
        base1 = rounds.tensors(rounds.manager.current.model_cid)
        np.testing.assert_allclose(base1, 0.5 * 2.25)  # from base 0 = 0: half the FedAvg step
        base0 = rounds.base0
        rounds.submit("late", 4.0, 10, base=base0, round_=0)
        rounds.submit("b1", float(base1[0]) + 1.0, 10)
        rounds.submit("b2", float(base1[0]), 5)
        closed = rounds.step()
        np.testing.assert_allclose(rounds.tensors(closed.cid), 1.125 + 0.5 * 1.5, rtol=1e-6)
    finally:
        rounds.close()


def test_a_restart_rebuilds_the_buffer_with_its_stale_updates_rebased(tmp_path: Path) -> None:
    rounds = BufferedRounds(tmp_path, buffer_size=3, staleness_discount="polynomial", staleness_params={"exponent": 1.0})
    try:
        base0 = _step_one(rounds)
        rounds.submit("late", 4.0, 10, base=base0, round_=0)
        rounds.submit("b1", 3.25, 10)
        rounds.restart()
        assert rounds.manager.accepted_count == 2
        rounds.submit("b2", 2.25, 5)
        closed = rounds.step()
        np.testing.assert_allclose(rounds.tensors(closed.cid), 3.75)
    finally:
        rounds.close()


def test_an_update_older_than_max_staleness_steps_is_refused_as_stale(tmp_path: Path) -> None:
    rounds = BufferedRounds(tmp_path, buffer_size=1, max_staleness=1)
    try:
        base0 = rounds.manager.current.model_cid
        rounds.submit("a1", 1.0)
        rounds.step()
        rounds.submit("a2", 1.0)
        rounds.step()
        with pytest.raises(UpdateRefused) as refused:
            rounds.submit("slow", 5.0, base=base0, round_=0)
        assert refused.value.reason == Refusal.STALE
    finally:
        rounds.close()


def test_synthesis_runs_every_m_steps_and_the_cadence_survives_a_restart(tmp_path: Path) -> None:
    rounds = BufferedRounds(tmp_path, buffer_size=1, every_steps=3)
    try:
        for index in range(4):
            rounds.submit(f"a{index}", float(index))
            rounds.step()
        assert rounds.synthesis.rounds == [2]
        rounds.restart()
        for index in range(4, 6):
            rounds.submit(f"a{index}", float(index))
            rounds.step()
        assert rounds.synthesis.rounds == [2, 5]
        assert [r.extra["synthesis"] for r in rounds.manager.closed_rounds()] == [False, False, True, False, False, True]
    finally:
        rounds.close()


def test_synthesis_runs_at_the_first_step_t_seconds_after_the_last(tmp_path: Path) -> None:
    rounds = BufferedRounds(tmp_path, buffer_size=1, every_steps=0, every_s=30.0)
    try:
        for index, advance in enumerate((10.0, 10.0, 15.0, 5.0)):
            rounds.clock.now += advance
            rounds.submit(f"a{index}", float(index))
            rounds.step()
        assert rounds.synthesis.rounds == [2]  # 35 s after the start; the next is due 30 s after that
    finally:
        rounds.close()


def test_sync_rounds_are_unchanged_stale_weights_are_averaged_not_rebased(tmp_path: Path) -> None:
    rounds = Rounds(tmp_path, quorum=1.0, min_updates=1, staleness_discount="polynomial", staleness_params={"exponent": 1.0})
    try:
        base0 = rounds.manager.current.model_cid
        rounds.submit("a1", 0.0)
        rounds.manager.maybe_close(active_trainers=1)
        rounds.submit("fresh", 3.0, 10)
        rounds.submit("late", 6.0, 10, base=base0, round_=0)
        closed = rounds.manager.maybe_close(active_trainers=2)
        np.testing.assert_allclose(rounds.tensors(closed.cid), (3.0 * 10 + 6.0 * 5) / 15)
        assert "buffer" not in load_manifest(rounds.store, closed.cid).extra
    finally:
        rounds.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"selection": SelectionSettings(mode="count", count=3)}, "selection.mode"),
        ({"privacy": PrivacySettings(central=CentralDpSettings(clip=1.0))}, "central DP"),
        ({"round_config": {"scaffold": "true"}, "synthesis": SynthesisSettings(enabled=False)}, "scaffold"),
        ({"synthesis": SynthesisSettings()}, "decay_unit: seconds"),
        ({"synthesis": SynthesisSettings(decay_unit="seconds", every_steps=0, every_s=0.0)}, "every_steps"),
    ],
)
def test_buffered_mode_refuses_what_it_cannot_honour_at_load(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AggregatorConfig(round=RoundSettings(mode="buffered"), **changes)


def test_buffered_config_that_works() -> None:
    config = AggregatorConfig(
        round=RoundSettings(mode="buffered", buffer_size=5),
        synthesis=SynthesisSettings(decay_unit="seconds", max_age=60.0, every_s=5.0),
    )
    assert config.round.buffer_size == 5
    AggregatorConfig(round=RoundSettings(mode="buffered"), synthesis=SynthesisSettings(enabled=False))
    with pytest.raises(ConfigError, match="round.mode"):
        RoundSettings(mode="async")
    with pytest.raises(ConfigError, match="buffer_size"):
        RoundSettings(mode="buffered", buffer_size=0)


def test_a_robust_rule_sees_the_stale_update_rebased_not_its_stored_blob(tmp_path: Path) -> None:
    """Median over equal weights: step 0's median of 1, 2, 3 is base 1 = 2. The late update (value 3 on
    base 0: delta 3) counts as 2 + 3 = 5 beside 7 and 2 read back from the store: the median is 5, where
    its stored blob (3) would have been the median."""
    rounds = BufferedRounds(
        tmp_path,
        strategy=make_strategy("median"),
        buffer_size=3,
        staleness_discount="polynomial",
        staleness_params={"exponent": 1.0},
    )
    try:
        base0 = rounds.manager.current.model_cid
        for agent, value in (("a1", 1.0), ("a2", 2.0), ("a3", 3.0)):
            rounds.submit(agent, value, 10)
        rounds.step()
        np.testing.assert_allclose(rounds.tensors(rounds.manager.current.model_cid), 2.0)
        rounds.submit("late", 3.0, 10, base=base0, round_=0)  # weight 10 x 0.5 = 5
        rounds.submit("b1", 7.0, 5)
        rounds.submit("b2", 2.0, 5)
        closed = rounds.step()
        np.testing.assert_allclose(rounds.tensors(closed.cid), 5.0)
    finally:
        rounds.close()
