"""The one retry policy: full-jitter exponential backoff, bounded by attempts or a deadline, cancellable."""

from __future__ import annotations

import threading

import pytest

from proto.errors import ConfigError, FailedPrecondition, InvalidInput, Unavailable
from proto.retry import RetryPolicy, retry_call


def test_waits_double_up_to_the_cap_with_full_jitter() -> None:
    policy = RetryPolicy(base_s=0.5, max_s=3.0)
    assert [policy.ceiling(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    draws = iter([1.0, 0.5, 0.0, 0.25])
    delays: list[float] = []
    backoff = policy.backoff(rng=lambda: next(draws), sleep=delays.append)
    assert all(backoff.wait() for _ in range(4))
    assert delays == [0.5, 0.5, 0.0, 0.75]  # rng() x ceiling: anywhere in [0, ceiling]
    backoff.reset()
    assert backoff.retries == 0  # the ladder starts again from base_s


def test_attempts_bound_counts_calls_not_waits() -> None:
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        raise Unavailable("down")

    with pytest.raises(Unavailable):
        retry_call(failing, policy=RetryPolicy(attempts=3), sleep=lambda s: None)
    assert len(calls) == 3


def test_deadline_stops_before_a_wait_that_would_end_past_it() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    backoff = RetryPolicy(base_s=1.0, max_s=100.0, deadline_s=5.0).backoff(
        rng=lambda: 1.0, clock=lambda: now[0], sleep=sleep
    )
    waits = 0
    while backoff.wait():
        waits += 1
    assert waits == 2 and now[0] == 3.0  # 1 + 2; the next wait of 4 s would end at 7 s


def test_a_stop_event_cancels_a_wait_at_once() -> None:
    stop = threading.Event()
    backoff = RetryPolicy(base_s=60.0, max_s=60.0).backoff(stop=stop, rng=lambda: 1.0)
    threading.Timer(0.05, stop.set).start()
    assert backoff.wait() is False  # returned long before 60 s
    assert backoff.stopped


def test_retry_call_succeeds_after_retryable_failures_and_runs_the_hook() -> None:
    outcomes = iter([Unavailable("a"), Unavailable("b"), "ok"])
    hooks: list[str] = []

    def call() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    result = retry_call(call, policy=RetryPolicy(), sleep=lambda s: None, before_retry=lambda e: hooks.append(str(e)))
    assert result == "ok"
    assert hooks == ["a", "b"]


def test_retry_call_never_retries_what_the_predicate_refuses() -> None:
    calls: list[int] = []

    def call() -> None:
        calls.append(1)
        raise InvalidInput("bad")

    with pytest.raises(InvalidInput):
        retry_call(call, policy=RetryPolicy(attempts=5), sleep=lambda s: None)
    assert calls == [1]


def test_retry_call_raises_closed_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(FailedPrecondition) as info:
        retry_call(lambda: (_ for _ in ()).throw(Unavailable("down")), policy=RetryPolicy(), stop=stop)
    assert info.value.reason == "closed"


@pytest.mark.parametrize(
    "kwargs",
    [{"base_s": 0}, {"base_s": float("nan")}, {"max_s": 0.01, "base_s": 0.1}, {"attempts": 0}, {"deadline_s": 0}],
)
def test_bad_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)
