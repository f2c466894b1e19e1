"""Every aggregation rule by name, with an optional server optimizer on top: what config selects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aggregator.robust import ROBUST_STRATEGIES
from aggregator.server_opt import SERVER_OPTIMIZERS, ServerOptimized
from aggregator.strategies import STRATEGIES, Strategy
from proto.errors import InvalidInput

_RULES: dict[str, Callable[..., Strategy]] = {**STRATEGIES, **ROBUST_STRATEGIES}


def strategy_names() -> list[str]:
    return sorted(_RULES)


def server_opt_names() -> list[str]:
    return ["none", *sorted(SERVER_OPTIMIZERS)]


def make_strategy(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    server_opt: str = "none",
    server_opt_params: Mapping[str, float] | None = None,
) -> Strategy:
    """The rule `name` with `params`, then `server_opt` if not "none"; InvalidInput "bad_config" otherwise."""
    factory = _RULES.get(name)
    if factory is None:
        raise InvalidInput(f"unknown aggregation strategy {name!r}; known: {strategy_names()}", reason="bad_config")
    try:
        rule = factory(**dict(params or {}))
    except TypeError:  # a parameter the rule does not take
        raise InvalidInput(f"strategy {name!r} does not take parameters {sorted(params or {})}", reason="bad_config") from None
    if server_opt == "none":
        if server_opt_params:
            raise InvalidInput("server_opt_params given without a server_opt", reason="bad_config")
        return rule
    optimizer = SERVER_OPTIMIZERS.get(server_opt)
    if optimizer is None:
        raise InvalidInput(f"unknown server_opt {server_opt!r}; known: {server_opt_names()}", reason="bad_config")
    return ServerOptimized(rule, optimizer(**dict(server_opt_params or {})))
