"""Following the coordinator's ring into this aggregator's `RingView`.

`RingFollower.run()` asks GetRing, then watches WatchRing and feeds every ring
to the view; when the stream breaks it asks GetRing again, with backoff, until
it can watch again. The coordinator's answers are authoritative, even with a
lower version than the view holds: a coordinator that lost its state restarts
its count. An empty ring places no one, so the view keeps its last useful one;
and while the coordinator is down the aggregator goes on placing agents with it.
A coordinator without WatchRing is polled instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from aggregator.ringview import RingView
from coordinator.client import CoordinatorClient, RingWatch
from coordinator.ring import Ring
from proto.errors import StrataError
from proto.retry import RetryPolicy

log = logging.getLogger("strata.aggregator.ring")


class RingFollower:
    def __init__(
        self,
        client: CoordinatorClient,
        *,
        view: RingView,
        federation: str,
        policy: RetryPolicy,
        watch_timeout_s: float,
        poll_s: Callable[[], float],
        stop: threading.Event,
    ) -> None:
        self._client = client
        self._view = view
        self._federation = federation
        self._policy = policy
        self._watch_timeout_s = watch_timeout_s
        self._poll_s = poll_s
        self._stop = stop
        self._lock = threading.Lock()
        self._watch: RingWatch | None = None

    def cancel(self) -> None:
        """End the open watch, if any (after `stop` is set, so that no new one opens)."""
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()

    def run(self) -> None:
        backoff = self._policy.backoff(stop=self._stop)
        watch_supported = True
        while not self._stop.is_set():
            try:
                # the stream opens only after this answer, and one stream never goes backwards
                self._adopt(self._client.ring(self._federation))
                backoff.reset()
                if not watch_supported:
                    self._stop.wait(self._poll_s())
                    continue
                watch_supported = self._watch_until_it_ends()
            except StrataError as err:
                if self._stop.is_set():
                    return
                delay = backoff.next_delay()
                log.info("ring_follow_interrupted", extra={"fields": {"error": str(err), "retry_in_s": round(delay, 2)}})
                self._stop.wait(delay)

    def _watch_until_it_ends(self) -> bool:
        """Adopt each ring the stream sends until its deadline; False if the coordinator cannot watch."""
        # known_version 0: the first message is the current ring, which confirms the stream is live
        watch = self._client.watch_ring(federation=self._federation, timeout_s=self._watch_timeout_s)
        with self._lock:
            if self._stop.is_set():
                watch.cancel()
                return True
            self._watch = watch
        try:
            for ring in watch:
                self._adopt(ring)
        except StrataError as err:
            if err.status == "UNIMPLEMENTED":
                return False
            if err.reason != "deadline_exceeded":  # the watch's own deadline: open a new one
                raise
        finally:
            with self._lock:
                self._watch = None
        return True

    def _adopt(self, ring: Ring) -> None:
        if not len(ring):
            return
        if self._view.update(ring, authoritative=True):
            log.info(
                "ring_adopted",
                extra={"fields": {"ring_version": ring.version, "members": [m.id for m in ring.members]}},
            )
