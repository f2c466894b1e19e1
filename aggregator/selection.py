"""Who trains this round: a sample of the active agents, filtered by telemetry, chosen fairly.

Every active agent training every round does not scale: at 10,000 devices that is
10,000 downloads and uploads per round where FedAvg (McMahan et al.) samples a
fraction C of clients, and production systems pick devices that are idle,
charging and on an unmetered network. A `Selector` decides, per round:

- who is *eligible*: a training agent (not inference-only) whose telemetry passes
  the configured filters (battery, charging, network, uplink); an agent that
  reports no value for a filtered field is not eligible;
- how many to invite: everyone (`all`), a `fraction` of the eligible, or a fixed
  `count` per aggregator;
- whom: the eligible agents invited least often so far (across rounds and
  restarts), ties broken by a hash of (round, agent) so that no agent is starved
  or over-used and the choice is reproducible.

Invitations are made when a round opens and topped up while it runs (agents that
arrive later fill free places). Pure logic: the round manager journals the
invitations and counts quorum over the invited agents still active.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aggregator.config import SelectionSettings
from intake.agents import AgentInfo


class Selector:
    def __init__(self, settings: SelectionSettings) -> None:
        self.settings = settings

    @property
    def invites_everyone(self) -> bool:
        return self.settings.mode == "all"

    def describe(self) -> dict[str, Any]:
        return {"mode": self.settings.mode, "params": self.settings.params()}

    def eligible(self, agent: AgentInfo) -> bool:
        """A training agent whose telemetry passes every configured filter."""
        if not agent.trains:
            return False
        settings, telemetry = self.settings, agent.telemetry
        if settings.min_battery_percent > 0 and not float(telemetry.get("battery_percent") or 0) >= settings.min_battery_percent:
            return False
        if settings.require_charging and not telemetry.get("charging"):
            return False
        if settings.networks and telemetry.get("network") not in settings.networks:
            return False
        return not (settings.min_uplink_kbps > 0 and not float(telemetry.get("uplink_kbps") or 0) >= settings.min_uplink_kbps)

    def quota(self, eligible: int) -> int:
        """How many of `eligible` agents a round invites."""
        mode = self.settings.mode
        if mode == "all":
            return eligible
        if mode == "fraction":
            return min(eligible, math.ceil(self.settings.fraction * eligible))
        return min(eligible, self.settings.count)

    def choose(
        self,
        round_: int,
        candidates: Iterable[AgentInfo],
        *,
        invited: set[str],
        times_invited: Mapping[str, int],
    ) -> list[str]:
        """The agents to invite now, beyond `invited`: least invited first, up to the round's quota."""
        eligible = [agent.agent_id for agent in candidates if self.eligible(agent)]
        free = self.quota(len(set(eligible) | invited)) - len(invited)
        if free <= 0:
            return []
        fresh = [agent_id for agent_id in eligible if agent_id not in invited]
        fresh.sort(key=lambda agent_id: (times_invited.get(agent_id, 0), _tiebreak(round_, agent_id)))
        return fresh[:free]


def _tiebreak(round_: int, agent_id: str) -> bytes:
    return hashlib.sha256(f"{round_}:{agent_id}".encode()).digest()[:8]


def expected_trainers(active: Sequence[AgentInfo], invited: set[str] | None) -> int:
    """The active training agents a round waits for: all of them, or the invited ones."""
    return sum(1 for agent in active if agent.trains and (invited is None or agent.agent_id in invited))
