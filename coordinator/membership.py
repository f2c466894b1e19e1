"""Aggregator membership: leases renewed by heartbeats, and the ring they define.

An aggregator registers, then heartbeats every `heartbeat_interval_s`; a lease not
renewed within `ttl_s` expires and the aggregator leaves the ring. Every change of
the ring's members (join, leave, new address or weight) bumps the ring version.

The version and the last known members are kept in SQLite (`storage.durable`:
a change is on disk before the caller hears of it), so a restarted
coordinator goes on from the same version with the same ring: the members it
knew get a fresh lease (one ttl of grace) and keep it by heartbeating, so a
coordinator restart moves no agent. An aggregator the coordinator does not know
(state lost) re-registers by sending its `info` with a heartbeat.

This module imports no gRPC; `coordinator.service` adapts it to the wire.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from coordinator.ring import MAX_WEIGHT, Member, Ring
from proto.errors import InvalidInput, NotFound
from storage.durable import MAX_INTEGER, DurableSqlite, Statement

__all__ = ["AggregatorInfo", "AggregatorStatus", "FederationProgress", "Lease", "Membership", "Progress"]

log = logging.getLogger("strata.coordinator.membership")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS aggregators (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    federations TEXT NOT NULL,
    weight REAL NOT NULL,
    in_ring INTEGER NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    agent_count INTEGER NOT NULL DEFAULT 0,
    last_cluster_cid TEXT NOT NULL DEFAULT '',
    last_semi_global_cid TEXT NOT NULL DEFAULT '',
    last_seen REAL NOT NULL DEFAULT 0
);
"""


# What the coordinator keeps of a caller's names: plenty for any id, host:port, federation or CID, and
# small enough that every aggregator ever seen still fits one FleetStatus reply (4 MiB) many times over.
MAX_NAME_CHARS = 256
MAX_FEDERATIONS = 64


def _check_names(what: str, **names: str) -> None:
    for field_name, value in names.items():
        if len(value) > MAX_NAME_CHARS:
            raise InvalidInput(
                f"{what} {field_name} is {len(value)} characters; the limit is {MAX_NAME_CHARS}",
                reason=f"bad_{what}",
            )


@dataclass(frozen=True, kw_only=True)
class AggregatorInfo:
    """What an aggregator registers: its id, its AgentService/PeerService address, its share of the ring."""

    id: str
    address: str
    federations: tuple[str, ...] = ()
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidInput("aggregator id must not be empty", reason="bad_aggregator")
        _check_names("aggregator", id=self.id, address=self.address)
        if len(self.federations) > MAX_FEDERATIONS:
            raise InvalidInput(
                f"aggregator {self.id!r} names {len(self.federations)} federations; the limit is {MAX_FEDERATIONS}",
                reason="bad_aggregator",
            )
        for federation in self.federations:
            _check_names("aggregator", federation=federation)
        if ":" not in self.address:
            raise InvalidInput(
                f"aggregator {self.id!r}: address must be host:port, got {self.address!r}",
                reason="bad_aggregator",
            )
        # checked here, before the lease table holds it: a weight the ring cannot use would fail
        # every ring rebuild after it, not just this registration
        if not (0 < self.weight <= MAX_WEIGHT):
            raise InvalidInput(
                f"aggregator {self.id!r}: weight must be in (0, {MAX_WEIGHT:g}], got {self.weight}",
                reason="bad_aggregator",
            )
        object.__setattr__(self, "federations", tuple(self.federations))

    def member(self) -> Member:
        return Member(id=self.id, address=self.address, weight=self.weight)


@dataclass(frozen=True, kw_only=True)
class Lease:
    ttl_s: float
    heartbeat_interval_s: float
    ring_version: int
    expires_at: float
    # the fleet's revocation list version, which the service adds (membership knows none)
    revocations_version: int = 0


@dataclass(frozen=True, kw_only=True)
class FederationProgress:
    """One federation's round and models on an aggregator that serves several."""

    federation: str
    round: int = 0
    agent_count: int = 0
    last_cluster_cid: str = ""
    last_semi_global_cid: str = ""

    def __post_init__(self) -> None:
        _check_progress(self)
        if not self.federation:
            raise InvalidInput("a federation's progress must name the federation", reason="bad_progress")
        _check_names("progress", federation=self.federation)


@dataclass(frozen=True, kw_only=True)
class Progress:
    """What an aggregator reports with each heartbeat: its default federation's round and models, all its
    agents, and, when it serves several federations, each one's progress."""

    round: int = 0
    agent_count: int = 0
    last_cluster_cid: str = ""
    last_semi_global_cid: str = ""
    federations: tuple[FederationProgress, ...] = ()

    def __post_init__(self) -> None:
        _check_progress(self)
        object.__setattr__(self, "federations", tuple(self.federations))
        if len(self.federations) > MAX_FEDERATIONS:
            raise InvalidInput(
                f"heartbeat reports {len(self.federations)} federations; the limit is {MAX_FEDERATIONS}",
                reason="bad_progress",
            )


