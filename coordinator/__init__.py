"""The coordinator: aggregator membership with leases, the consistent-hash ring, the model index and the agent directory;
and the typed client every other process talks to it with."""

from __future__ import annotations

import importlib
from typing import Any

# Exports load lazily, so `import coordinator.ring` (what aggregators and relays
# use) does not drag in gRPC, SQLite and the manifest code.
_EXPORTS = {
    "Member": "coordinator.ring",
    "Ring": "coordinator.ring",
    "remapped_fraction": "coordinator.ring",
    "CoordinatorConfig": "coordinator.config",
    "AggregatorInfo": "coordinator.membership",
    "AggregatorStatus": "coordinator.membership",
    "Lease": "coordinator.membership",
    "Membership": "coordinator.membership",
    "AgentEntry": "coordinator.index",
    "Lineage": "coordinator.index",
    "ModelIndex": "coordinator.index",
    "ModelRecord": "coordinator.index",
    "CoordinatorServicer": "coordinator.service",
    "CoordinatorClient": "coordinator.client",
    "CoordinatorDaemon": "coordinator.daemon",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
