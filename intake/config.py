"""How a home serves its agents: settings an aggregator and a relay share, as one config section `serving`.

Frozen, keyword-only, validated on creation, each default defined once (the
daemons' configs embed it; `strata.config` loads YAML and `STRATA_SERVING__*`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proto.errors import ConfigError
from trust.limits import FairShare


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    heartbeat_interval_s: float = _help(
        "how often agents heartbeat while few; the interval handed out grows to keep within heartbeat_budget_per_s",
        default=5.0,
    )
    heartbeat_budget_per_s: float = _help(
        "heartbeats per second this daemon plans for: with N agents, each is told to heartbeat every "
        "max(heartbeat_interval_s, N / budget) seconds",
        default=500.0,
    )
    stream_idle_s: float = _help(
        "an upload stream that sends nothing for this long is refused as stalled (reason bad_stream)", default=60.0
    )
    caller_max_streams: int = _help(
        "with TLS: streaming calls one identity may hold open at once (beyond: RESOURCE_EXHAUSTED)", default=16
    )
    caller_calls_per_s: float = _help(
        "with TLS: calls per second one identity may make on average (bursts of 5x allowed)", default=20.0
    )
    workers: int = _help(
        "threads for blocking and CPU-bound work (hashing, validation, the journal, the store); connected "
        "agents need none: they are served on one event loop",
        default=8,
    )

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval_s", "heartbeat_budget_per_s", "stream_idle_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"serving.{name} must be > 0")
        if self.workers < 1 or self.caller_max_streams < 1:
            raise ConfigError("serving.workers and serving.caller_max_streams must be >= 1")
        if not self.caller_calls_per_s > 0:
            raise ConfigError("serving.caller_calls_per_s must be > 0")

    def fair_share(self) -> FairShare:
        return FairShare(
            max_streams=self.caller_max_streams, rate_per_s=self.caller_calls_per_s, burst=5 * self.caller_calls_per_s
        )
