"""The round state machine with a test clock, a real store and a real journal: quorum, deadline,
extension, restart, and how stale updates weigh in the cluster model. Milliseconds each."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import RoundSettings
from aggregator.journal import Journal
from aggregator.privacy import PrivacyGuard
from aggregator.rounds import RoundManager
from aggregator.strategies import FedAvg, Strategy
from intake.submission import Submission
from privacy.config import PrivacySettings
from proto.errors import FINAL_REFUSALS, Refusal, UpdateRefused
from storage.codec import decode_tensors, encode_tensors
from storage.keys import KeyPair
from storage.manifest import Producer
from storage.models import load_model, save_model
from storage.store import LocalStore

W = "w"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rounds:
    """A RoundManager over files in tmp_path; `restart()` builds a new one over the same files."""

    def __init__(
        self, tmp_path: Path, *, strategy: Strategy | None = None, privacy: PrivacySettings | None = None, **settings
    ) -> None:
        self.tmp_path = tmp_path
        self.strategy = strategy if strategy is not None else FedAvg()
        self.privacy = privacy
        self.settings = RoundSettings(**{"deadline_s": 30.0, "max_relative_norm": 0, **settings})
        self.clock = Clock()
        self.key = KeyPair.generate()
        self.store = LocalStore(tmp_path / "store")
        self.base0 = save_model(
            self.store,
            weights=encode_tensors({W: np.zeros(2, np.float32)}),
            kind="base",
            federation="digits",
            round=0,
            producer=Producer(role="test", id="init"),
            key=self.key,
        ).cid
        self.new_bases: list[str] = []
        self.manager = self._manager()

    def _manager(self) -> RoundManager:
        self.journal = Journal(self.tmp_path / "journal.sqlite")
        manager = RoundManager(
            aggregator_id="agg-t",
            federation="digits",
            settings=self.settings,
            store=self.store,
            journal=self.journal,
            strategy=self.strategy,
            key=self.key,
            initial_base=self.base0,
            on_new_base=lambda base: self.new_bases.append(base.model_cid),
            # a new guard per manager: a restart rebuilds the ledger from the journal
            privacy=PrivacyGuard(self.privacy, federation="digits") if self.privacy is not None else None,
            clock=self.clock,
            **self._manager_options(),
        )
        manager.start()
        return manager

    def _manager_options(self) -> dict[str, object]:
        """More RoundManager arguments, for fixtures built on this one."""
        return {}

    def restart(self) -> None:
        self.manager.close()
        self.journal.close()
        self.manager = self._manager()

    def submit(self, agent: str, value: float, num_samples: int = 10, *, base: str | None = None, round_: int | None = None):
        current = self.manager.current
        return self.manager.intake.submit(
            Submission(
                agent_id=agent,
                round=current.round if round_ is None else round_,
                base_cid=base or current.model_cid,
                num_samples=num_samples,
                weights=encode_tensors({W: np.full(2, value, np.float32)}),
                federation="digits",
            )
        )

    def tensors(self, model_cid: str) -> np.ndarray:
        return decode_tensors(load_model(self.store, model_cid)[1])[W]

    def close(self) -> None:
        self.manager.close()
        self.journal.close()
        self.store.close()


@pytest.fixture
def rounds(tmp_path: Path):
    fixture = Rounds(tmp_path, quorum=1.0, min_updates=1)
    yield fixture
    fixture.close()


def test_quorum_closes_the_round_into_a_cluster_model_of_its_updates(rounds: Rounds) -> None:
    first = rounds.submit("a1", 1.0, 10)
    assert rounds.manager.maybe_close(active_trainers=2) is None  # 1 of 2
    second = rounds.submit("a2", 4.0, 30)
    next_base = rounds.manager.maybe_close(active_trainers=2)
    assert next_base is not None and next_base.kind == "cluster"
    assert set(next_base.parents) == {first.update_cid, second.update_cid}
    assert next_base.base == rounds.base0 and next_base.num_samples == 40
    np.testing.assert_allclose(rounds.tensors(next_base.cid), (1.0 * 10 + 4.0 * 30) / 40)
    assert rounds.manager.current.round == 1 and rounds.manager.current.model_cid == next_base.cid
    assert rounds.new_bases == [next_base.cid]
    (closed,) = rounds.manager.closed_rounds()
    assert (closed.extra["trigger"], closed.participants, closed.cluster_cid) == ("quorum", 2, next_base.cid)


def test_quorum_target_is_a_fraction_of_active_trainers_and_at_least_min_updates(tmp_path: Path) -> None:
    fixture = Rounds(tmp_path, quorum=0.5, min_updates=2)
    assert [fixture.manager.quorum_target(n) for n in (0, 1, 4, 5, 10)] == [2, 2, 2, 3, 5]
    fixture.close()


def test_the_deadline_closes_a_round_short_of_quorum(rounds: Rounds) -> None:
    rounds.submit("a1", 1.0)
    assert rounds.manager.maybe_close(active_trainers=5) is None
    rounds.clock.now += rounds.settings.deadline_s - 0.01
    assert rounds.manager.maybe_close(active_trainers=5) is None
    rounds.clock.now += 0.02
    closed = rounds.manager.maybe_close(active_trainers=5)
    assert closed is not None
    assert rounds.manager.closed_rounds()[0].extra["trigger"] == "deadline"


def test_a_deadline_without_min_updates_extends_the_round(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fixture = Rounds(tmp_path, quorum=1.0, min_updates=2, deadline_s=10.0)
    fixture.submit("a1", 1.0)
    fixture.clock.now += 10.5
    with caplog.at_level(logging.INFO, logger="strata.aggregator.rounds"):
        assert fixture.manager.maybe_close(active_trainers=5) is None
    extended = [r for r in caplog.records if r.getMessage() == "round_extended"]
    assert len(extended) == 1 and extended[0].fields["accepted"] == 1 and extended[0].fields["min_updates"] == 2
    fixture.clock.now += 9.0  # still inside the extension
    assert fixture.manager.maybe_close(active_trainers=5) is None
    fixture.submit("a2", 2.0)
    assert fixture.manager.maybe_close(active_trainers=5) is None  # 2 of 5: below quorum, extension not over
    fixture.clock.now += 1.0
    assert fixture.manager.maybe_close(active_trainers=5) is not None
    assert fixture.manager.closed_rounds()[0].extra["trigger"] == "deadline"
    fixture.close()


def test_an_empty_round_never_closes(rounds: Rounds) -> None:
    rounds.clock.now += 10 * rounds.settings.deadline_s
    assert rounds.manager.maybe_close(active_trainers=0) is None
    assert rounds.manager.current.round == 0


def test_a_restart_rebuilds_the_open_round_from_the_journal(rounds: Rounds) -> None:
    rounds.submit("a1", 1.0, 10)
    rounds.submit("a2", 3.0, 10)
    rounds.restart()
    assert rounds.manager.accepted_count == 2
    again = rounds.submit("a1", 1.0, 10)
    assert again.duplicate
    closed = rounds.manager.maybe_close(active_trainers=2)
    np.testing.assert_allclose(rounds.tensors(closed.cid), 2.0)


def test_a_closed_rounds_updates_are_not_folded_again_after_a_restart(rounds: Rounds) -> None:
    rounds.submit("a1", 1.0)
    cluster = rounds.manager.maybe_close(active_trainers=1)
    (update,) = rounds.journal.iter_all_updates()
    assert update.batch == cluster.cid and rounds.journal.open_updates() == []  # closed into the cluster model
    rounds.restart()
    assert rounds.manager.current.round == 1 and rounds.manager.accepted_count == 0


def test_a_stale_update_counts_less_in_the_cluster_model(tmp_path: Path) -> None:
    """Round 1 takes an update trained on round 0's base at weight 10 x (1 + 1)^-1 = 5 (exponent 1)."""
    fixture = Rounds(
        tmp_path, quorum=1.0, min_updates=1, staleness_discount="polynomial", staleness_params={"exponent": 1.0}
    )
    base0 = fixture.manager.current.model_cid
    fixture.submit("a1", 0.0)
    fixture.manager.maybe_close(active_trainers=1)
    fixture.submit("fresh", 3.0, 10)
    fixture.submit("late", 6.0, 10, base=base0, round_=0)
    closed = fixture.manager.maybe_close(active_trainers=2)
    np.testing.assert_allclose(fixture.tensors(closed.cid), (3.0 * 10 + 6.0 * 5) / 15)
    assert fixture.manager.closed_rounds()[1].extra["stale_updates"] == 1
    fixture.close()


def test_an_agent_whose_late_update_counts_in_this_round_counts_once(tmp_path: Path) -> None:
    """A late update (trained on round 0, counted in round 1) leaves no room for the same agent's round-1
    update: it is refused already_counted (final), and a resend of the late one is still a duplicate."""
    fixture = Rounds(tmp_path, quorum=1.0, min_updates=1)
    base0 = fixture.manager.current.model_cid
    fixture.submit("a", 0.0)
    assert fixture.manager.maybe_close(active_trainers=1) is not None
    late = fixture.submit("b", 6.0, 10, base=base0, round_=0)
    with pytest.raises(UpdateRefused) as twice:
        fixture.submit("b", 3.0, 10)
    assert twice.value.reason == Refusal.ALREADY_COUNTED and Refusal.ALREADY_COUNTED in FINAL_REFUSALS
    assert fixture.submit("b", 6.0, 10, base=base0, round_=0).update_cid == late.update_cid
    fixture.submit("a", 1.0, 10)
    closed = fixture.manager.maybe_close(active_trainers=2)
    assert closed is not None and len(closed.parents) == 2
    # once round 1 closed, b's next update is welcome again
    fixture.submit("b", 2.0, 10)
    fixture.close()
