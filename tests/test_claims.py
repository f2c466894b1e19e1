"""Sample counts are claims: the round-relative rescaling's known answers (pure functions)."""

from __future__ import annotations

import pytest

from intake.claims import credit_claims, low_median


def test_the_low_median_cannot_be_raised_by_fewer_than_half_of_the_values() -> None:
    assert low_median([100, 10**9]) == 100  # the mean of the middle two would be 5e8
    assert low_median([3, 1, 2]) == 2
    assert low_median([5, 1, 4, 2]) == 2
    assert low_median([]) == 0


def test_an_inflated_claim_is_lowered_to_ratio_times_the_median_and_the_others_stand() -> None:
    claims = credit_claims([100, 120, 90, 100_000], ratio=10)
    assert claims.credited == (100, 120, 90, 1000)
    assert claims.median == 100 and claims.capped == (3,)
    record = claims.record(["a", "b", "c", "d"], [100, 120, 90, 100_000])
    assert record == {"ratio": 10, "median_per_contributor": 100.0, "claims": {"d": {"claimed": 100_000, "credited": 1000}}}


def test_claims_within_the_ratio_are_untouched_and_ratio_zero_turns_it_off() -> None:
    assert credit_claims([10, 50, 99], ratio=10).capped == ()
    off = credit_claims([1, 2**62], ratio=0)
    assert off.credited == (1, 2**62) and off.capped == ()


def test_a_relays_claim_is_compared_per_device() -> None:
    # a relay of 20 devices of ~100 samples each is honest at 2,000; one of 2 devices claiming 10^6 is not
    claims = credit_claims([100, 110, 2000, 10**6], ratio=10, contributors=[1, 1, 20, 2])
    assert claims.median == 100  # per contributor: 100, 110, 100, 500,000
    assert claims.credited == (100, 110, 2000, 2000)
    assert claims.capped == (3,)


def test_a_cap_is_never_below_one_sample_per_contributor() -> None:
    assert credit_claims([1, 1, 1], ratio=1).credited == (1, 1, 1)
    with pytest.raises(ValueError):
        credit_claims([1], ratio=-1)
