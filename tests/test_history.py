"""`strata history` and `strata plot` read an aggregator's journal, also while it is being written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.journal import Journal, RoundRecord
from tests.procs import run_strata

CIDS = [
    "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH",
    "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
    "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n",
]


def _journal_with_rounds(state_dir: Path) -> None:
    with Journal(state_dir / "journal.sqlite") as journal:
        journal.open_round(0, CIDS[0], now=100.0)
        for round_, (base, nxt) in enumerate([(CIDS[0], CIDS[1]), (CIDS[1], CIDS[2])]):
            journal.record_refusal(round_, "agent-x", "not_finite", "NaN")
            journal.close_round(
                RoundRecord(
                    round=round_,
                    base_cid=base,
                    opened_at=100.0 + round_,
                    closed_at=101.0 + round_,
                    participants=3,
                    num_samples=300,
                    cluster_cid=nxt,
                    next_base_cid=nxt,
                    aggregation_s=0.01,
                    metrics={"loss": 1.0 - 0.3 * round_},
                    base_metrics={"accuracy": 0.2 + 0.4 * round_, "loss": 2.0 - round_},
                    refusals={"not_finite": 1},
                ),
                [],
                next_round=round_ + 1,
                next_base_cid=nxt,
            )


def test_history_table_and_json(tmp_path: Path) -> None:
    state = tmp_path / "agg-a"
    _journal_with_rounds(state)
    table = run_strata("history", "--state-dir", str(state), home=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "== agg-a" in table.stdout and "not_finite=1" in table.stdout
    rows = json.loads(run_strata("history", "--state-dir", str(state), "--json", home=tmp_path).stdout)["agg-a"]
    closed = [r for r in rows if r["closed"]]
    assert [r["accuracy"] for r in closed] == pytest.approx([0.2, 0.6])
    assert closed[-1]["next_base"] == CIDS[2]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    state = tmp_path / "agg-a"
    _journal_with_rounds(state)
    out = tmp_path / "acc.png"
    result = run_strata("plot", "--state-dir", str(state), "-o", str(out), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_strata("plot", "--state-dir", str(state), "-o", str(tmp_path / "acc.jpg"), home=tmp_path)
    assert bad.returncode == 2


def test_history_without_journals_is_a_clear_not_found(tmp_path: Path) -> None:
    result = run_strata("history", home=tmp_path)
    assert result.returncode == 3
    assert "no aggregator journal found" in result.stderr
