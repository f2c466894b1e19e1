"""Relay configuration: frozen, keyword-only, validated on creation; each default defined once.

Loaded from YAML with `STRATA_*` environment overrides by `strata.config.load_config`
(e.g. `STRATA_WINDOW__MAX_DEVICES=6`), so `strata relay serve` runs with no file at all
in front of a local aggregator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from intake.config import ServingSettings
from proto.errors import ConfigError
from trust.security import TlsSettings


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class WindowSettings:
    max_devices: int = _help(
        "device updates that close a window (capped by the training devices active; inference-only "
        "devices never count)",
        default=8,
    )
    max_wait_s: float = _help("seconds after a window's first update when it closes anyway", default=30.0)
    max_claim_ratio: float = _help(
        "at close, each device's num_samples is credited with at most this x the window's (low) median claim; 0 disables",
        default=10.0,
    )

    def __post_init__(self) -> None:
        if self.max_devices < 1:
            raise ConfigError("window.max_devices must be >= 1")
        if not (math.isfinite(self.max_claim_ratio) and (self.max_claim_ratio == 0 or self.max_claim_ratio >= 1)):
            raise ConfigError("window.max_claim_ratio must be 0 (off) or >= 1")
        if not (self.max_wait_s > 0 and math.isfinite(self.max_wait_s)):
            raise ConfigError("window.max_wait_s must be a positive number")


@dataclass(frozen=True, kw_only=True)
class ForwardSettings:
    max_pending_updates: int = _help(
        "device updates held but not yet forwarded upstream; beyond it devices are refused", default=1000
    )
    max_pending_bytes: int = _help("bytes of device updates held but not yet forwarded", default=256 << 20)
    max_staleness: int = _help(
        "upstream rounds a held update's base may lag the upstream round and still be forwarded", default=2
    )
    retry_s: float = _help("backoff base before retrying an unreachable upstream; doubles up to 8x, full jitter", default=1.0)

    def __post_init__(self) -> None:
        if self.max_pending_updates < 1:
            raise ConfigError("forward.max_pending_updates must be >= 1")
        if self.max_pending_bytes < 1:
            raise ConfigError("forward.max_pending_bytes must be >= 1")
        if self.max_staleness < 0:
            raise ConfigError("forward.max_staleness must be >= 0")
        if not (self.retry_s > 0 and math.isfinite(self.retry_s)):
            raise ConfigError("forward.retry_s must be a positive number")


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    max_bytes: int = _help("models kept from upstream, in bytes (LRU; the current base is never evicted)", default=512 << 20)

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ConfigError("cache.max_bytes must be >= 1")


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    rpc_timeout_s: float = _help("deadline of each unary call upstream", default=30.0)
    join_timeout_s: float = _help("one join attempt gives up after this long (the relay then tries again)", default=60.0)
    backoff_base_s: float = _help("first retry delay upstream; doubles per attempt, with full jitter", default=0.5)
    backoff_max_s: float = _help("longest retry delay upstream", default=5.0)

    def __post_init__(self) -> None:
        for name in ("rpc_timeout_s", "join_timeout_s", "backoff_base_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"upstream.{name} must be > 0")


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    id: str = _help("the relay's id: its agent id upstream and producer id of its updates (default: relay-<hostname>)", default="")
    seeds: list[str] = _help("upstream aggregator addresses to join through", default_factory=lambda: ["127.0.0.1:7070"])
    listen: str = _help("host:port where devices reach the relay's AgentService", default="127.0.0.1:7080")
    federation: str = _help("the model family relayed", default="digits")
    state_dir: str = _help("journal and key (default: ~/.strata/relay/<id>)", default="")
    store: str = _help("private store for cached models and device updates (default: <state_dir>/store)", default="")
    window: WindowSettings = field(default_factory=WindowSettings, metadata={"help": "pre-aggregation window"})
    forward: ForwardSettings = field(default_factory=ForwardSettings, metadata={"help": "store-and-forward"})
    cache: CacheSettings = field(default_factory=CacheSettings, metadata={"help": "model cache"})
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings, metadata={"help": "the upstream client"})
    max_update_bytes: int = _help("largest device update accepted, in bytes", default=256 << 20)
    max_relative_norm: float = _help(
        "refuse device updates with ||update - base|| > this x max(||base||, 1); 0 disables", default=10.0
    )
    serving: ServingSettings = field(default_factory=ServingSettings, metadata={"help": "how agents are served"})
    tls: TlsSettings = field(default_factory=TlsSettings, metadata={"help": "mutual TLS"})
    agent_timeout_s: float = _help("a device not heard from for this long is no longer active", default=30.0)
    metrics_port: int = _help("Prometheus metrics port on the listen host; 0 disables", default=0)
    log_level: str = _help("debug | info | warning | error", default="info")

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one upstream aggregator address")
        if ":" not in self.listen:
            raise ConfigError(f"listen must be host:port, got {self.listen!r}")
        if not self.federation:
            raise ConfigError("federation must not be empty")
        if self.max_update_bytes <= 0:
            raise ConfigError("max_update_bytes must be > 0")
        if self.max_relative_norm < 0:
            raise ConfigError("max_relative_norm must be >= 0 (0 disables the check)")
        if not self.agent_timeout_s > 0:
            raise ConfigError("agent_timeout_s must be > 0")
