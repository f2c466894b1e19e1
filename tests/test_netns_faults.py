"""An aggregator cut off the network mid-round, for real: each daemon in its own network namespace.

A coordinator and 3 aggregators run as `strata` processes, each in its own
namespace on one private bridge (tests/netns.py); `strata simulate` drives 60
virtual devices with the cheap trainer from the root namespace. The aggregator
holding the most devices is unplugged (its bridge port down: no FIN, no RST, calls
just stop being answered) for at least 8 s and until its devices have moved, then
plugged back in. Functional outcomes only, every wait a bounded hang guard:

- the other two keep closing rounds while it is cut off;
- every device it held re-homes on one of them;
- healed, it is on the coordinator's ring again, devices come back to it, and it
  closes a round with their updates;
- every update the simulator saw acknowledged is in an aggregator's journal.

Skipped, with the reason, where network namespaces cannot be made (not root, no
iproute2, a container that refuses them). The full-size run is bench/partition.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim import SimOptions
from agent.sim.schedule import agent_id
from tests.agent_service_contract import wait_until
from tests.netns import NetnsFleet, NetnsLab, SimProgress, netns_unavailable
from tests.procs import ProcessFactory, StrataProcess, procs_fixture  # noqa: F401

pytestmark = pytest.mark.slow

DEVICES = 60
MIN_CUT_S = 8.0
HANG_GUARD_S = 120.0


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsLab() as opened:
        yield opened


@pytest.fixture
def fleet(lab: NetnsLab, procs: ProcessFactory, tmp_path: Path) -> Iterator[NetnsFleet]:
    fleet = NetnsFleet(
        lab,
        procs,
        tmp_path,
        coordinator_settings={"lease_ttl_s": 3.0, "heartbeat_interval_s": 1.0},
        aggregator_settings={
            "serving": {"heartbeat_interval_s": 1.0},
            "round": {"quorum": 0.8, "deadline_s": 3.0, "min_updates": 1, "agent_timeout_s": 6.0},
            "synthesis": {"fetch_timeout_s": 2.0},
        },
    )
    yield fleet.start()
    procs.stop_all()  # before the lab deletes the namespaces they run in


def _rounds_with_updates(process: StrataProcess, after: int = 0) -> int:
    return sum(1 for e in process.events()[after:] if e["event"] == "round_closed" and e.get("participants", 0) > 0)


def test_an_aggregator_cut_off_mid_round_loses_its_devices_then_gets_them_back_and_nothing_acknowledged_is_lost(
    fleet: NetnsFleet, procs: ProcessFactory, tmp_path: Path
) -> None:
    receipts_path = tmp_path / "receipts.jsonl"
    sim = procs.strata(
        "simulate", "--seeds", ",".join(fleet.seeds), "--agents", str(DEVICES), "--trainer", "noise",
        "--ramp", "1", "--progress", "0.5", "--json", "--receipts", str(receipts_path),
        name="simulate", home=fleet.home,
    )  # fmt: skip
    progress = SimProgress(sim)

    def devices_at(name: str) -> int:
        progress.poll()
        return progress.homes.get(name, 0)

    ring = fleet.ring()
    planned = Counter(ring.owner(agent_id(SimOptions(agents=DEVICES), i)).id for i in range(DEVICES))
    victim = planned.most_common(1)[0][0]
    survivors = [name for name in fleet.names if name != victim]
    aggregators = fleet.aggregators
    wait_until(
        lambda: all(_rounds_with_updates(aggregators[n]) >= 1 for n in fleet.names),
        HANG_GUARD_S,
        "a round with updates on every aggregator",
        poll_s=0.2,
        detail=lambda: sim.tail(5),
    )
    wait_until(
        lambda: devices_at(victim) == planned[victim],
        HANG_GUARD_S,
        f"all {planned[victim]} devices the ring gives {victim} on it",
        poll_s=0.2,
    )

    # cut it off mid-round
    marks = {name: aggregators[name].event_count() for name in fleet.names}
    coordinator = fleet.coordinator
    assert coordinator is not None
    coordinator_mark = coordinator.event_count()
    fleet.cut(victim)
    cut_at = time.monotonic()
    wait_until(
        lambda: all(_rounds_with_updates(aggregators[n], marks[n]) >= 2 for n in survivors),
        HANG_GUARD_S,
        "the others closing 2 rounds with updates",
        poll_s=0.2,
    )
    wait_until(
        lambda: devices_at(victim) == 0,
        HANG_GUARD_S,
        f"every device leaving {victim}",
        poll_s=0.2,
        detail=lambda: sim.tail(5),
    )
    assert sum(devices_at(name) for name in survivors) == DEVICES
    coordinator.wait_for_event("aggregator_expired", lambda e: e.get("aggregator") == victim, after=coordinator_mark)
    time.sleep(max(0.0, MIN_CUT_S - (time.monotonic() - cut_at)))

    # heal: it is on the ring again, its devices come back, and it closes a round with their updates
    coordinator_mark = coordinator.event_count()
    victim_mark = aggregators[victim].event_count()
    fleet.heal(victim)
    coordinator.wait_for_event(
        "aggregator_registered", lambda e: e.get("aggregator") == victim, timeout=HANG_GUARD_S, after=coordinator_mark
    )
    wait_until(
        lambda: fleet.ring_members() == set(fleet.names),
        HANG_GUARD_S,
        "the ring holding all three again",
        poll_s=0.2,
    )
    wait_until(
        lambda: devices_at(victim) > 0,
        HANG_GUARD_S,
        f"devices coming back to {victim}",
        poll_s=0.2,
        detail=lambda: sim.tail(5),
    )
    wait_until(
        lambda: _rounds_with_updates(aggregators[victim], victim_mark) >= 1,
        HANG_GUARD_S,
        f"{victim} closing a round with updates after healing",
        poll_s=0.2,
        detail=lambda: aggregators[victim].tail(10),
    )

    # nothing acknowledged is lost
    os.kill(sim.pid, signal.SIGINT)  # it reports, and writes its receipts
    sim.wait_exit(timeout=60)
    report = json.loads(sim.stdout())
    receipts = [json.loads(line) for line in receipts_path.read_text().splitlines()]
    assert receipts and len(receipts) == report["counts"]["acknowledged"]
    acknowledged = {r["update_cid"] for r in receipts}
    journaled = fleet.journaled_updates()
    assert acknowledged <= set(journaled), f"acknowledged but not journaled: {sorted(acknowledged - set(journaled))[:5]}"
    for receipt in receipts:  # and journaled where the device was told, in the round it was told
        assert (receipt["home"], receipt["round"]) in journaled[receipt["update_cid"]], receipt
