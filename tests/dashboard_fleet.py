"""A small live fleet for the dashboard's tests: `strata demo`'s own daemons (coordinator, 3
aggregators, agents, a relay with devices) as real processes under a private HOME, run
until a few rounds have closed everywhere, then left running for the dashboard to read.

Also runnable by hand to look at the dashboard (Ctrl-C stops everything):
    python -m tests.dashboard_fleet /tmp/fleet-home
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.client import CoordinatorClient
from strata.demo.fleet import DemoOptions, Fleet
from tests.agent_service_contract import wait_until

ROUNDS = 2


@dataclass(frozen=True)
class LiveFleet:
    coordinator: str
    home: Path
    state_dirs: dict[str, Path]
    store: str
    relay_store: str
    fleet: Fleet


def _closed_everywhere(coordinator: str, aggregators: int, rounds: int) -> bool:
    with CoordinatorClient(coordinator, timeout_s=5) as client:
        semi = client.list_models(kind="semi-global", limit=500)
    per_aggregator: dict[str, set[int]] = {}
    for record in semi:
        per_aggregator.setdefault(record.producer, set()).add(record.round)
    return len(per_aggregator) >= aggregators and all(len(r) >= rounds for r in per_aggregator.values())


@contextlib.contextmanager
def live_fleet(home: Path, *, aggregators: int = 3, agents: int = 6, rounds: int = ROUNDS, timeout_s: float = 240) -> Iterator[LiveFleet]:
    """Start the fleet under `home` (HOME is pointed there for its children), wait until every
    aggregator has closed `rounds` rounds into semi-global models, yield it, stop it."""
    previous_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    options = DemoOptions(
        aggregators=aggregators, agents=agents, rounds=rounds, relay_devices=3, inference_devices=1,
        agent_processes=1, home=home / ".strata", dashboard=False,
    )
    fleet = Fleet(options, say=lambda _text: None)
    try:
        fleet.prepare()
        fleet.start()

        def all_closed() -> bool:
            fleet.check_alive()  # a daemon that died ends the wait with its own error
            return _closed_everywhere(fleet.coordinator_address, aggregators, rounds)

        wait_until(all_closed, timeout_s, f"{rounds} closed rounds on {aggregators} aggregators", poll_s=1.0)
        assert fleet.relay is not None
        yield LiveFleet(
            coordinator=fleet.coordinator_address,
            home=home,
            state_dirs=dict(fleet.state_dirs),
            store=fleet.store_url,
            relay_store=str(fleet.relay.store),
            fleet=fleet,
        )
    finally:
        fleet.stop()
        if previous_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = previous_home


if __name__ == "__main__":
    with live_fleet(Path(sys.argv[1])) as live:
        print(f"coordinator {live.coordinator}", flush=True)
        print("state dirs " + " ".join(str(d) for d in live.state_dirs.values()), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()  # until Ctrl-C
