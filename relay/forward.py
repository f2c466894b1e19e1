"""Store-and-forward: send each closed window's combined update upstream, holding it while the uplink is down.

Pending combined updates live in the relay journal (and their blobs in the relay's
store), so they survive kill -9. The forwarder sends them oldest first. An
unreachable upstream is retried with backoff; an update whose base fell more than
`max_staleness` rounds behind the upstream round while it waited is dropped with
reason "stale_after_outage" (also when upstream itself refuses it as stale); an
update refused "already_counted" (upstream's open round still counts the previous
window) waits and is sent again; any other refusal drops it as
"upstream_refused:<reason>". Drops are recorded in the
journal (the relay's history) and logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

from proto.errors import Refusal, StrataError
from proto.retry import RetryPolicy
from relay.core import STALE_AFTER_OUTAGE
from relay.journal import DROPPED, FORWARDED, RelayJournal, WindowRecord
from storage.manifest import Manifest
from storage.models import load_model
from storage.store import ContentStore

log = logging.getLogger("strata.relay.forward")

# the longest wait between attempts, in multiples of retry_s
_MAX_RETRY_FACTOR = 8


class Upstream(Protocol):
    """What the forwarder needs from the relay's upstream client (agent.client.Client fits)."""

    def upstream_round(self) -> int | None:
        """The home aggregator's current round as last heard, None before joining."""
        ...

    def submit_signed(
        self, manifest: Manifest, blob: bytes, *, tensors: Sequence[str] = (), base_metrics: Mapping[str, float] | None = None
    ) -> object: ...


class Forwarder:
    def __init__(
        self,
        *,
        journal: RelayJournal,
        store: ContentStore,
        upstream: Upstream,
        max_staleness: int,
        retry_s: float,
    ) -> None:
        self._journal = journal
        self._store = store
        self._upstream = upstream
        self._max_staleness = max_staleness
        self._retry = RetryPolicy(base_s=retry_s, max_s=retry_s * _MAX_RETRY_FACTOR)
        self._wake = threading.Event()

    def wake(self) -> None:
        """A window closed: try to forward now rather than at the next poll."""
        self._wake.set()

    def run(self, stopping: threading.Event, poll_s: float = 1.0) -> None:
        # waits are on the wake event (a closed window ends them early), so only the delays come from the backoff
        backoff = self._retry.backoff(stop=stopping)
        while not stopping.is_set():
            self._wake.clear()
            try:
                delivered_all = self.forward_pending()
            except Exception:  # e.g. the upstream channel closed under us at shutdown: retry, never die
                if stopping.is_set():
                    return
                log.exception("forward_crashed")
                delivered_all = False
            if delivered_all:
                backoff.reset()
                wait = poll_s
            else:
                wait = backoff.next_delay()
            self._wake.wait(wait)

    def forward_pending(self) -> bool:
        """Try every pending combined update once, oldest first. False if upstream was unreachable."""
        for record in self._journal.pending_windows():
            if not self._forward(record):
                return False
        return True

    def _forward(self, record: WindowRecord) -> bool:
        upstream_round = self._upstream.upstream_round()
        if upstream_round is None:
            return False
        if upstream_round - record.round > self._max_staleness:
            self._drop(record, STALE_AFTER_OUTAGE, f"upstream is at round {upstream_round}")
            return True
        manifest, blob = load_model(self._store, record.update_cid)
        try:
            receipt = self._upstream.submit_signed(
                manifest, blob, tensors=record.tensors, base_metrics=record.base_metrics
            )
        except StrataError as exc:
            # already_counted: upstream's open round still counts our previous (late) window; it closes
            # soon, and this window then counts in the next round instead of being lost
            if exc.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED") or exc.reason in (
                "not_joined",
                "closed",
                Refusal.ALREADY_COUNTED,
            ):
                log.info("forward_deferred", extra={"fields": {"update": record.update_cid, "error": str(exc)}})
                return False
            if exc.status != "INVALID_ARGUMENT":
                log.warning("forward_failed", extra={"fields": {"update": record.update_cid, "error": str(exc)}})
                return False
            reason = STALE_AFTER_OUTAGE if exc.reason == Refusal.STALE else f"upstream_refused:{exc.reason}"
            self._drop(record, reason, exc.message)
            return True
        upstream_cid = str(getattr(receipt, "update_cid", ""))
        self._journal.finish_window(record.update_cid, status=FORWARDED, upstream_cid=upstream_cid)
        log.info(
            "update_forwarded",
            extra={
                "fields": {
                    "update": record.update_cid,
                    "round": record.round,
                    "devices": record.devices,
                    "num_samples": record.num_samples,
                    "upstream_update": upstream_cid,
                    "duplicate": bool(getattr(receipt, "duplicate", False)),
                }
            },
        )
        return True

    def _drop(self, record: WindowRecord, reason: str, detail: str) -> None:
        self._journal.finish_window(record.update_cid, status=DROPPED, reason=reason)
        log.warning(
            "update_dropped",
            extra={
                "fields": {
                    "update": record.update_cid,
                    "round": record.round,
                    "devices": record.devices,
                    "reason": reason,
                    "detail": detail,
                }
            },
        )
