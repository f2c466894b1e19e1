"""Who does what when: each virtual device's plan, drawn once and deterministically from the seed.

Pure functions of `SimOptions`, so the same options give the same fleet: the same
agent ids (and so the same homes on the ring), the same join times, the same
stragglers and the same devices behind the relay. Each device also gets its own
RNG stream for what it draws while it runs (heartbeat jitter, churn, dropouts).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from agent.sim.options import SimOptions
from proto.retry import RetryPolicy

# device RNG streams: seed and index are mixed so neighbouring devices draw independently
_STREAM = 1_000_003


@dataclass(frozen=True, kw_only=True)
class DevicePlan:
    index: int
    agent_id: str
    # seconds after the start when the device first joins
    start_s: float
    # where it joins: the aggregators, or the relay
    seeds: tuple[str, ...]
    behind_relay: bool = False
    straggler: bool = False
    # a poisoning device (SimOptions.attack)
    hostile: bool = False


def agent_id(options: SimOptions, index: int) -> str:
    return f"{options.id_prefix}-{index:05d}"


def device_rng(options: SimOptions, index: int) -> random.Random:
    """Device `index`'s own random stream."""
    return random.Random(options.seed * _STREAM + index + 1)


def _chosen(rng: random.Random, count: int, share: float) -> set[int]:
    """round(share x count) distinct indices of 0..count-1."""
    return set(rng.sample(range(count), round(share * count))) if count else set()


def plan_fleet(options: SimOptions) -> list[DevicePlan]:
    """Every device's plan. First joins are spread evenly (with jitter) over the ramp."""
    rng = random.Random(options.seed)
    count = options.agents
    relayed = _chosen(rng, count, options.relay_share)
    stragglers = _chosen(rng, count, options.stragglers)
    ramp = options.effective_ramp_s
    order = list(range(count))
    rng.shuffle(order)  # who joins early is random, not by index
    slot = ramp / count if count else 0.0
    starts = {index: (position + rng.random()) * slot for position, index in enumerate(order)}
    # drawn last, so adding attackers leaves every other draw of a seeded fleet as it was
    hostile = _chosen(rng, count, options.attack.share) if options.attack.active else set()
    return [
        DevicePlan(
            index=i,
            agent_id=agent_id(options, i),
            start_s=starts[i],
            seeds=(options.relay,) if i in relayed else tuple(options.seeds),
            behind_relay=i in relayed,
            straggler=i in stragglers,
            hostile=i in hostile,
        )
        for i in range(count)
    ]


def first_heartbeat_s(rng: random.Random, interval_s: float) -> float:
    """The first heartbeat after joining: uniform in [0, interval), so a fleet that joined
    together does not heartbeat together."""
    return rng.random() * interval_s


def online_s(rng: random.Random, leave_rate_per_min: float) -> float:
    """How long a device stays online before it leaves: exponential, inf without churn."""
    if leave_rate_per_min <= 0:
        return math.inf
    return rng.expovariate(leave_rate_per_min / 60.0)


def offline_s(rng: random.Random, join_rate_per_min: float) -> float:
    """How long a device that left stays away."""
    return rng.expovariate(join_rate_per_min / 60.0)


def backoff_s(rng: random.Random, policy: RetryPolicy, retry: int) -> float:
    """The wait before retry number `retry` under the agent's policy: full jitter, as proto.retry draws it."""
    return rng.random() * policy.ceiling(retry)
