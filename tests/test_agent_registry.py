"""The agent registry: who is active, and the heartbeat interval that keeps a home's load within budget."""

from __future__ import annotations

from intake.agents import AgentRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_heartbeat_interval_grows_with_the_fleet_to_stay_within_budget() -> None:
    registry = AgentRegistry(timeout_s=30.0, heartbeat_interval_s=5.0, heartbeat_budget_per_s=500.0)
    assert registry.heartbeat_interval() == 5.0
    for i in range(10_000):
        registry.touch(f"a{i}")
    assert registry.heartbeat_interval() == 20.0  # 10,000 agents / 500 per second
    # an agent may be silent for three of its intervals and still count as active
    assert registry.timeout() == 60.0


def test_active_means_heard_within_the_timeout_and_long_silence_is_forgotten() -> None:
    clock = Clock()
    registry = AgentRegistry(timeout_s=30.0, heartbeat_interval_s=5.0, clock=clock)
    registry.join("trainer", display_name="", capability="train", telemetry={})
    registry.join("viewer", display_name="", capability="inference", telemetry={})
    assert {a.agent_id for a in registry.active()} == {"trainer", "viewer"}
    assert registry.active_trainers() == 1
    clock.now = 31.0
    registry.touch("viewer")
    assert [a.agent_id for a in registry.active()] == ["viewer"]
    assert len(registry.all()) == 2  # silent, not yet forgotten
    clock.now = 31.0 + 10 * 30.0 + 1
    registry.active()
    assert registry.all() == []


def test_joins_are_counted_each_time_a_heartbeat_is_not() -> None:
    """strata_aggregator_joins_total: its rate is the reconnect storm a failover brings (bench/partition.py)."""
    registry = AgentRegistry(timeout_s=30.0)
    for agent in ("a", "b", "a"):  # a re-join counts again
        registry.join(agent, display_name=agent, capability="train", telemetry={})
    registry.touch("a")
    assert registry.joins == 3
