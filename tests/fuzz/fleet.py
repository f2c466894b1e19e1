"""A coordinator, an aggregator and a relay as real `strata ... serve` processes, for the long fuzz runs.

Each daemon is its own process (so its RSS is its own), on a free 127.0.0.1
port, with its state under one work directory and its JSON log in a file
(tests.procs). The aggregator registers with the coordinator and the relay
joins the aggregator, as in a fleet; rounds never close (no update is ever
accepted), and a stalled upload is refused after `stream_idle_s`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.fuzz import AGGREGATOR_SERVICES, COORDINATOR_SERVICES, RELAY_SERVICES, Target
from tests.procs import ProcessFactory, StrataProcess, free_port, wait_healthy

MIB = 1 << 20


@dataclass
class Daemon:
    name: str
    process: StrataProcess
    address: str
    services: tuple[str, ...]
    state_dir: Path

    @property
    def target(self) -> Target:
        return Target(self.name, self.address, self.services)

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / MIB

    def log_lines(self) -> list[dict]:
        """Every JSON event this daemon has logged so far (other lines as {"event": "<raw>", "raw": ...})."""
        out = []
        for line in self.process.stderr_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "<raw>", "raw": line}
            out.append(event if isinstance(event, dict) else {"event": "<raw>", "raw": line})
        return out


class ProcessFleet:
    """Start with `start()`, stop with `stop()` (every process by its own PID)."""

    def __init__(self, workdir: Path, *, stream_idle_s: float = 2.0) -> None:
        self.workdir = workdir
        self.stream_idle_s = stream_idle_s
        self.procs = ProcessFactory(workdir / "procs")
        self.daemons: dict[str, Daemon] = {}

    def start(self, timeout_s: float = 120.0) -> dict[str, Daemon]:
        coordinator_port, aggregator_port, relay_port = free_port(), free_port(), free_port()
        state = self.workdir / "state"
        idle = f"serving.stream_idle_s={self.stream_idle_s}"
        coordinator = self.procs.strata(
            "coordinator", "serve",
            "--set", f"listen=127.0.0.1:{coordinator_port}",
            "--set", f"state_dir={state / 'coordinator'}",
            name="coordinator",
        )  # fmt: skip
        wait_healthy(f"127.0.0.1:{coordinator_port}", timeout_s)
        aggregator = self.procs.strata(
            "aggregator", "serve",
            "--set", "id=agg-fuzz",
            "--set", f"listen=127.0.0.1:{aggregator_port}",
            "--set", f"state_dir={state / 'aggregator'}",
            "--set", f"store={state / 'aggregator-store'}",
            "--set", f"coordinator=127.0.0.1:{coordinator_port}",
            "--set", "round.min_updates=1",
            "--set", "round.quorum=1.0",
            "--set", "round.deadline_s=86400",
            "--set", "synthesis.enabled=false",
            "--set", idle,
            name="aggregator",
        )  # fmt: skip
        aggregator.wait_for_event("aggregator_started", timeout=timeout_s)
        wait_healthy(f"127.0.0.1:{aggregator_port}", timeout_s)
        relay = self.procs.strata(
            "relay", "serve",
            "--set", "id=relay-fuzz",
            "--set", f"seeds=127.0.0.1:{aggregator_port}",
            "--set", f"listen=127.0.0.1:{relay_port}",
            "--set", f"state_dir={state / 'relay'}",
            "--set", idle,
            name="relay",
        )  # fmt: skip
        relay.wait_for_event("new_base", timeout=timeout_s)
        wait_healthy(f"127.0.0.1:{relay_port}", timeout_s)
        self.daemons = {
            "coordinator": Daemon("coordinator", coordinator, f"127.0.0.1:{coordinator_port}", COORDINATOR_SERVICES, state / "coordinator"),
            "aggregator": Daemon("aggregator", aggregator, f"127.0.0.1:{aggregator_port}", AGGREGATOR_SERVICES, state / "aggregator"),
            "relay": Daemon("relay", relay, f"127.0.0.1:{relay_port}", RELAY_SERVICES, state / "relay"),
        }
        return self.daemons

    def stop(self) -> None:
        self.procs.stop_all(timeout=15.0)

    def accepted_updates(self) -> dict[str, int]:
        """Updates each home's journal accepted (read-only, while it runs or after)."""
        from aggregator.journal import Journal
        from relay.journal import RelayJournal

        counts = {}
        for name, cls in (("aggregator", Journal), ("relay", RelayJournal)):
            journal = cls(self.daemons[name].state_dir / "journal.sqlite", readonly=True)
            try:
                counts[name] = journal.accepted_count()
            finally:
                journal.close()
        return counts
