"""Model announcements to the coordinator's index: a durable outbox and the sender that drains it.

`Announcer.announce()` appends to the outbox (SQLite under the aggregator's
state dir) and returns at once; `run()` delivers the oldest entry first and
deletes it once the coordinator indexed it, so after an outage of either side
the index catches up, in order. An entry the coordinator refuses (a bad
manifest or signature) is dropped: resending the same bytes cannot help.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.client import CoordinatorClient
from proto.errors import StrataError
from proto.retry import RetryPolicy
from proto.wire import is_retryable
from storage.durable import DurableSqlite

log = logging.getLogger("strata.aggregator.announcements")

OUTBOX_FILE = "coordinator-backlog.db"
# how often an idle sender looks at the outbox without being woken
_IDLE_S = 1.0


@dataclass(frozen=True)
class Announcement:
    seq: int
    manifest: bytes
    notes: dict[str, str]


class Outbox(DurableSqlite):
    """Announcements not yet delivered, oldest first; `path=None` keeps them in memory."""

    SCHEMA = """
CREATE TABLE IF NOT EXISTS backlog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest BLOB NOT NULL,
    notes TEXT NOT NULL,
    enqueued_at REAL NOT NULL
);
"""
    SCHEMA_VERSION = 1

    def push(self, manifest: bytes, notes: Mapping[str, str]) -> None:
        self._write(
            [
                (
                    "INSERT INTO backlog (manifest, notes, enqueued_at) VALUES (?, ?, ?)",
                    (bytes(manifest), json.dumps({str(k): str(v) for k, v in notes.items()}), time.time()),
                )
            ]
        )

    def oldest(self) -> Announcement | None:
        rows = self._read("SELECT seq, manifest, notes FROM backlog ORDER BY seq LIMIT 1")
        if not rows:
            return None
        return Announcement(seq=rows[0]["seq"], manifest=bytes(rows[0]["manifest"]), notes=json.loads(rows[0]["notes"]))

    def remove(self, seq: int) -> None:
        self._write([("DELETE FROM backlog WHERE seq = ?", (seq,))])

    def __len__(self) -> int:
        return int(self._read("SELECT COUNT(*) AS n FROM backlog")[0]["n"])


class Announcer:
    """Delivers the outbox to the coordinator from one thread (`run`) until `stop` is set."""

    def __init__(
        self,
        client: CoordinatorClient,
        *,
        outbox: Outbox,
        policy: RetryPolicy,
        stop: threading.Event,
    ) -> None:
        self._client = client
        self._outbox = outbox
        self._policy = policy
        self._stop = stop
        self._wake = threading.Event()
        self._delivered = threading.Condition()

    def announce(self, manifest: bytes, notes: Mapping[str, str] | None = None) -> None:
        """Queue a model manifest for the coordinator's index; returns at once."""
        self._outbox.push(manifest, notes or {})
        self._wake.set()

    def pending(self) -> int:
        return len(self._outbox)

    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued announcement is delivered (or refused); False on timeout or stop."""
        deadline = time.monotonic() + timeout_s
        with self._delivered:
            while len(self._outbox):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._delivered.wait(min(remaining, 0.1))
        return True

    def run(self) -> None:
        backoff = self._policy.backoff(stop=self._stop)
        while not self._stop.is_set():
            item = self._outbox.oldest()
            if item is None:
                self._wake.wait(_IDLE_S)
                self._wake.clear()
                continue
            try:
                cid = self._client.announce(item.manifest, item.notes)
                log.debug("model_announced", extra={"fields": {"model": cid}})
            except StrataError as err:
                if self._stop.is_set():
                    return
                if is_retryable(err):
                    backoff.wait()
                    continue
                log.warning("announcement_refused", extra={"fields": {"reason": err.reason, "error": str(err)}})
            backoff.reset()
            self._outbox.remove(item.seq)
            with self._delivered:
                self._delivered.notify_all()