def _check_progress(progress: Progress | FederationProgress) -> None:
    # checked before any lease is touched: a round the lease store cannot hold is refused, not half-applied
    for name in ("round", "agent_count"):
        if not 0 <= getattr(progress, name) <= MAX_INTEGER:
            raise InvalidInput(
                f"heartbeat {name} must be in 0..2^63-1, got {getattr(progress, name)}", reason="bad_progress"
            )
    _check_names(
        "progress", last_cluster_cid=progress.last_cluster_cid, last_semi_global_cid=progress.last_semi_global_cid
    )


@dataclass(frozen=True, kw_only=True)
class AggregatorStatus:
    info: AggregatorInfo
    alive: bool
    lease_expires_at: float
    round: int = 0
    agent_count: int = 0
    last_cluster_cid: str = ""
    last_semi_global_cid: str = ""
    last_seen: float = 0.0
    # per federation, from the last heartbeat (kept in memory: the next heartbeat restores it after a restart)
    federations: tuple[FederationProgress, ...] = ()


class _LeaseStore(DurableSqlite):
    """The ring version and every aggregator's last status, as `Membership` left them."""

    SCHEMA = _SCHEMA
    SCHEMA_VERSION = 1

    def ring_version(self) -> int:
        rows = self._read("SELECT value FROM meta WHERE key = 'ring_version'")
        return int(rows[0]["value"]) if rows else 0

    def statuses(self) -> list[sqlite3.Row]:
        return self._read(
            "SELECT id, address, federations, weight, in_ring, round, agent_count,"
            " last_cluster_cid, last_semi_global_cid, last_seen FROM aggregators"
        )

    def save(self, statuses: Iterable[AggregatorStatus], *, ring_version: int | None = None) -> None:
        """Write `statuses` (and the new ring version, if it changed) in one transaction."""
        statements: list[Statement] = [
            (
                "INSERT OR REPLACE INTO aggregators (id, address, federations, weight, in_ring, round, agent_count,"
                " last_cluster_cid, last_semi_global_cid, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    s.info.id,
                    s.info.address,
                    json.dumps(list(s.info.federations)),
                    s.info.weight,
                    int(s.alive),
                    s.round,
                    s.agent_count,
                    s.last_cluster_cid,
                    s.last_semi_global_cid,
                    s.last_seen,
                ),
            )
            for s in statuses
        ]
        if ring_version is not None:
            statements.append(
                ("INSERT OR REPLACE INTO meta (key, value) VALUES ('ring_version', ?)", (str(ring_version),))
            )
        self._write(statements)


