"""The one retry policy every Strata client loop uses: exponential backoff with full jitter.

    policy = RetryPolicy(base_s=0.5, max_s=10.0)
    backoff = policy.backoff(stop=closed_event)
    while not backoff.wait():          # False once stopped or past the deadline
        try:
            return do_call()
        except Unavailable:
            continue

or, for one call retried until it succeeds or fails for good:

    reply = retry_call(lambda: stub.Join(request, timeout=5), policy=policy, retryable=is_retryable)

The n-th wait is `rng() * min(max_s, base_s * 2**n)` (full jitter, as in AWS's
"Exponential Backoff and Jitter"), so a fleet that lost its aggregator at the
same moment does not come back in lockstep. A policy may bound the attempts, the
total time (deadline-aware: a wait that would end past the deadline is not
started), or both; a `threading.Event` cancels any wait at once.

Nothing here imports gRPC: `proto.wire.is_retryable` is the predicate for RPC errors.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from proto.errors import ConfigError, FailedPrecondition, Unavailable

log = logging.getLogger("strata.retry")

T = TypeVar("T")

# 2**30 x base_s is beyond any sane max_s; capping the exponent keeps the float finite
_MAX_EXPONENT = 30


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long to wait between attempts, and when to give up."""

    base_s: float = 0.1
    max_s: float = 5.0
    # None: no bound on the number of attempts (the deadline or a stop event ends it)
    attempts: int | None = None
    # seconds from the first attempt after which no new wait starts; None: no deadline
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.base_s > 0 and math.isfinite(self.base_s)):
            raise ConfigError(f"retry base_s must be a positive number, got {self.base_s!r}", reason="bad_retry_policy")
        if not (self.max_s >= self.base_s and math.isfinite(self.max_s)):
            raise ConfigError(f"retry max_s must be >= base_s, got {self.max_s!r}", reason="bad_retry_policy")
        if self.attempts is not None and self.attempts < 1:
            raise ConfigError(f"retry attempts must be >= 1, got {self.attempts!r}", reason="bad_retry_policy")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ConfigError(f"retry deadline_s must be > 0, got {self.deadline_s!r}", reason="bad_retry_policy")

    def ceiling(self, retry: int) -> float:
        """The largest wait before retry number `retry` (0 = the first retry)."""
        return min(self.max_s, self.base_s * 2 ** min(max(retry, 0), _MAX_EXPONENT))

    def backoff(
        self,
        *,
        stop: threading.Event | None = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> Backoff:
        return Backoff(self, stop=stop, rng=rng, clock=clock, sleep=sleep)


class Backoff:
    """One run of a `RetryPolicy`: counts retries, draws jittered waits, honours deadline and stop.

    `wait()` sleeps before the next attempt and says whether to make it; `reset()`
    after a success starts the ladder again from `base_s`.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        stop: threading.Event | None = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.policy = policy
        self._stop = stop or threading.Event()
        self._rng = rng
        self._clock = clock
        # tests pass a fake sleep (and clock); real waits are on the stop event, so stop() cuts them short
        self._sleep = sleep
        self._started_at = clock()
        self.retries = 0

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def next_delay(self) -> float:
        """The jittered wait before the next retry, and count it."""
        delay = self._rng() * self.policy.ceiling(self.retries)
        self.retries += 1
        return delay

    def exhausted(self, delay: float = 0.0) -> bool:
        """True when another attempt after `delay` seconds is past the policy's bounds."""
        attempts = self.policy.attempts
        if attempts is not None and self.retries + 1 >= attempts:
            return True
        deadline = self.policy.deadline_s
        return deadline is not None and self._clock() + delay - self._started_at >= deadline

    def wait(self) -> bool:
        """Sleep the next jittered delay; False (without sleeping) when the policy is exhausted,
        and False when stopped, during the wait or before it."""
        if self._stop.is_set():
            return False
        delay = self._rng() * self.policy.ceiling(self.retries)
        if self.exhausted(delay):
            return False
        self.retries += 1
        if self._sleep is not None:
            self._sleep(delay)
            return not self._stop.is_set()
        return not self._stop.wait(delay)

    def reset(self) -> None:
        self.retries = 0
        self._started_at = self._clock()


def retry_call(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool] = lambda e: isinstance(e, Unavailable),
    stop: threading.Event | None = None,
    before_retry: Callable[[BaseException], None] | None = None,
    rng: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call `fn` until it succeeds, retrying only failures `retryable` accepts.

    Re-raises the last error unchanged when it is not retryable or the policy is
    exhausted; raises FailedPrecondition("stopped") when `stop` is set while waiting.
    `before_retry(error)` runs before each new attempt (e.g. to re-join elsewhere).
    For a streaming call, `fn` must consume the stream so its errors surface inside it.
    """
    backoff = policy.backoff(stop=stop, rng=rng, clock=clock, sleep=sleep)
    while True:
        try:
            return fn()
        except Exception as error:
            if not retryable(error):
                raise
            if backoff.stopped:
                raise FailedPrecondition("stopped while retrying", reason="closed") from error
            if not backoff.wait():
                if backoff.stopped:
                    raise FailedPrecondition("stopped while retrying", reason="closed") from error
                raise
            log.debug("retrying", extra={"fields": {"retry": backoff.retries, "error": str(error)}})
            if before_retry is not None:
                before_retry(error)
