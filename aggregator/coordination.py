"""The aggregator's link to the coordinator: three background jobs over one `CoordinatorClient`.

- `lease.LeaseKeeper`: register, heartbeat, report agents;
- `ring_follower.RingFollower`: keep the `RingView` on the coordinator's ring;
- `announcements.Announcer`: deliver model manifests from a durable outbox, in batches.

`start()` never blocks and never fails because the coordinator is away; each
job retries with `proto.retry` backoff. `stop()` ends them within a bound and
leaves undelivered announcements in the outbox for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aggregator.announcements import OUTBOX_FILE, Announcer, Outbox
from aggregator.lease import LeaseKeeper
from aggregator.ring_follower import RingFollower
from aggregator.ringview import RingView
from coordinator.client import AggregatorInfo, CoordinatorClient, Lease
from proto.errors import InvalidInput
from proto.retry import RetryPolicy

__all__ = ["CoordinatorLink"]

log = logging.getLogger("strata.aggregator.coordination")

# after an unexpected error a job restarts this much later
_RESTART_S = 1.0


class CoordinatorLink:
    """Keeps this aggregator registered, its ring view current and the coordinator's index fed.

    `ring_view` follows the ring of the first federation in `info` (empty: the whole ring);
    `ring_views`, when given, maps each federation to the view that follows that federation's ring
    instead (an aggregator serving several). The link owns `client` and closes it on `stop()`. `state_dir` holds the
    announcement outbox (None: in memory). See `LeaseKeeper` for `status_fn`, `agents_fn`
    and `on_lease`.
    """

    def __init__(
        self,
        client: CoordinatorClient,
        *,
        info: AggregatorInfo,
        ring_view: RingView,
        ring_views: Mapping[str, RingView] | None = None,
        status_fn: Callable[[], Mapping[str, Any]],
        agents_fn: Callable[[], Iterable[Any]] | None = None,
        state_dir: str | Path | None = None,
        agents_interval_s: float = 10.0,
        retry_max_s: float = 5.0,
        watch_timeout_s: float = 300.0,
        on_lease: Callable[[Lease], None] | None = None,
    ) -> None:
        self._client = client
        self.ring_view = ring_view
        self._stop = threading.Event()
        policy = RetryPolicy(base_s=0.1, max_s=retry_max_s)
        self._lease = LeaseKeeper(
            client,
            info=info,
            status_fn=status_fn,
            agents_fn=agents_fn,
            agents_interval_s=agents_interval_s,
            policy=policy,
            stop=self._stop,
            on_lease=on_lease,
        )
        self.registered = self._lease.registered
        views = dict(ring_views) if ring_views else {info.federations[0] if info.federations else "": ring_view}
        # one follower per federation: membership is per federation on the coordinator
        self._followers = [
            RingFollower(
                client,
                view=view,
                federation=federation,
                policy=policy,
                watch_timeout_s=watch_timeout_s,
                poll_s=lambda: self._lease.heartbeat_interval_s,
                stop=self._stop,
            )
            for federation, view in views.items()
        ]
        self._outbox = Outbox(None if state_dir is None else Path(state_dir) / OUTBOX_FILE)
        self._announcer = Announcer(client, outbox=self._outbox, policy=policy, stop=self._stop)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._state = "new"

    def start(self) -> CoordinatorLink:
        with self._lock:
            if self._state == "stopped":
                raise InvalidInput("a stopped CoordinatorLink cannot be restarted", reason="link_stopped")
            if self._state == "started":
                return self
            self._state = "started"
            jobs = [("lease", self._lease.run), *(("ring", f.run) for f in self._followers), ("announce", self._announcer.run)]
            for name, job in jobs:
                thread = threading.Thread(target=self._run, args=(job,), name=f"coordinator-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        log.info(
            "coordinator_link_started",
            extra={"fields": {"coordinator": self._client.address, "aggregator": self._lease.info.id}},
        )
        return self

    def _run(self, job: Callable[[], None]) -> None:
        """Run `job` until stop(), restarting it after an unexpected error."""
        while not self._stop.is_set():
            try:
                job()
            except Exception:  # noqa: BLE001 - after stop(), a closed channel or outbox is expected
                if self._stop.is_set():
                    return
                log.exception("coordinator_link_job_failed", extra={"fields": {"job": job.__qualname__}})
                self._stop.wait(_RESTART_S)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop every job within about `timeout_s`; undelivered announcements stay in the outbox."""
        with self._lock:
            if self._state == "stopped":
                return
            was_started = self._state == "started"
            self._state = "stopped"
            self._stop.set()
        self._announcer.wake()
        for follower in self._followers:
            follower.cancel()
        # cancels calls in flight; an announcement cut off stays in the outbox
        self._client.close()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._outbox.close()
        if was_started:
            log.info("coordinator_link_stopped", extra={"fields": {"coordinator": self._client.address}})

    def __enter__(self) -> CoordinatorLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ announcements

    def announce(self, manifest_bytes: bytes, notes: Mapping[str, str] | None = None) -> None:
        """Queue a model manifest for the coordinator's index; returns at once."""
        self._announcer.announce(manifest_bytes, notes)

    def pending_announcements(self) -> int:
        return self._announcer.pending()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued announcement is delivered (or refused); False on timeout."""
        return self._announcer.flush(timeout_s)
