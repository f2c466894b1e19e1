"""One simulation: N virtual devices (and any misbehaving clients) on one asyncio loop, until a stop.

    report = asyncio.run(Simulation(options, on_progress=print).run())

It stops when every home the devices found closed `rounds` rounds, after
`duration_s`, or when `stop()` is called (the CLI calls it on Ctrl-C and
SIGTERM), then cancels every device (each closes its connections) and returns a
`SimReport`. Progress snapshots go to `on_progress` once per `progress_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from agent.sim.attacks import FleetAttack
from agent.sim.connections import Connections
from agent.sim.device import Fleet, VirtualDevice
from agent.sim.models import ModelCache
from agent.sim.options import SimOptions
from agent.sim.schedule import plan_fleet
from agent.sim.stats import LATENCY_KINDS, LOOP_LAG, FleetStats, LatencySummary, Receipt, RoundStats
from agent.sim.trainers import make_trainer
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.retry import RetryPolicy
from proto.wire import STREAM_TIMEOUT_S

log = logging.getLogger("strata.sim")

# devices get this long to close their connections once the simulation stops
STOP_GRACE_S = 10.0
# how often the run checks its stop conditions (and measures its own loop's lag)
_TICK_S = 0.25
# a stalled upload declares this many bytes and sends none of them
STALLED_DECLARED_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Progress:
    elapsed_s: float
    agents: int
    online: int
    joined: int
    # home id -> (latest round seen, devices there now)
    homes: dict[str, tuple[int | None, int]]
    acknowledged: int
    refused: int
    errors: int
    stalled_open: int
    # since the previous snapshot
    heartbeat: LatencySummary
    join: LatencySummary
    # how late this process's own loop ran: its client-side latencies include this much queueing
    loop_lag: LatencySummary


@dataclass(frozen=True, kw_only=True)
class SimReport:
    options: SimOptions
    seconds: float
    stopped_by: str
    # when the run stopped, before the devices left
    online_at_end: int
    joined: int
    homes: dict[str, int]
    rounds: list[RoundStats]
    latency: dict[str, LatencySummary]
    counts: dict[str, int]
    refusals: dict[str, int]
    errors: dict[str, int]
    bytes: dict[str, int]
    models_decoded: int
    receipts: list[Receipt] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "agents": o.agents,
            "trainer": o.trainer,
            "seeds": list(o.seeds),
            "federation": o.federation,
            "seconds": round(self.seconds, 2),
            "stopped_by": self.stopped_by,
            "online_at_end": self.online_at_end,
            "joined": self.joined,
            "homes": self.homes,
            "rounds": [r.to_json() for r in self.rounds],
            "latency_ms": {kind: summary.to_json() for kind, summary in self.latency.items()},
            "counts": self.counts,
            "refusals": self.refusals,
            "errors": self.errors,
            "bytes": self.bytes,
            "models_decoded": self.models_decoded,
            "behaviour": {
                "ramp_s": round(o.effective_ramp_s, 2),
                "leave_rate_per_min": o.leave_rate,
                "join_rate_per_min": o.join_rate,
                "dropout": o.dropout,
                "stragglers": o.stragglers,
                "straggler_delay": str(o.straggler_delay),
                "relay": o.relay,
                "relay_share": o.relay_share,
                "partition": o.partition if o.trainer not in ("none", "noise") else None,
                "alpha": o.alpha if o.trainer not in ("none", "noise") else None,
                "connections": o.connections or "one per device",
                "stalled_uploads": o.stalled_uploads,
                "attack": {"name": o.attack.name, "attackers": o.attack.share, "scale": o.attack.scale, "z": o.attack.z}
                if o.attack.active
                else None,
            },
        }


class Simulation:
    def __init__(
        self,
        options: SimOptions,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        progress_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.stats = FleetStats()
        self._on_progress = on_progress
        self._progress_s = progress_s
        self._clock = clock
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped_by = ""
        self._stalled_open = 0

    # ------------------------------------------------------------------ control

    def stop(self, why: str = "stopped") -> None:
        """Stop the run (from any thread, or a signal handler on the loop)."""
        if not self._stopped_by:
            self._stopped_by = why
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def _done(self, started: float) -> str:
        options = self.options
        if options.duration_s and self._clock() - started >= options.duration_s:
            return "duration"
        if options.rounds and options.trainer != "none":
            homes = self.stats.ledger.homes()
            if homes and all(self.stats.ledger.rounds_closed(h) >= options.rounds for h in homes):
                return "rounds"
        return ""

    # ------------------------------------------------------------------ the run

    async def run(self) -> SimReport:
        options = self.options
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stopped_by:  # stop() before the loop existed
            self._stop.set()
        connections = Connections(shared=options.connections)
        executor = ThreadPoolExecutor(max_workers=options.train_workers, thread_name_prefix="strata-sim-train")
        fleet = Fleet(
            options=options,
            stats=self.stats,
            models=ModelCache(),
            connections=connections,
            trainer=make_trainer(options),
            executor=executor,
            retry=RetryPolicy(base_s=options.backoff_base_s, max_s=options.backoff_max_s),
            clock=self._clock,
        )
        plans = plan_fleet(options)
        if options.attack.active:
            fleet.attack = FleetAttack(
                options.attack, devices=len(plans), attackers=sum(p.hostile for p in plans), seed=options.seed
            )
        devices = [VirtualDevice(plan, fleet) for plan in plans]
        started = self._clock()
        tasks = [asyncio.ensure_future(device.live()) for device in devices]
        tasks += [asyncio.ensure_future(self._stalled_upload(connections, i)) for i in range(options.stalled_uploads)]
        try:
            await self._watch_progress(fleet, started, tasks)
            # the fleet as it stood when the run stopped, before every device leaves
            report = self._report(fleet, started)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            await connections.close()
            executor.shutdown(wait=False, cancel_futures=True)
        return report

    async def _watch_progress(self, fleet: Fleet, started: float, tasks: list[asyncio.Task[None]]) -> None:
        assert self._stop is not None
        marks = {kind: self.stats.latency[kind].mark() for kind in ("heartbeat", "join", LOOP_LAG)}
        next_progress = self._clock() + self._progress_s
        while not self._stop.is_set():
            asleep = self._clock()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=_TICK_S)
            except TimeoutError:
                self.stats.latency[LOOP_LAG].add(max(0.0, self._clock() - asleep - _TICK_S))
            why = self._done(started)
            if why:
                self._stopped_by = self._stopped_by or why
                return
            crashed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            if crashed:
                raise crashed[0].exception()  # type: ignore[misc]  # a simulator bug: end the run loudly
            if self._on_progress is not None and self._clock() >= next_progress:
                next_progress += self._progress_s
                self._on_progress(self._progress(fleet, started, marks))
                marks = {kind: self.stats.latency[kind].mark() for kind in marks}

    def _progress(self, fleet: Fleet, started: float, marks: dict[str, int]) -> Progress:
        stats = self.stats
        return Progress(
            elapsed_s=self._clock() - started,
            agents=self.options.agents,
            online=fleet.online,
            joined=len(fleet.joined),
            homes={h: (stats.ledger.latest_round(h), len(fleet.homes.get(h, ()))) for h in sorted(fleet.homes)},
            acknowledged=stats.counts["acknowledged"],
            refused=sum(stats.refusals.values()),
            errors=sum(stats.errors.values()),
            stalled_open=self._stalled_open,
            heartbeat=stats.latency["heartbeat"].since(marks["heartbeat"]),
            join=stats.latency["join"].since(marks["join"]),
            loop_lag=stats.latency[LOOP_LAG].since(marks[LOOP_LAG]),
        )

    def _report(self, fleet: Fleet, started: float) -> SimReport:
        stats = self.stats
        return SimReport(
            options=self.options,
            seconds=self._clock() - started,
            stopped_by=self._stopped_by or "stopped",
            online_at_end=fleet.online,
            joined=len(fleet.joined),
            homes={h: len(members) for h, members in sorted(fleet.homes.items())},
            rounds=stats.ledger.rounds(),
            latency={kind: stats.latency[kind].summary() for kind in (*LATENCY_KINDS, LOOP_LAG)},
            counts=dict(stats.counts),
            refusals=dict(stats.refusals),
            errors=dict(stats.errors),
            bytes=dict(stats.bytes),
            models_decoded=fleet.models.decodes,
            receipts=list(stats.receipts),
        )

    # ------------------------------------------------------------------ misbehaving clients

    async def _stalled_upload(self, connections: Connections, index: int) -> None:
        """A client that opens SubmitUpdate, sends a header and then nothing; when the home refuses the
        stalled stream, it does it again."""
        options = self.options
        channel = connections.open(options.seeds[index % len(options.seeds)])
        stub = pb_grpc.AgentServiceStub(channel)
        header = pb.UpdateHeader(
            agent_id=f"{options.id_prefix}-stall-{index:05d}",
            federation=options.federation,
            weights_size=STALLED_DECLARED_BYTES,
            kind="local",
        )
        try:
            while True:
                call = stub.SubmitUpdate(timeout=STREAM_TIMEOUT_S)
                try:
                    await call.write(pb.UpdateChunk(header=header))
                    self._stalled_open += 1
                    try:
                        reply = await call  # never done_writing: the home must give up on us
                    finally:
                        self._stalled_open -= 1
                    self.stats.counts[f"stalled_upload_refused:{reply.reason or 'accepted'}"] += 1
                except grpc.aio.AioRpcError as exc:
                    self.stats.error("stalled_upload", exc.code())
                    await asyncio.sleep(1.0)
        finally:
            await connections.release(channel)
