"""Conversions between the wire's small shared messages and plain Python values.

Telemetry travels as `pb.Telemetry` and is kept as a dict; capabilities travel as
the `Capability` enum and are kept as the names "train", "partial_train" and
"inference". Every service converts through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proto import strata_pb2 as pb

TELEMETRY_FIELDS = ("cpu_percent", "memory_mb", "battery_percent", "charging", "network", "uplink_kbps")
CAPABILITIES: dict[str, int] = {"train": pb.TRAIN, "partial_train": pb.PARTIAL_TRAIN, "inference": pb.INFERENCE}
_CAPABILITY_NAMES = {value: name for name, value in CAPABILITIES.items()}


def telemetry_to_dict(telemetry: pb.Telemetry) -> dict[str, Any]:
    return {name: getattr(telemetry, name) for name in TELEMETRY_FIELDS}


def telemetry_from_dict(telemetry: Mapping[str, Any]) -> pb.Telemetry:
    return pb.Telemetry(**{name: telemetry[name] for name in TELEMETRY_FIELDS if name in telemetry})


def capability_name(value: int, default: str = "train") -> str:
    """The name of a Capability value; unset or unknown values give `default`."""
    return _CAPABILITY_NAMES.get(value, default)


def capability_value(name: str) -> int:
    """The Capability value of a name; an unknown name gives CAPABILITY_UNSPECIFIED."""
    return CAPABILITIES.get(name, pb.CAPABILITY_UNSPECIFIED)
