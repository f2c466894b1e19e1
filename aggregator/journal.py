"""The round journal: what an aggregator has accepted and decided, durable across kill -9.

SQLite in WAL mode with synchronous=FULL: a transaction that returned has reached
the disk. An update is acknowledged to its agent only after `record_update`
returns, and its blob and manifest were stored before that, so a restarted
aggregator rebuilds its round from this journal and the store.

Tables:
- `bases`     every base model this aggregator has served, with its round;
- `updates`   accepted updates, keyed by (agent, trained round): one per agent per round;
- `refusals`  refused submissions with their reason codes;
- `rounds`    the per-round history: participants, refusals, timing, models and metrics.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from storage.durable import DurableSqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bases (
    model_cid TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    agent_id TEXT NOT NULL,
    trained_round INTEGER NOT NULL,
    counted_round INTEGER NOT NULL,
    base_cid TEXT NOT NULL,
    update_cid TEXT NOT NULL,
    weights_cid TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    weight REAL NOT NULL,
    staleness INTEGER NOT NULL,
    tensors TEXT NOT NULL,
    metrics TEXT NOT NULL,
    base_metrics TEXT NOT NULL,
    kind TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    PRIMARY KEY (agent_id, trained_round)
);
CREATE INDEX IF NOT EXISTS updates_by_round ON updates (counted_round);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    at REAL NOT NULL
);
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
"""


@dataclass(frozen=True, kw_only=True)
class AcceptedUpdate:
    agent_id: str
    trained_round: int
    counted_round: int
    base_cid: str
    update_cid: str
    weights_cid: str
    num_samples: int
    weight: float
    staleness: int
    tensors: tuple[str, ...]
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    kind: str
    accepted_at: float


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


class Journal(DurableSqlite):
    """The aggregator's round journal."""

    SCHEMA = _SCHEMA

    # ---------------------------------------------------------- bases and rounds

    def open_round(self, round_: int, base_cid: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._write(
            [
                ("INSERT OR IGNORE INTO bases (model_cid, round, created_at) VALUES (?, ?, ?)", (base_cid, round_, now)),
                ("INSERT OR IGNORE INTO rounds (round, base_cid, opened_at) VALUES (?, ?, ?)", (round_, base_cid, now)),
            ]
        )

    def current_round(self) -> RoundRecord | None:
        rows = self._read("SELECT * FROM rounds WHERE closed_at IS NULL ORDER BY round DESC LIMIT 1")
        return _round_from_row(rows[0]) if rows else None

    def base_round(self, model_cid: str) -> int | None:
        rows = self._read("SELECT round FROM bases WHERE model_cid = ?", (model_cid,))
        return int(rows[0]["round"]) if rows else None

    def close_round(self, record: RoundRecord, *, next_round: int, next_base_cid: str) -> None:
        """Record a closed round and open the next one in one transaction."""
        assert record.closed_at is not None and record.next_base_cid == next_base_cid
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
                (
                    "INSERT OR IGNORE INTO bases (model_cid, round, created_at) VALUES (?, ?, ?)",
                    (next_base_cid, next_round, record.closed_at),
                ),
                (
                    "INSERT OR IGNORE INTO rounds (round, base_cid, opened_at) VALUES (?, ?, ?)",
                    (next_round, next_base_cid, record.closed_at),
                ),
            ]
        )

    def history(self, *, limit: int | None = None) -> list[RoundRecord]:
        sql = "SELECT * FROM rounds ORDER BY round"
        rows = self._read(sql)
        records = [_round_from_row(row) for row in rows]
        return records[-limit:] if limit else records

    # ---------------------------------------------------------- updates

    def find_update(self, agent_id: str, trained_round: int) -> AcceptedUpdate | None:
        rows = self._read(
            "SELECT * FROM updates WHERE agent_id = ? AND trained_round = ?", (agent_id, trained_round)
        )
        return _update_from_row(rows[0]) if rows else None

    def record_update(self, update: AcceptedUpdate) -> bool:
        """Durably record an accepted update. False if (agent, round) was already recorded."""
        try:
            self._write(
                [
                    (
                        "INSERT INTO updates (agent_id, trained_round, counted_round, base_cid, update_cid, "
                        "weights_cid, num_samples, weight, staleness, tensors, metrics, base_metrics, kind, accepted_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            update.agent_id,
                            update.trained_round,
                            update.counted_round,
                            update.base_cid,
                            update.update_cid,
                            update.weights_cid,
                            update.num_samples,
                            update.weight,
                            update.staleness,
                            json.dumps(list(update.tensors)),
                            json.dumps(update.metrics, sort_keys=True),
                            json.dumps(update.base_metrics, sort_keys=True),
                            update.kind,
                            update.accepted_at,
                        ),
                    )
                ]
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def updates_for_round(self, counted_round: int) -> list[AcceptedUpdate]:
        rows = self._read("SELECT * FROM updates WHERE counted_round = ? ORDER BY accepted_at, agent_id", (counted_round,))
        return [_update_from_row(row) for row in rows]

    def iter_all_updates(self) -> Iterator[AcceptedUpdate]:
        for row in self._read("SELECT * FROM updates ORDER BY accepted_at"):
            yield _update_from_row(row)

    # ---------------------------------------------------------- refusals

    def record_refusal(self, round_: int, agent_id: str, reason: str, message: str) -> None:
        self._write(
            [
                (
                    "INSERT INTO refusals (round, agent_id, reason, message, at) VALUES (?, ?, ?, ?, ?)",
                    (round_, agent_id, reason, message[:500], time.time()),
                )
            ]
        )

    def totals(self) -> dict[str, Any]:
        """Lifetime counts for metrics: accepted updates, closed rounds, refusals by reason."""
        accepted = self._read("SELECT COUNT(*) AS n FROM updates")[0]["n"]
        closed = self._read("SELECT COUNT(*) AS n FROM rounds WHERE closed_at IS NOT NULL")[0]["n"]
        refusals = self._read("SELECT reason, COUNT(*) AS n FROM refusals GROUP BY reason")
        return {
            "updates_accepted": int(accepted),
            "rounds_closed": int(closed),
            "refusals": {row["reason"]: int(row["n"]) for row in refusals},
        }

    def refusal_counts(self, round_: int) -> dict[str, int]:
        rows = self._read("SELECT reason, COUNT(*) AS n FROM refusals WHERE round = ? GROUP BY reason", (round_,))
        return {row["reason"]: int(row["n"]) for row in rows}


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


def _update_from_row(row: sqlite3.Row) -> AcceptedUpdate:
    return AcceptedUpdate(
        agent_id=row["agent_id"],
        trained_round=int(row["trained_round"]),
        counted_round=int(row["counted_round"]),
        base_cid=row["base_cid"],
        update_cid=row["update_cid"],
        weights_cid=row["weights_cid"],
        num_samples=int(row["num_samples"]),
        weight=float(row["weight"]),
        staleness=int(row["staleness"]),
        tensors=tuple(json.loads(row["tensors"])),
        metrics=json.loads(row["metrics"]),
        base_metrics=json.loads(row["base_metrics"]),
        kind=row["kind"],
        accepted_at=float(row["accepted_at"]),
    )
