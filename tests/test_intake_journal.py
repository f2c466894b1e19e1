"""The intake journal over a real SQLite file: what a restart reads back is what was recorded. Milliseconds each."""

from __future__ import annotations

from pathlib import Path

import pytest

from intake.journal import AcceptedUpdate, IntakeJournal
from relay.journal import RelayJournal
from storage.cid import cid_of

BASE = cid_of(b"a base")


def accepted(agent: str = "a1", **fields) -> AcceptedUpdate:
    values = dict(
        agent_id=agent,
        base_cid=BASE,
        trained_round=3,
        counted_round=4,
        update_cid=cid_of(f"manifest of {agent}".encode()),
        weights_cid=cid_of(f"weights of {agent}".encode()),
        num_samples=30,
        weight=21.2,
        staleness=1,
        size=1234,
        tensors=("b", "w"),
    )
    values.update(fields)
    return AcceptedUpdate(**values)


@pytest.fixture
def journal(tmp_path: Path):
    journal = IntakeJournal(tmp_path / "journal.sqlite")
    yield journal
    journal.close()


def test_an_update_reads_back_as_recorded_after_a_reopen(tmp_path: Path) -> None:
    update = accepted(
        metrics={"loss": 0.25, "acc": 0.5}, base_metrics={"loss": 0.75}, kind="relay", accepted_at=1000.5
    )
    journal = IntakeJournal(tmp_path / "journal.sqlite")
    assert journal.record_update(update) is True
    journal.close()
    reopened = IntakeJournal(tmp_path / "journal.sqlite")
    assert reopened.find_update("a1", BASE) == update
    assert reopened.open_updates() == [update] and list(reopened.iter_all_updates()) == [update]
    reopened.close()


def test_one_update_per_agent_and_base(journal: IntakeJournal) -> None:
    first = accepted()
    assert journal.record_update(first) is True
    assert journal.record_update(accepted(weights_cid=cid_of(b"other weights"))) is False
    assert journal.find_update("a1", BASE) == first and journal.accepted_count() == 1
    assert journal.record_update(accepted(base_cid=cid_of(b"the next base"))) is True  # another base, another update
    assert journal.find_update("a1", cid_of(b"nobody's base")) is None


def test_all_updates_come_back_oldest_first(journal: IntakeJournal) -> None:
    journal.record_update(accepted("late", accepted_at=20.0))
    journal.record_update(accepted("early", accepted_at=10.0))
    assert [u.agent_id for u in journal.iter_all_updates()] == ["early", "late"]


def test_a_bases_round_is_its_first_recording(journal: IntakeJournal) -> None:
    journal.record_base(BASE, 3)
    journal.record_base(BASE, 4)
    assert journal.base_round(BASE) == 3 and journal.base_round(cid_of(b"unknown")) is None


def test_the_latest_base_is_the_one_seen_last_by_the_time_given(tmp_path: Path) -> None:
    """A relay re-homed to an aggregator a round behind serves that aggregator's base: the latest is
    the one seen last by the time recorded with it (`now`), not the highest round, nor the last written."""
    journal = RelayJournal(tmp_path / "relay.sqlite")
    bases = {r: cid_of(f"base of round {r}".encode()) for r in (1, 2, 3)}
    journal.record_base(bases[3], 3, now=100.0)
    journal.record_base(bases[2], 2, now=200.0)
    assert journal.latest_base() == (bases[2], 2)
    journal.record_base(bases[1], 1, now=150.0)
    assert journal.latest_base() == (bases[2], 2)
    journal.close()


def test_refusals_are_counted_by_reason_per_round_and_in_total(journal: IntakeJournal) -> None:
    journal.record_refusal(4, "a1", "stale", "too old")
    journal.record_refusal(4, "a2", "stale", "too old")
    journal.record_refusal(5, "a1", "not_finite", "x" * 10_000)  # a stranger's long message is cut, not refused
    assert journal.refusal_counts(4) == {"stale": 2}
    assert journal.refusal_counts() == {"stale": 2, "not_finite": 1}
    assert journal.refusal_counts(6) == {}
