"""Staleness discounts: known values, and refusals of bad configurations."""

from __future__ import annotations

import math

import pytest

from aggregator.staleness import constant, exponential, make_discount, polynomial
from proto.errors import InvalidInput


def test_polynomial_is_fedasync_with_exponent_one_half_by_default() -> None:
    assert polynomial(0) == 1.0
    assert math.isclose(polynomial(1), 2**-0.5)
    assert math.isclose(polynomial(3), 0.5)
    assert math.isclose(polynomial(3, exponent=1.0), 0.25)


def test_exponential_halves_every_half_life() -> None:
    assert exponential(0) == 1.0
    assert math.isclose(exponential(2.0), 0.5)
    assert math.isclose(exponential(3.0, half_life=1.5), 0.25)


def test_negative_ages_count_as_fresh_and_constant_never_discounts() -> None:
    assert polynomial(-4) == exponential(-4) == constant(-4) == constant(100) == 1.0


def test_discounts_decrease_with_age() -> None:
    for discount in (make_discount("polynomial", exponent=0.5), make_discount("exponential", half_life=2.0)):
        values = [discount(age) for age in range(6)]
        assert values == sorted(values, reverse=True) and values[0] == 1.0 and values[-1] < 1.0


def test_make_discount_binds_its_parameters() -> None:
    assert math.isclose(make_discount("polynomial", exponent=2.0)(1), 0.25)
    assert math.isclose(make_discount("exponential", half_life=1.0)(2), 0.25)


@pytest.mark.parametrize(
    ("name", "params"),
    [("constant", {}), ("polynomial", {"exponent": 0.0}), ("exponential", {"half_life": 0.001})],
    ids=["constant", "no discount", "steep"],
)
def test_any_discount_in_zero_to_one_is_a_valid_configuration(name: str, params: dict) -> None:
    """1 at every age (no discount) is valid, and so is a steep discount still above 0 one round on."""
    discount = make_discount(name, **params)
    assert discount(0) == 1.0 and 0 < discount(1) <= 1


@pytest.mark.parametrize(
    ("name", "params", "says"),
    [
        ("linear", {}, "unknown staleness discount 'linear'; known: ['constant', 'exponential', 'polynomial']"),
        ("polynomial", {"half_life": 2.0}, "'half_life'"),
        ("exponential", {"half_life": -1.0}, "gives 2.0"),
        ("polynomial", {"exponent": -1.0}, "gives 2.0"),
        ("exponential", {"half_life": 1e-5}, "gives 0.0"),
        ("exponential", {"half_life": 0}, "division by zero"),
        ("polynomial", {"exponent": -2000.0}, "out of range"),
    ],
    ids=[
        "unknown", "wrong parameter", "negative half-life", "growing with age", "zero one round on", "zero half-life",
        "overflow",
    ],
)
def test_bad_discounts_are_refused_as_config_errors(name: str, params: dict, says: str) -> None:
    with pytest.raises(InvalidInput) as info:
        make_discount(name, **params)
    assert info.value.reason == "bad_config"
    assert says in str(info.value)
