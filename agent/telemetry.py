"""Device telemetry for Join and Heartbeat: CPU, memory, battery if known, network."""

from __future__ import annotations

import psutil

from proto import strata_pb2 as pb


def read_telemetry(network: str = "unknown") -> pb.Telemetry:
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return pb.Telemetry(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_mb=psutil.Process().memory_info().rss / 2**20,
        battery_percent=battery.percent if battery is not None else -1.0,
        charging=bool(battery.power_plugged) if battery is not None else False,
        network=network,
    )
