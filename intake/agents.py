"""The agents a home knows: who joined, with what capability, and when each was last heard from.

"Active" means heard from (join, heartbeat, download, submit) within the timeout;
the round quorum counts active agents that can train.

Heartbeats adapt to the fleet: each agent is told to heartbeat every
max(min interval, known agents / budget) seconds, so the home answers about
`budget` heartbeats a second however many agents it holds, and an agent counts
as active for at least three of its intervals. Agents silent for ten timeouts
are forgotten.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proto.errors import InvalidInput

TRAIN, PARTIAL_TRAIN, INFERENCE = "train", "partial_train", "inference"
CAPABILITIES = (TRAIN, PARTIAL_TRAIN, INFERENCE)


@dataclass(frozen=True, kw_only=True)
class AgentInfo:
    agent_id: str
    display_name: str = ""
    capability: str = TRAIN
    telemetry: dict[str, float | str | bool] = field(default_factory=dict)
    joined_at: float = 0.0
    last_seen: float = 0.0

    @property
    def trains(self) -> bool:
        return self.capability in (TRAIN, PARTIAL_TRAIN)


# the longest agent id, display name or telemetry network name a home keeps (the coordinator's agent
# directory keeps the same); anything longer is refused, not held for ten timeouts
MAX_AGENT_NAME_CHARS = 256


def _check_names(agent_id: str, telemetry: dict | None, **names: str) -> None:
    named = {"agent_id": agent_id, **names, "network": str((telemetry or {}).get("network", ""))}
    for name, value in named.items():
        if len(value) > MAX_AGENT_NAME_CHARS:
            raise InvalidInput(f"agent {name} is {len(value)} characters; the limit is {MAX_AGENT_NAME_CHARS}", reason="bad_request")


# an agent counts as active for this many of its heartbeat intervals
_INTERVALS_BEFORE_INACTIVE = 3
# an agent silent for this many timeouts is forgotten
_TIMEOUTS_BEFORE_FORGOTTEN = 10


class AgentRegistry:
    def __init__(
        self,
        *,
        timeout_s: float,
        heartbeat_interval_s: float = 5.0,
        heartbeat_budget_per_s: float = math.inf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._timeout_s = timeout_s
        self._min_interval_s = heartbeat_interval_s
        self._budget_per_s = heartbeat_budget_per_s
        self._clock = clock
        self._agents: dict[str, _Record] = {}
        self._lock = threading.Lock()
        # Joins answered with a home, ever: its rate is the reconnect storm a failover brings
        self.joins = 0

    def heartbeat_interval(self) -> float:
        """How often each agent should heartbeat, so that all of them together stay within the budget."""
        return max(self._min_interval_s, len(self._agents) / self._budget_per_s)

    def timeout(self) -> float:
        """How long an agent may stay silent and still count as active."""
        return max(self._timeout_s, _INTERVALS_BEFORE_INACTIVE * self.heartbeat_interval())

    def join(self, agent_id: str, *, display_name: str, capability: str, telemetry: dict) -> AgentInfo:
        _check_names(agent_id, telemetry, display_name=display_name)
        now = self._clock()
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                record = self._agents[agent_id] = _Record(agent_id, now)
            record.display_name = display_name
            record.capability = capability if capability in CAPABILITIES else TRAIN
            record.telemetry = telemetry
            record.last_seen = now
            self.joins += 1
            return record.info()

    def touch(self, agent_id: str, telemetry: dict | None = None) -> None:
        """Heard from `agent_id` now. Updates its record in place: every heartbeat of a large fleet
        passes here, and replacing records would leave the garbage collector a fleet's worth of work."""
        _check_names(agent_id, telemetry)
        now = self._clock()
        with self._lock:
            record = self._agents.get(agent_id)
            if record is None:
                # heard from before it joined here (e.g. after our restart): count it as a trainer
                record = self._agents[agent_id] = _Record(agent_id, now)
            record.last_seen = now
            if telemetry:
                record.telemetry = telemetry

    def active(self) -> list[AgentInfo]:
        timeout = self.timeout()
        now = self._clock()
        with self._lock:
            forgotten = [k for k, r in self._agents.items() if r.last_seen < now - _TIMEOUTS_BEFORE_FORGOTTEN * timeout]
            for agent_id in forgotten:
                del self._agents[agent_id]
            return [r.info() for r in self._agents.values() if r.last_seen >= now - timeout]

    def active_trainers(self) -> int:
        return sum(1 for a in self.active() if a.trains)

    def all(self) -> list[AgentInfo]:
        with self._lock:
            return [r.info() for r in self._agents.values()]


class _Record:
    """An agent as the registry keeps it: mutable, so a heartbeat allocates nothing."""

    __slots__ = ("agent_id", "capability", "display_name", "joined_at", "last_seen", "telemetry")

    def __init__(self, agent_id: str, now: float) -> None:
        self.agent_id = agent_id
        self.display_name = ""
        self.capability = TRAIN
        self.telemetry: dict[str, float | str | bool] = {}
        self.joined_at = now
        self.last_seen = now

    def info(self) -> AgentInfo:
        return AgentInfo(
            agent_id=self.agent_id,
            display_name=self.display_name,
            capability=self.capability,
            telemetry=self.telemetry,
            joined_at=self.joined_at,
            last_seen=self.last_seen,
        )
