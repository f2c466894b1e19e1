"""Staleness discounts: how much an update or a peer model counts as it ages.

`age` is in rounds (an update trained on the base of round r, arriving in round
r + age) or in seconds (a peer's cluster model created `age` seconds ago); the
same functions serve both. Each returns a factor in (0, 1], 1 at age 0.

- `polynomial`  (default): (1 + age) ** -exponent — FedAsync's polynomial
  staleness function (Xie et al., 2019); with exponent 0.5 an update one round
  old counts 0.71, three rounds old 0.5.
- `exponential`: 0.5 ** (age / half_life).
- `constant`: 1, i.e. no discount.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from proto.errors import InvalidInput

Discount = Callable[[float], float]


def polynomial(age: float, *, exponent: float = 0.5) -> float:
    return (1.0 + max(age, 0.0)) ** -exponent


def exponential(age: float, *, half_life: float = 2.0) -> float:
    return 0.5 ** (max(age, 0.0) / half_life)


def constant(age: float) -> float:
    return 1.0


DISCOUNTS: dict[str, Callable[..., float]] = {
    "polynomial": polynomial,
    "exponential": exponential,
    "constant": constant,
}


def make_discount(name: str, **params: Any) -> Discount:
    """The named discount with its parameters bound, validated once."""
    try:
        function = DISCOUNTS[name]
    except KeyError:
        raise InvalidInput(
            f"unknown staleness discount {name!r}; known: {sorted(DISCOUNTS)}", reason="bad_config"
        ) from None
    try:
        probe = function(1.0, **params)
    except (TypeError, ArithmeticError) as exc:
        raise InvalidInput(f"staleness discount {name!r}: {exc}", reason="bad_config") from None
    if not (math.isfinite(probe) and 0 < probe <= 1):
        raise InvalidInput(f"staleness discount {name!r} with {params} gives {probe}", reason="bad_config")
    return lambda age: function(age, **params)
