"""Coordinator configuration: frozen, keyword-only, validated on creation; each default defined once.

Loaded from YAML with `STRATA_*` environment overrides by `strata.config.load_config`
(e.g. `STRATA_LEASE_TTL_S=10`). Every key has a default, so
`strata coordinator serve` runs with no file at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.ring import Member
from proto.errors import ConfigError
from trust.ca import MAX_VALIDITY
from trust.security import TlsSettings

_MAX_VALIDITY_S = MAX_VALIDITY.total_seconds()
_LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    listen: str = _help("host:port for CoordinatorService", default="127.0.0.1:7000")
    state_dir: str = _help(
        "membership state (ring version, last known members) and the model index",
        default="~/.strata/coordinator",
    )
    # ttl 6 s and heartbeats every 2 s: a lease survives two lost heartbeats, and a
    # dead aggregator leaves the ring within ttl + one expiry tick (~6.5 s), under 10 s.
    lease_ttl_s: float = _help(
        "an aggregator not heard from for this long leaves the ring", default=6.0
    )
    heartbeat_interval_s: float = _help("how often aggregators are told to heartbeat", default=2.0)
    members: list[str] = _help(
        "static ring of id=host:port entries; when set, leases never change the ring",
        default_factory=list,
    )
    metrics_port: int = _help("Prometheus metrics port on the listen host; 0 disables", default=0)
    tls: TlsSettings = field(default_factory=TlsSettings, metadata={"help": "mutual TLS"})
    ca_dir: str = _help(
        "the fleet CA directory (`strata certs init`; `strata certs token` keeps its tokens there): agents "
        "enroll and renew against it, and its revocation list is served to the aggregators; empty: neither",
        default="",
    )
    enroll_listen: str = _help(
        "host:port of the TLS-only enrollment port, where agents holding a bootstrap token (and no certificate "
        "yet) enroll; needs tls.bundle and ca_dir; empty: no enrollment",
        default="",
    )
    enroll_validity_s: float = _help(
        "lifetime of the certificates agents enroll and renew for (they renew at about 2/3 of it)", default=86400.0
    )
    log_level: str = _help("debug | info | warning | error", default="info")

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"listen must be host:port, got {self.listen!r}")
        if not self.state_dir:
            raise ConfigError("state_dir must not be empty")
        for name in ("lease_ttl_s", "heartbeat_interval_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be shorter than "
                f"lease_ttl_s ({self.lease_ttl_s}), or every lease lapses between heartbeats"
            )
        self.static_members()  # validates the entries
        if self.enroll_listen:
            host, sep, port = self.enroll_listen.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"enroll_listen must be host:port, got {self.enroll_listen!r}")
            if not self.ca_dir:
                raise ConfigError("enroll_listen needs ca_dir: the CA that signs enrolled certificates")
            if not self.tls.bundle:
                raise ConfigError(
                    "enroll_listen needs tls.bundle: the enrollment port serves TLS with the coordinator's certificate"
                )
        if not (self.enroll_validity_s > 0 and self.enroll_validity_s <= _MAX_VALIDITY_S):
            raise ConfigError(
                f"enroll_validity_s must be in (0, {_MAX_VALIDITY_S:g}] seconds, got {self.enroll_validity_s!r}"
            )
        if not (0 <= self.metrics_port <= 65535):
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError(
                f"log_level must be one of debug, info, warning, error; got {self.log_level!r}"
            )

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def ca_path(self) -> Path | None:
        return Path(self.ca_dir).expanduser() if self.ca_dir else None

    def static_members(self) -> list[Member]:
        """The `members` entries as ring members (empty: membership comes from leases)."""
        members: list[Member] = []
        seen: set[str] = set()
        for entry in self.members:
            member_id, sep, address = entry.partition("=")
            if not sep or not member_id or ":" not in address:
                raise ConfigError(f"members entries must look like id=host:port, got {entry!r}")
            if member_id in seen:
                raise ConfigError(f"members lists {member_id!r} twice")
            seen.add(member_id)
            members.append(Member(id=member_id, address=address))
        return members
