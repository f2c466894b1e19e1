"""Model announcements to the coordinator's index: a durable outbox and the sender that drains it.

`Announcer.announce()` appends to the outbox (SQLite under the aggregator's
state dir) and returns at once. `run()` takes the oldest entries (up to
BATCH_SIZE of them and BATCH_BYTES of manifests), sends them in one
AnnounceModels call, and deletes exactly those the coordinator answered for:
indexed, or refused for good (a bad manifest or signature: resending the same
bytes cannot help; the refusal is logged). A call that fails for a while
(coordinator away, deadline) keeps the whole batch for the next attempt, so
after an outage of either side the index catches up, in order.

A batch the coordinator refuses as a whole (an older coordinator without
AnnounceModels, a batch over its limits) is delivered one by one with
AnnounceModel instead, so each manifest still gets its own verdict.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coordinator.client import CoordinatorClient, IndexResult
from proto.errors import StrataError
from proto.retry import RetryPolicy
from proto.wire import MAX_MESSAGE_BYTES, is_retryable
from storage.durable import DurableSqlite

log = logging.getLogger("strata.aggregator.announcements")

OUTBOX_FILE = "coordinator-backlog.db"
# the most announcements one AnnounceModels call carries (the coordinator takes up to 1000)
BATCH_SIZE = 500
# ... and the most manifest bytes, well under the message limit (a cluster model names every
# update it folded, ~50 bytes each); a single larger manifest still goes, alone
BATCH_BYTES = MAX_MESSAGE_BYTES // 2
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
    # the index can be caught up again; a fsync per accepted update on the acknowledgement's path cannot be paid
    SYNCHRONOUS = "NORMAL"

    def push(self, manifest: bytes, notes: Mapping[str, str]) -> None:
        self._write(
            [
                (
                    "INSERT INTO backlog (manifest, notes, enqueued_at) VALUES (?, ?, ?)",
                    (bytes(manifest), json.dumps({str(k): str(v) for k, v in notes.items()}), time.time()),
                )
            ]
        )

    def oldest(self, limit: int = 1, *, max_bytes: int | None = None) -> list[Announcement]:
        """Up to `limit` of the oldest announcements, oldest first, cut where their manifests
        would exceed `max_bytes` (the first one is always included)."""
        sizes = self._read("SELECT seq, length(manifest) AS size FROM backlog ORDER BY seq LIMIT ?", (limit,))
        if not sizes:
            return []
        last, total = sizes[0]["seq"], 0
        for index, row in enumerate(sizes):
            total += row["size"]
            if index and max_bytes is not None and total > max_bytes:
                break
            last = row["seq"]
        rows = self._read(
            "SELECT seq, manifest, notes FROM backlog WHERE seq BETWEEN ? AND ? ORDER BY seq", (sizes[0]["seq"], last)
        )
        return [Announcement(seq=r["seq"], manifest=bytes(r["manifest"]), notes=json.loads(r["notes"])) for r in rows]

    def remove(self, seqs: Iterable[int]) -> None:
        """Delete these announcements, all in one transaction."""
        self._write([("DELETE FROM backlog WHERE seq IN (SELECT value FROM json_each(?))", (json.dumps(list(seqs)),))])

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
        batch_size: int = BATCH_SIZE,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self._client = client
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
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
            batch = self._outbox.oldest(self._batch_size, max_bytes=self._batch_bytes)
            if not batch:
                self._wake.wait(_IDLE_S)
                self._wake.clear()
                continue
            try:
                results = self._deliver(batch)
            except StrataError:
                if self._stop.is_set():
                    return
                backoff.wait()  # retryable: the batch stays, oldest first
                continue
            backoff.reset()
            refused = [r for r in results if r.refused]
            for result in refused:
                log.warning("announcement_refused", extra={"fields": {"reason": result.reason, "error": result.message}})
            log.debug("models_announced", extra={"fields": {"indexed": len(results) - len(refused), "refused": len(refused)}})
            self._outbox.remove(item.seq for item in batch[: len(results)])
            with self._delivered:
                self._delivered.notify_all()

    def _deliver(self, batch: list[Announcement]) -> list[IndexResult]:
        """The coordinator's verdicts on the first len(result) items of `batch`: all of them, unless
        a retryable failure cut the one-by-one fallback short. Raises when there is no verdict at
        all: a retryable failure, or any failure once stopping (a closed client refuses nothing)."""
        try:
            return self._client.announce_many([(item.manifest, item.notes) for item in batch])
        except StrataError as err:
            if is_retryable(err) or self._stop.is_set():
                raise
            log.warning(
                "announce_batch_refused",
                extra={"fields": {"reason": err.reason, "error": str(err), "size": len(batch), "fallback": "one_by_one"}},
            )
        results: list[IndexResult] = []
        for item in batch:
            try:
                results.append(IndexResult(cid=self._client.announce(item.manifest, item.notes)))
            except StrataError as err:
                if is_retryable(err) or self._stop.is_set():
                    if results:
                        return results
                    raise
                results.append(IndexResult(reason=err.reason, message=str(err)))
        return results
