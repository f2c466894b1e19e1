"""What a simulation measures: latencies with percentiles, counters, and per-round participation.

All of it is plain bookkeeping on the simulator's one event loop (no locks, no
gRPC), so it is tested without a server.

- `Latencies` keeps every sample of one kind (join, heartbeat, download, submit,
  update) and gives nearest-rank percentiles: a reported p99 is a latency that
  was actually measured. `since(mark)` summarises a window (the progress line).
- `RoundLedger` follows each home's rounds as its devices see them: when a
  round's base was first announced, the most of the simulator's devices at that
  home while it was open, and how many updates it counted, refused or saw twice.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LATENCY_KINDS = ("join", "heartbeat", "download", "submit", "update")
# how late the simulator's own loop wakes up: when this grows, its client-side latencies include its own queueing
LOOP_LAG = "loop_lag"
PERCENTILES = (0.50, 0.95, 0.99)


def nearest_rank(fraction: float, count: int) -> int:
    """The 1-based nearest rank of `fraction` among `count` sorted samples: ceil(fraction x count)."""
    # round first: 0.99 x 100 is 99.00000000000001 in floating point, whose ceiling is 100
    return max(1, min(count, math.ceil(round(fraction * count, 9))))


@dataclass(frozen=True, kw_only=True)
class LatencySummary:
    count: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50_ms": _ms(self.p50_ms),
            "p95_ms": _ms(self.p95_ms),
            "p99_ms": _ms(self.p99_ms),
            "max_ms": _ms(self.max_ms),
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summarize(samples_s: np.ndarray) -> LatencySummary:
    """Nearest-rank p50/p95/p99 and the maximum of `samples_s` (seconds), in milliseconds."""
    count = int(samples_s.shape[0])
    if count == 0:
        return LatencySummary(count=0)
    ranks = [nearest_rank(p, count) - 1 for p in PERCENTILES]
    ordered = np.partition(samples_s, sorted(set(ranks + [count - 1])))
    p50, p95, p99 = (float(ordered[r]) * 1000 for r in ranks)
    return LatencySummary(count=count, p50_ms=p50, p95_ms=p95, p99_ms=p99, max_ms=float(ordered[count - 1]) * 1000)


class Latencies:
    """Every latency sample of one kind, in seconds."""

    def __init__(self) -> None:
        self._samples = array("d")

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def mark(self) -> int:
        """A position to summarise from later (`since`)."""
        return len(self._samples)

    def summary(self) -> LatencySummary:
        return self.since(0)

    def since(self, mark: int) -> LatencySummary:
        return summarize(np.frombuffer(self._samples, dtype=np.float64)[mark:].copy())


@dataclass(kw_only=True)
class RoundStats:
    home: str
    round: int
    model: str
    first_seen: float
    # the most of the simulator's devices at this home at once while the round was open
    devices: int
    next_seen: float | None = None
    # devices told they are invited to train on this round's base (all of them without selection)
    invited: int = 0
    accepted: int = 0
    duplicates: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    # sums of the accepted updates' metrics ("base_" + the base's, as devices evaluated it on their own data)
    metric_sums: Counter[str] = field(default_factory=Counter)
    metric_counts: Counter[str] = field(default_factory=Counter)

    @property
    def closed(self) -> bool:
        return self.next_seen is not None

    @property
    def round_s(self) -> float | None:
        return None if self.next_seen is None else self.next_seen - self.first_seen

    def metrics(self) -> dict[str, float]:
        """Means over this round's accepted updates, e.g. base_accuracy: how good the round's base was."""
        return {name: total / self.metric_counts[name] for name, total in sorted(self.metric_sums.items())}

    def to_json(self) -> dict[str, Any]:
        return {
            "home": self.home,
            "round": self.round,
            "model": self.model,
            "closed": self.closed,
            "round_s": None if self.round_s is None else round(self.round_s, 3),
            "devices": self.devices,
            "invited": self.invited,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "refused": dict(self.refused),
            "participation": round(self.accepted / self.devices, 4) if self.devices else None,
            "metrics": {name: round(value, 4) for name, value in self.metrics().items()},
        }


class RoundLedger:
    """Each home's rounds as the simulator's devices saw them."""

    def __init__(self) -> None:
        self._rounds: dict[tuple[str, int], RoundStats] = {}
        self._latest: dict[str, int] = {}
        self._first: dict[str, int] = {}

    def base_seen(self, home: str, round_: int, model_cid: str, *, now: float, devices: int) -> None:
        """A device of `home` was told its base is `model_cid`, of round `round_`."""
        key = (home, round_)
        if key in self._rounds:
            return
        self._rounds[key] = RoundStats(home=home, round=round_, model=model_cid, first_seen=now, devices=devices)
        self._first.setdefault(home, round_)
        latest = self._latest.get(home)
        if latest is None or round_ > latest:
            self._latest[home] = round_
        # every earlier round of this home still open ended when this one was announced
        for (h, r), stats in self._rounds.items():
            if h == home and r < round_ and stats.next_seen is None:
                stats.next_seen = now

    def devices_at(self, home: str, count: int) -> None:
        """`home` now has `count` of the simulator's devices (one arrived)."""
        latest = self._latest.get(home)
        if latest is not None:
            stats = self._rounds[(home, latest)]
            stats.devices = max(stats.devices, count)

    def _stats(self, home: str, round_: int) -> RoundStats:
        key = (home, round_)
        stats = self._rounds.get(key)
        if stats is None:  # counted in a round this simulator never saw announced (it joined later)
            stats = self._rounds[key] = RoundStats(home=home, round=round_, model="", first_seen=math.nan, devices=0)
        return stats

    def invited(self, home: str, round_: int) -> None:
        """One device was told it is invited to train on `home`'s base of `round_`."""
        self._stats(home, round_).invited += 1

    def accepted(self, home: str, round_: int, *, duplicate: bool, metrics: Mapping[str, float] | None = None) -> None:
        stats = self._stats(home, round_)
        if duplicate:
            stats.duplicates += 1
            return
        stats.accepted += 1
        for name, value in (metrics or {}).items():
            if math.isfinite(value):
                stats.metric_sums[name] += value
                stats.metric_counts[name] += 1

    def refused(self, home: str, round_: int, reason: str) -> None:
        self._stats(home, round_).refused[reason] += 1

    def latest_round(self, home: str) -> int | None:
        return self._latest.get(home)

    def rounds_closed(self, home: str) -> int:
        """Rounds of `home` that closed while the simulator watched: announced after its first one."""
        if home not in self._latest:
            return 0
        return self._latest[home] - self._first[home]

    def homes(self) -> list[str]:
        return sorted(self._latest)

    def rounds(self) -> list[RoundStats]:
        return [self._rounds[key] for key in sorted(self._rounds)]


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """An update the home acknowledged: enough to find it in the home's journal."""

    agent_id: str
    home: str
    base_cid: str
    update_cid: str
    round: int
    duplicate: bool


class FleetStats:
    """Everything one simulation counts."""

    def __init__(self) -> None:
        self.latency = {kind: Latencies() for kind in (*LATENCY_KINDS, LOOP_LAG)}
        self.counts: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        # failed calls by "rpc:STATUS"
        self.errors: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.ledger = RoundLedger()
        self.receipts: list[Receipt] = []

    def error(self, rpc: str, code: object) -> None:
        name = getattr(code, "name", str(code))
        self.errors[f"{rpc}:{name}"] += 1
