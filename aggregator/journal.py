"""The round journal: what an aggregator has accepted and decided, durable across kill -9.

SQLite in WAL mode with synchronous=FULL: a transaction that returned has reached
the disk. An update is acknowledged to its agent only after `record_update`
returns, and its blob and manifest were stored before that, so a restarted
aggregator rebuilds its round from this journal and the store.

Tables: the intake's `bases`, `updates` and `refusals` (intake.journal), plus
- `rounds`    the per-round history: participants, refusals, timing, models and metrics.
An update accepted in round r stays open until round r closes into its cluster model.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from intake.journal import INTAKE_SCHEMA, AcceptedUpdate, IntakeJournal

_ROUNDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    base_cid TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL,
    participants INTEGER,
    num_samples INTEGER,
    cluster_cid TEXT,
    next_base_cid TEXT,
    aggregation_s REAL,
    metrics TEXT,
    base_metrics TEXT,
    refusals TEXT,
    extra TEXT
);
CREATE TABLE IF NOT EXISTS invitations (
    round INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    invited_at REAL NOT NULL,
    PRIMARY KEY (round, agent_id)
);
"""


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    round: int
    base_cid: str
    opened_at: float
    closed_at: float | None = None
    participants: int | None = None
    num_samples: int | None = None
    cluster_cid: str | None = None
    next_base_cid: str | None = None
    aggregation_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    base_metrics: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Journal(IntakeJournal):
    """The aggregator's round journal: the intake's tables plus the rounds."""

    SCHEMA = INTAKE_SCHEMA + _ROUNDS_SCHEMA
    SCHEMA_VERSION = 3

    def open_round(self, round_: int, base_cid: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._write(
            [
                self._base_statement(base_cid, round_, now),
                ("INSERT OR IGNORE INTO rounds (round, base_cid, opened_at) VALUES (?, ?, ?)", (round_, base_cid, now)),
            ]
        )

    def current_round(self) -> RoundRecord | None:
        rows = self._read("SELECT * FROM rounds WHERE closed_at IS NULL ORDER BY round DESC LIMIT 1")
        return _round_from_row(rows[0]) if rows else None

    def close_round(
        self, record: RoundRecord, updates: Sequence[AcceptedUpdate], *, next_round: int, next_base_cid: str
    ) -> None:
        """Record a closed round, close its updates into the cluster model and open the next
        round, in one transaction."""
        assert record.closed_at is not None and record.next_base_cid == next_base_cid
        assert record.cluster_cid is not None
        self._write(
            [
                (
                    "UPDATE rounds SET closed_at=?, participants=?, num_samples=?, cluster_cid=?, next_base_cid=?, "
                    "aggregation_s=?, metrics=?, base_metrics=?, refusals=?, extra=? WHERE round=?",
                    (
                        record.closed_at,
                        record.participants,
                        record.num_samples,
                        record.cluster_cid,
                        record.next_base_cid,
                        record.aggregation_s,
                        json.dumps(record.metrics, sort_keys=True),
                        json.dumps(record.base_metrics, sort_keys=True),
                        json.dumps(record.refusals, sort_keys=True),
                        json.dumps(record.extra, sort_keys=True),
                        record.round,
                    ),
                ),
                *self._batch_statements(record.cluster_cid, updates),
                self._base_statement(next_base_cid, next_round, record.closed_at),
                (
                    "INSERT OR IGNORE INTO rounds (round, base_cid, opened_at) VALUES (?, ?, ?)",
                    (next_round, next_base_cid, record.closed_at),
                ),
            ]
        )

    def history(self) -> list[RoundRecord]:
        return [_round_from_row(row) for row in self._read("SELECT * FROM rounds ORDER BY round")]

    # ---------------------------------------------------------- invitations (selection)

    def record_invitations(self, round_: int, agent_ids: Sequence[str], *, now: float) -> None:
        self._write(
            [
                ("INSERT OR IGNORE INTO invitations (round, agent_id, invited_at) VALUES (?, ?, ?)", (round_, a, now))
                for a in agent_ids
            ]
        )

    def invited(self, round_: int) -> set[str]:
        return {row["agent_id"] for row in self._read("SELECT agent_id FROM invitations WHERE round = ?", (round_,))}

    def was_invited(self, round_: int, agent_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM invitations WHERE round = ? AND agent_id = ?", (round_, agent_id)))

    def times_invited(self) -> dict[str, int]:
        """How many rounds each agent was invited to, over the journal's life."""
        rows = self._read("SELECT agent_id, COUNT(*) AS n FROM invitations GROUP BY agent_id")
        return {row["agent_id"]: int(row["n"]) for row in rows}

    def latest_closed_round(self) -> RoundRecord | None:
        rows = self._read("SELECT * FROM rounds WHERE closed_at IS NOT NULL ORDER BY round DESC LIMIT 1")
        return _round_from_row(rows[0]) if rows else None

    def closed_round_count(self) -> int:
        return int(self._read("SELECT COUNT(*) AS n FROM rounds WHERE closed_at IS NOT NULL")[0]["n"])


def _round_from_row(row: sqlite3.Row) -> RoundRecord:
    def load(value: str | None) -> dict[str, Any]:
        return json.loads(value) if value else {}

    return RoundRecord(
        round=int(row["round"]),
        base_cid=row["base_cid"],
        opened_at=float(row["opened_at"]),
        closed_at=row["closed_at"],
        participants=row["participants"],
        num_samples=row["num_samples"],
        cluster_cid=row["cluster_cid"],
        next_base_cid=row["next_base_cid"],
        aggregation_s=row["aggregation_s"],
        metrics=load(row["metrics"]),
        base_metrics=load(row["base_metrics"]),
        refusals=load(row["refusals"]),
        extra=load(row["extra"]),
    )
