"""The intake's durable record: bases served, updates accepted, submissions refused.

Both receivers of updates (an aggregator's rounds and a relay's windows) keep
these three tables; each adds its own on top (`rounds`, `windows`). An update
is acknowledged only after `record_update` returned, and its blob and manifest
were stored before that, so a receiver rebuilds what it held after kill -9 from
this journal and its store.

An accepted update is *open* until the receiver closes it into a batch (an
aggregator's cluster model, a relay's combined update): `batch` names that
model, NULL while open. Updates are keyed by (agent, base): one update per
agent per base model, and a base model belongs to exactly one round.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from storage.durable import DurableSqlite, Statement

INTAKE_SCHEMA = """
CREATE TABLE IF NOT EXISTS bases (
    model_cid TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    agent_id TEXT NOT NULL,
    base_cid TEXT NOT NULL,
    trained_round INTEGER NOT NULL,
    counted_round INTEGER NOT NULL,
    update_cid TEXT NOT NULL,
    weights_cid TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    weight REAL NOT NULL,
    staleness INTEGER NOT NULL,
    size INTEGER NOT NULL,
    tensors TEXT NOT NULL,
    metrics TEXT NOT NULL,
    base_metrics TEXT NOT NULL,
    kind TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    batch TEXT,
    PRIMARY KEY (agent_id, base_cid)
);
CREATE INDEX IF NOT EXISTS updates_by_batch ON updates (batch);
CREATE INDEX IF NOT EXISTS open_updates_by_agent ON updates (agent_id) WHERE batch IS NULL;
CREATE INDEX IF NOT EXISTS updates_by_weights ON updates (weights_cid);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    at REAL NOT NULL
);
"""

# a refusal's message is kept for operators, not as a place to store a stranger's megabytes
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, kw_only=True)
class AcceptedUpdate:
    """One accepted update as journaled: who, trained on what, how much it counts, where it went."""

    agent_id: str
    base_cid: str
    trained_round: int
    counted_round: int
    update_cid: str
    weights_cid: str
    num_samples: int
    # num_samples x the staleness discount: how much this update counts in its batch
    weight: float
    staleness: int
    size: int
    tensors: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    base_metrics: dict[str, float] = field(default_factory=dict)
    kind: str = "local"
    accepted_at: float = 0.0
    batch: str | None = None


class IntakeJournal(DurableSqlite):
    """Bases, accepted updates and refusals; subclasses add their own tables to `SCHEMA`."""

    SCHEMA = INTAKE_SCHEMA
    SCHEMA_VERSION = 2

    # ---------------------------------------------------------- bases

    def record_base(self, model_cid: str, round_: int, *, now: float | None = None) -> None:
        self._write([self._base_statement(model_cid, round_, now)])

    @staticmethod
    def _base_statement(model_cid: str, round_: int, now: float | None = None) -> Statement:
        return (
            "INSERT OR IGNORE INTO bases (model_cid, round, seen_at) VALUES (?, ?, ?)",
            (model_cid, round_, time.time() if now is None else now),
        )

    def base_round(self, model_cid: str) -> int | None:
        rows = self._read("SELECT round FROM bases WHERE model_cid = ?", (model_cid,))
        return int(rows[0]["round"]) if rows else None

    # ---------------------------------------------------------- updates

    def find_update(self, agent_id: str, base_cid: str) -> AcceptedUpdate | None:
        rows = self._read("SELECT * FROM updates WHERE agent_id = ? AND base_cid = ?", (agent_id, base_cid))
        return _update_from_row(rows[0]) if rows else None

    def open_update_of(self, agent_id: str) -> AcceptedUpdate | None:
        """The agent's accepted update not yet closed into a batch, if any (at most one: intake keeps it so)."""
        rows = self._read("SELECT * FROM updates WHERE agent_id = ? AND batch IS NULL LIMIT 1", (agent_id,))
        return _update_from_row(rows[0]) if rows else None

    def record_update(self, update: AcceptedUpdate) -> bool:
        """Durably record an accepted update. False if (agent, base) was already recorded."""
        try:
            self._write(
                [
                    (
                        "INSERT INTO updates (agent_id, base_cid, trained_round, counted_round, update_cid, "
                        "weights_cid, num_samples, weight, staleness, size, tensors, metrics, base_metrics, kind, "
                        "accepted_at, batch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                        (
                            update.agent_id,
                            update.base_cid,
                            update.trained_round,
                            update.counted_round,
                            update.update_cid,
                            update.weights_cid,
                            update.num_samples,
                            update.weight,
                            update.staleness,
                            update.size,
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

    def update_holding(self, cid: str) -> AcceptedUpdate | None:
        """The accepted update whose manifest or weights are `cid`, if any (for audit reads: rare, unindexed)."""
        rows = self._read("SELECT * FROM updates WHERE update_cid = ? OR weights_cid = ? LIMIT 1", (cid, cid))
        return _update_from_row(rows[0]) if rows else None

    def open_updates(self) -> list[AcceptedUpdate]:
        """Accepted updates not yet closed into a batch, oldest first: what a restart folds back in."""
        rows = self._read("SELECT * FROM updates WHERE batch IS NULL ORDER BY accepted_at, agent_id")
        return [_update_from_row(row) for row in rows]

    def references_weights(self, weights_cid: str) -> bool:
        """Whether an accepted update's weights are `weights_cid` (so the blob must stay)."""
        return bool(self._read("SELECT 1 FROM updates WHERE weights_cid = ? LIMIT 1", (weights_cid,)))

    def iter_all_updates(self) -> Iterator[AcceptedUpdate]:
        for row in self._read("SELECT * FROM updates ORDER BY accepted_at, agent_id"):
            yield _update_from_row(row)

    @staticmethod
    def _batch_statements(batch: str, updates: Sequence[AcceptedUpdate]) -> list[Statement]:
        """Statements that close `updates` into `batch`, for a subclass's closing transaction."""
        return [
            ("UPDATE updates SET batch = ? WHERE agent_id = ? AND base_cid = ?", (batch, u.agent_id, u.base_cid))
            for u in updates
        ]

    # ---------------------------------------------------------- refusals

    def record_refusal(self, round_: int, agent_id: str, reason: str, message: str) -> None:
        self._write(
            [
                (
                    "INSERT INTO refusals (round, agent_id, reason, message, at) VALUES (?, ?, ?, ?, ?)",
                    (round_, agent_id, reason, message[:_MAX_MESSAGE_CHARS], time.time()),
                )
            ]
        )

    def refusal_counts(self, round_: int | None = None) -> dict[str, int]:
        """Refusals by reason: in one round, or (None) over the journal's life."""
        if round_ is None:
            rows = self._read("SELECT reason, COUNT(*) AS n FROM refusals GROUP BY reason")
        else:
            rows = self._read("SELECT reason, COUNT(*) AS n FROM refusals WHERE round = ? GROUP BY reason", (round_,))
        return {row["reason"]: int(row["n"]) for row in rows}

    def accepted_count(self) -> int:
        return int(self._read("SELECT COUNT(*) AS n FROM updates")[0]["n"])

    def accepted_bytes(self) -> int:
        """Weight bytes of every accepted update: the intake's ingress that counted."""
        return int(self._read("SELECT COALESCE(SUM(size), 0) AS n FROM updates")[0]["n"])


def _update_from_row(row: sqlite3.Row) -> AcceptedUpdate:
    return AcceptedUpdate(
        agent_id=row["agent_id"],
        base_cid=row["base_cid"],
        trained_round=int(row["trained_round"]),
        counted_round=int(row["counted_round"]),
        update_cid=row["update_cid"],
        weights_cid=row["weights_cid"],
        num_samples=int(row["num_samples"]),
        weight=float(row["weight"]),
        staleness=int(row["staleness"]),
        size=int(row["size"]),
        tensors=tuple(json.loads(row["tensors"])),
        metrics=json.loads(row["metrics"]),
        base_metrics=json.loads(row["base_metrics"]),
        kind=row["kind"],
        accepted_at=float(row["accepted_at"]),
        batch=row["batch"],
    )
