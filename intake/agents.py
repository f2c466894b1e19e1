"""The agents an aggregator knows: who joined, with what capability, and when each was last heard from.

"Active" means heard from (join, heartbeat, download, submit) within the timeout;
the round quorum counts active agents that can train.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

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


class AgentRegistry:
    def __init__(self, *, timeout_s: float, clock: Callable[[], float] = time.time) -> None:
        self._timeout_s = timeout_s
        self._clock = clock
        self._agents: dict[str, AgentInfo] = {}
        self._lock = threading.Lock()

    def join(self, agent_id: str, *, display_name: str, capability: str, telemetry: dict) -> AgentInfo:
        now = self._clock()
        with self._lock:
            previous = self._agents.get(agent_id)
            info = AgentInfo(
                agent_id=agent_id,
                display_name=display_name,
                capability=capability if capability in CAPABILITIES else TRAIN,
                telemetry=telemetry,
                joined_at=previous.joined_at if previous else now,
                last_seen=now,
            )
            self._agents[agent_id] = info
            return info

    def touch(self, agent_id: str, telemetry: dict | None = None) -> None:
        now = self._clock()
        with self._lock:
            info = self._agents.get(agent_id)
            if info is None:
                # heard from before it joined here (e.g. after our restart): count it as a trainer
                info = AgentInfo(agent_id=agent_id, joined_at=now)
            self._agents[agent_id] = replace(info, last_seen=now, telemetry=telemetry or info.telemetry)

    def forget(self, agent_id: str) -> None:
        with self._lock:
            self._agents.pop(agent_id, None)

    def active(self) -> list[AgentInfo]:
        cutoff = self._clock() - self._timeout_s
        with self._lock:
            return [a for a in self._agents.values() if a.last_seen >= cutoff]

    def active_trainers(self) -> int:
        return sum(1 for a in self.active() if a.trains)

    def all(self) -> list[AgentInfo]:
        with self._lock:
            return list(self._agents.values())
