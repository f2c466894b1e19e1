"""The relay's journal: what it accepted from devices and what it owes upstream, durable across kill -9.

SQLite in WAL mode with synchronous=FULL, like the aggregator's journal: a device
update is acknowledged only after its blob and manifest are stored and
`record_update` returned, so a restarted relay rebuilds its open window from here.

Tables:
- `bases`    every upstream base the relay served to devices, with its upstream round;
- `updates`  accepted device updates, one per (device, base); `window_cid` is the combined
             update they went into, NULL while they wait in the open window;
- `refusals` refused device submissions with their reason codes;
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

from storage.durable import DurableSqlite

PENDING, FORWARDED, DROPPED = "pending", "forwarded", "dropped"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bases (
    model_cid TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    agent_id TEXT NOT NULL,
    base_cid TEXT NOT NULL,
    round INTEGER NOT NULL,
    update_cid TEXT NOT NULL,
    weights_cid TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    size INTEGER NOT NULL,
    tensors TEXT NOT NULL,
    metrics TEXT NOT NULL,
    base_metrics TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    window_cid TEXT,
    PRIMARY KEY (agent_id, base_cid)
);
CREATE INDEX IF NOT EXISTS updates_by_window ON updates (window_cid);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    at REAL NOT NULL
);
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
class DeviceUpdate:
    agent_id: str
    base_cid: str
    round: int
    update_cid: str
    weights_cid: str
    num_samples: int
    size: int
    tensors: tuple[str, ...]
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    accepted_at: float
    window_cid: str | None = None


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


class RelayJournal(DurableSqlite):
    """A durable, thread-safe relay journal in one SQLite file."""

    SCHEMA = _SCHEMA

    # ---------------------------------------------------------- bases

    def record_base(self, model_cid: str, round_: int, *, now: float | None = None) -> None:
        self._write(
            [("INSERT OR IGNORE INTO bases (model_cid, round, seen_at) VALUES (?, ?, ?)",
              (model_cid, round_, time.time() if now is None else now))]
        )

    def base_round(self, model_cid: str) -> int | None:
        rows = self._read("SELECT round FROM bases WHERE model_cid = ?", (model_cid,))
        return int(rows[0]["round"]) if rows else None

    def latest_base(self) -> tuple[str, int] | None:
        rows = self._read("SELECT model_cid, round FROM bases ORDER BY seen_at DESC, round DESC LIMIT 1")
        return (rows[0]["model_cid"], int(rows[0]["round"])) if rows else None

    # ---------------------------------------------------------- device updates

    def find_update(self, agent_id: str, base_cid: str) -> DeviceUpdate | None:
        rows = self._read("SELECT * FROM updates WHERE agent_id = ? AND base_cid = ?", (agent_id, base_cid))
        return _update_from_row(rows[0]) if rows else None

    def record_update(self, update: DeviceUpdate) -> bool:
        """Durably record an accepted device update. False if (device, base) was already recorded."""
        try:
            self._write(
                [(
                    "INSERT INTO updates (agent_id, base_cid, round, update_cid, weights_cid, num_samples, size, "
                    "tensors, metrics, base_metrics, accepted_at, window_cid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    (
                        update.agent_id, update.base_cid, update.round, update.update_cid, update.weights_cid,
                        update.num_samples, update.size, json.dumps(list(update.tensors)),
                        json.dumps(update.metrics, sort_keys=True), json.dumps(update.base_metrics, sort_keys=True),
                        update.accepted_at,
                    ),
                )]
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def open_updates(self) -> list[DeviceUpdate]:
        """Device updates waiting in the open window, oldest first."""
        rows = self._read("SELECT * FROM updates WHERE window_cid IS NULL ORDER BY accepted_at, agent_id")
        return [_update_from_row(row) for row in rows]

    def window_updates(self, window_cid: str) -> list[DeviceUpdate]:
        rows = self._read("SELECT * FROM updates WHERE window_cid = ? ORDER BY accepted_at, agent_id", (window_cid,))
        return [_update_from_row(row) for row in rows]

    def held(self) -> tuple[int, int]:
        """(count, bytes) of device updates not yet forwarded: in the open window or a pending one."""
        rows = self._read(
            "SELECT COUNT(*) AS n, COALESCE(SUM(u.size), 0) AS b FROM updates u LEFT JOIN windows w "
            "ON u.window_cid = w.update_cid WHERE u.window_cid IS NULL OR w.status = ?",
            (PENDING,),
        )
        return int(rows[0]["n"]), int(rows[0]["b"])

    # ---------------------------------------------------------- refusals

    def record_refusal(self, agent_id: str, reason: str, message: str) -> None:
        self._write(
            [("INSERT INTO refusals (agent_id, reason, message, at) VALUES (?, ?, ?, ?)",
              (agent_id, reason, message[:500], time.time()))]
        )

    def refusal_counts(self) -> dict[str, int]:
        rows = self._read("SELECT reason, COUNT(*) AS n FROM refusals GROUP BY reason")
        return {row["reason"]: int(row["n"]) for row in rows}

    # ---------------------------------------------------------- windows (the outbox)

    def close_window(self, record: WindowRecord, device_keys: Sequence[tuple[str, str]]) -> None:
        """Record a combined update as pending and move its device updates into it, in one transaction."""
        statements: list[tuple[str, tuple[Any, ...]]] = [(
            "INSERT INTO windows (update_cid, round, base_cid, devices, num_samples, tensors, metrics, base_metrics, "
            "size, trigger, status, reason, upstream_cid, bytes_saved, created_at, finished_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', '', ?, ?, NULL)",
            (
                record.update_cid, record.round, record.base_cid, record.devices, record.num_samples,
                json.dumps(list(record.tensors)), json.dumps(record.metrics, sort_keys=True),
                json.dumps(record.base_metrics, sort_keys=True), record.size, record.trigger, PENDING,
                record.bytes_saved, record.created_at,
            ),
        )]
        statements += [
            ("UPDATE updates SET window_cid = ? WHERE agent_id = ? AND base_cid = ?", (record.update_cid, a, b))
            for a, b in device_keys
        ]
        self._write(statements)

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


def _update_from_row(row: sqlite3.Row) -> DeviceUpdate:
    return DeviceUpdate(
        agent_id=row["agent_id"],
        base_cid=row["base_cid"],
        round=int(row["round"]),
        update_cid=row["update_cid"],
        weights_cid=row["weights_cid"],
        num_samples=int(row["num_samples"]),
        size=int(row["size"]),
        tensors=tuple(json.loads(row["tensors"])),
        metrics=json.loads(row["metrics"]),
        base_metrics=json.loads(row["base_metrics"]),
        accepted_at=float(row["accepted_at"]),
        window_cid=row["window_cid"],
    )


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