class Membership:
    """Leases, the ring they define, and the status each heartbeat reports. Thread-safe."""

    def __init__(
        self,
        *,
        ttl_s: float = 6.0,
        heartbeat_interval_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        store: str | Path | None = None,
        static_members: Sequence[Member] = (),
    ) -> None:
        if not (0 < heartbeat_interval_s < ttl_s):
            raise InvalidInput(
                f"need 0 < heartbeat_interval_s ({heartbeat_interval_s}) < ttl_s ({ttl_s})",
                reason="bad_lease_policy",
            )
        self.ttl_s = ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._clock = clock
        self._lock = threading.RLock()
        # store None: a private in-memory database, gone with the process
        self._db = _LeaseStore(store)
        self._statuses: dict[str, AggregatorStatus] = {}
        self._static = tuple(static_members)
        self._listeners: list[Callable[[], None]] = []
        # lease changes since this process started, by kind (granted, moved, expired): the
        # operator's view of ring churn; a restart resets them, as Prometheus counters may
        self.lease_changes: dict[str, int] = {"granted": 0, "moved": 0, "expired": 0}
        self._version = self._db.ring_version()
        self._load_statuses()
        if self._static:
            self._ring = Ring(self._static, version=1)
        else:
            self._ring = Ring(self._live_members(), version=self._version)

    # ------------------------------------------------------------ persistence

    def _load_statuses(self) -> None:
        # The members of the last ring get a fresh lease: one ttl to heartbeat before they expire.
        grace_until = self._clock() + self.ttl_s
        for row in self._db.statuses():
            try:
                info = AggregatorInfo(
                    id=row[0], address=row[1], federations=tuple(json.loads(row[2])), weight=row[3]
                )
            except InvalidInput as exc:
                # kept by an older coordinator that checked less; one such entry must not stop this one
                log.warning("aggregator_skipped", extra={"fields": {"aggregator": str(row[0])[:80], "error": str(exc)}})
                continue
            self._statuses[info.id] = AggregatorStatus(
                info=info,
                alive=bool(row[4]),
                lease_expires_at=grace_until if row[4] else row[9],
                round=row[5],
                agent_count=row[6],
                last_cluster_cid=row[7],
                last_semi_global_cid=row[8],
                last_seen=row[9],
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ leases

    def _lease(self, expires_at: float) -> Lease:
        return Lease(
            ttl_s=self.ttl_s,
            heartbeat_interval_s=self.heartbeat_interval_s,
            ring_version=self._ring.version,
            expires_at=expires_at,
        )

    def _live_members(self) -> list[Member]:
        return [s.info.member() for s in self._statuses.values() if s.alive]

    def _ring_changed(self) -> int | None:
        """Publish a new ring version and return it (None for a static ring); the caller holds
        the lock, has updated `_statuses` and saves them with this version in one transaction."""
        if self._static:
            return None
        self._version += 1
        self._ring = Ring(self._live_members(), version=self._version)
        for listener in self._listeners:
            listener()
        return self._version

    def register(self, info: AggregatorInfo) -> Lease:
        """Grant or renew `info.id`'s lease. The ring version bumps if the member is new or
        its address or weight changed."""
        now = self._clock()
        with self._lock:
            previous = self._statuses.get(info.id)
            joins = previous is None or not previous.alive
            moved = previous is not None and previous.info.member() != info.member()
            base = previous or AggregatorStatus(info=info, alive=True, lease_expires_at=0.0)
            status = replace(
                base, info=info, alive=True, lease_expires_at=now + self.ttl_s, last_seen=now
            )
            self._statuses[info.id] = status
            self._db.save([status], ring_version=self._ring_changed() if joins or moved else None)
            if joins or moved:
                self.lease_changes["granted" if joins else "moved"] += 1
                log.info(
                    "aggregator_registered",
                    extra={
                        "fields": {
                            "aggregator": info.id,
                            "address": info.address,
                            "ring_version": self._ring.version,
                        }
                    },
                )
            return self._lease(status.lease_expires_at)

    def heartbeat(
        self,
        aggregator_id: str,
        progress: Progress = Progress(),
        *,
        info: AggregatorInfo | None = None,
    ) -> Lease:
        """Renew a lease and record the aggregator's progress.

        An aggregator without a live lease is re-registered from `info`; without
        `info` it gets NotFound(reason="unknown_aggregator") and should register again.
        """
        if info is not None and info.id != aggregator_id:
            raise InvalidInput(
                f"heartbeat from {aggregator_id!r} carries info for {info.id!r}",
                reason="bad_aggregator",
            )
        with self._lock:
            current = self._statuses.get(aggregator_id)
            if info is not None and (current is None or not current.alive or current.info != info):
                self.register(info)
            elif current is None or not current.alive:
                raise NotFound(
                    f"aggregator {aggregator_id!r} has no lease; register again",
                    reason="unknown_aggregator",
                )
            now = self._clock()
            status = replace(
                self._statuses[aggregator_id],
                lease_expires_at=now + self.ttl_s,
                last_seen=now,
                round=progress.round,
                agent_count=progress.agent_count,
                last_cluster_cid=progress.last_cluster_cid,
                last_semi_global_cid=progress.last_semi_global_cid,
                federations=progress.federations,
            )
            self._statuses[aggregator_id] = status
            self._db.save([status])
            return self._lease(status.lease_expires_at)

    def expire(self) -> list[str]:
        """Drop leases that ran out; returns the ids that left (empty: the ring is unchanged)."""
        now = self._clock()
        with self._lock:
            expired = [s for s in self._statuses.values() if s.alive and s.lease_expires_at <= now]
            if not expired:
                return []
            gone = [replace(s, alive=False) for s in expired]
            self.lease_changes["expired"] += len(gone)
            for status in gone:
                self._statuses[status.info.id] = status
            self._db.save(gone, ring_version=self._ring_changed())
            return [s.info.id for s in gone]

    # ------------------------------------------------------------ the ring

    def ring(self, federation: str | None = None) -> Ring:
        """The current ring. With `federation`, only the members serving it (an aggregator
        that names no federation serves all); the version is the same either way."""
        with self._lock:
            ring = self._ring
            if not federation or self._static:
                return ring
            serving = {
                s.info.id
                for s in self._statuses.values()
                if s.alive and (not s.info.federations or federation in s.info.federations)
            }
        return Ring([m for m in ring.members if m.id in serving], version=ring.version)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (quickly, without blocking: it runs under the lock) each time the ring changes."""
        with self._lock:
            self._listeners.append(listener)

    @property
    def ring_version(self) -> int:
        """The current ring's version, read without the lock."""
        return self._ring.version

    def status(self) -> list[AggregatorStatus]:
        """Every aggregator ever seen (live or not), sorted by id."""
        with self._lock:
            return [self._statuses[k] for k in sorted(self._statuses)]
