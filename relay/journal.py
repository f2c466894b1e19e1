"""The relay's journal: what it accepted from devices and what it owes upstream, durable across kill -9.

SQLite in WAL mode with synchronous=FULL, like the aggregator's journal: a device
update is acknowledged only after its blob and manifest are stored and
`record_update` returned, so a restarted relay rebuilds its open window from here.

Tables: the intake's `bases` (every upstream base served to devices, with its
upstream round), `updates` (accepted device updates; `batch` is the combined
update they went into, NULL while they wait in the open window) and `refusals`
(intake.journal), plus
- `windows`  combined updates (the outbox and the relay's history): status pending,
             forwarded or dropped, with the reason a dropped one was dropped.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from intake.journal import INTAKE_SCHEMA, AcceptedUpdate, IntakeJournal

PENDING, FORWARDED, DROPPED = "pending", "forwarded", "dropped"

_WINDOWS_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    update_cid TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    base_cid TEXT NOT NULL,
    devices INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    tensors TEXT NOT NULL,
    metrics TEXT NOT NULL,
    base_metrics TEXT NOT NULL,
    size INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    upstream_cid TEXT NOT NULL DEFAULT '',
    bytes_saved INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    finished_at REAL
);
"""


@dataclass(frozen=True, kw_only=True)
class WindowRecord:
    """One closed window: the combined update the relay owes (or owed) upstream."""

    update_cid: str
    round: int
    base_cid: str
    devices: int
    num_samples: int
    tensors: tuple[str, ...]
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    size: int
    trigger: str
    status: str = PENDING
    reason: str = ""
    upstream_cid: str = ""
    bytes_saved: int = 0
    created_at: float = 0.0
    finished_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        out["tensors"] = list(self.tensors)
        return out


class RelayJournal(IntakeJournal):
    """A durable, thread-safe relay journal in one SQLite file: the intake's tables plus the windows."""

    SCHEMA = INTAKE_SCHEMA + _WINDOWS_SCHEMA

    def latest_base(self) -> tuple[str, int] | None:
        rows = self._read("SELECT model_cid, round FROM bases ORDER BY seen_at DESC, round DESC LIMIT 1")
        return (rows[0]["model_cid"], int(rows[0]["round"])) if rows else None

    def held(self) -> tuple[int, int]:
        """(count, bytes) of device updates not yet forwarded: in the open window or a pending one."""
        rows = self._read(
            "SELECT COUNT(*) AS n, COALESCE(SUM(u.size), 0) AS b FROM updates u LEFT JOIN windows w "
            "ON u.batch = w.update_cid WHERE u.batch IS NULL OR w.status = ?",
            (PENDING,),
        )
        return int(rows[0]["n"]), int(rows[0]["b"])

    # ---------------------------------------------------------- windows (the outbox)

    def close_window(self, record: WindowRecord, updates: Sequence[AcceptedUpdate]) -> None:
        """Record a combined update as pending and move its device updates into it, in one transaction."""
        self._write(
            [
                (
                    "INSERT INTO windows (update_cid, round, base_cid, devices, num_samples, tensors, metrics, "
                    "base_metrics, size, trigger, status, reason, upstream_cid, bytes_saved, created_at, finished_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', '', ?, ?, NULL)",
                    (
                        record.update_cid, record.round, record.base_cid, record.devices, record.num_samples,
                        json.dumps(list(record.tensors)), json.dumps(record.metrics, sort_keys=True),
                        json.dumps(record.base_metrics, sort_keys=True), record.size, record.trigger, PENDING,
                        record.bytes_saved, record.created_at,
                    ),
                ),
                *self._batch_statements(record.update_cid, updates),
            ]
        )

    def has_window_for(self, base_cid: str) -> bool:
        return bool(self._read("SELECT 1 FROM windows WHERE base_cid = ? LIMIT 1", (base_cid,)))

    def pending_windows(self) -> list[WindowRecord]:
        rows = self._read("SELECT * FROM windows WHERE status = ? ORDER BY created_at", (PENDING,))
        return [_window_from_row(row) for row in rows]

    def finish_window(self, update_cid: str, *, status: str, reason: str = "", upstream_cid: str = "") -> None:
        assert status in (FORWARDED, DROPPED)
        self._write(
            [("UPDATE windows SET status = ?, reason = ?, upstream_cid = ?, finished_at = ? WHERE update_cid = ?",
              (status, reason, upstream_cid, time.time(), update_cid))]
        )

    def history(self) -> list[WindowRecord]:
        return [_window_from_row(row) for row in self._read("SELECT * FROM windows ORDER BY created_at")]


def _window_from_row(row: sqlite3.Row) -> WindowRecord:
    return WindowRecord(
        update_cid=row["update_cid"],
        round=int(row["round"]),
        base_cid=row["base_cid"],
        devices=int(row["devices"]),
        num_samples=int(row["num_samples"]),
        tensors=tuple(json.loads(row["tensors"])),
        metrics=json.loads(row["metrics"]),
        base_metrics=json.loads(row["base_metrics"]),
        size=int(row["size"]),
        trigger=row["trigger"],
        status=row["status"],
        reason=row["reason"],
        upstream_cid=row["upstream_cid"],
        bytes_saved=int(row["bytes_saved"]),
        created_at=float(row["created_at"]),
        finished_at=row["finished_at"],
    )
