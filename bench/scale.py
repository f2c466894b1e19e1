"""Scale: one aggregator (a real process) holding 1k / 5k / 10k connected devices, and 1,000 stalled uploads.

Run alone: `python bench/scale.py` (`--quick` for a smoke run: 10 and 500 devices).

Each phase starts a fresh aggregator process (`strata aggregator serve`, its own state
and store) and a fresh `strata simulate --trainer none` process: N virtual devices,
each with its own gRPC connection, joined (through redirects when there are any),
a WatchModels stream open, heartbeating at the interval the aggregator hands out.
Once the aggregator counts all N as active and every device heartbeated once, this
process probes it from its own connection for `--probe-s` seconds: Join (a new agent
id each time) or Heartbeat, chosen at random, 40 calls a second. The aggregator's RSS
is sampled (psutil on its PID) throughout.

Phases: `baseline` (10 devices), then each size, then `stalled` (10 devices plus
1,000 misbehaving clients that each open SubmitUpdate, send a header, and stop).
Ratios are against the baseline of the same run. Targets: 10,000 devices, Join p99
< 250 ms, Heartbeat p99 < 100 ms, aggregator RSS < 1.5 GB.

`--profile` also records the aggregator with py-spy during each probe window
(`py-spy` on PATH or `--py-spy PATH`), native frames included, writing
bench/scale-<phase>.speedscope.json. py-spy then stops the aggregator for each
sample, so a profiled run's latencies are not the ones to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import _common
import psutil
from _common import percentile, print_table

from aggregator.config import AggregatorConfig, RoundSettings
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import create_channel
from strata.config import dump_config
from strata.supervise import free_port, wait_for_port

JOIN_P99_TARGET_MS = 250.0
HEARTBEAT_P99_TARGET_MS = 100.0
RSS_TARGET_MB = 1500.0
PROBE_PERIOD_S = 0.025  # 40 probe calls a second, each a Join or a Heartbeat at random


@dataclass
class Phase:
    name: str
    agents: int
    stalled: int = 0


@dataclass
class Result:
    phase: Phase
    join_ms: list[float] = field(default_factory=list)
    heartbeat_ms: list[float] = field(default_factory=list)
    probe_errors: int = 0
    rss_mb: list[float] = field(default_factory=list)
    agg_cpu_s: float = 0.0
    sim_cpu_s: float = 0.0
    wall_s: float = 0.0
    connect_s: float = 0.0
    # the heartbeat interval the aggregator handed out once every device was connected
    interval_s: float = 0.0
    # each simulator process's `strata simulate --json` report
    sims: list[dict] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    def sim_worst(self, kind: str, field_: str = "p99_ms") -> float | None:
        """The worst of the simulator processes' own `kind` latency figure."""
        values = [s.get("latency_ms", {}).get(kind, {}).get(field_) for s in self.sims]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    def sim_errors(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for report in self.sims:
            for key, count in (report.get("errors") or {}).items():
                total[key] = total.get(key, 0) + count
        return total

    def p(self, kind: str, fraction: float) -> float:
        values = getattr(self, f"{kind}_ms")
        return percentile(values, fraction) if values else float("nan")


def _python() -> list[str]:
    return [sys.executable, "-m", "strata"]


def _active_agents(metrics_port: int) -> int:
    """The aggregator's count of active agents, from its metrics endpoint; -1 when it did not answer in time."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=15) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("strata_aggregator_active_agents "):
                    return int(float(line.split()[1]))
    except OSError:  # a busy aggregator's metrics thread may miss the timeout: ask again
        return -1
    return 0


class Probe:
    """Join or Heartbeat from this process's own connection, at random, at a fixed rate."""

    def __init__(self, address: str, result: Result) -> None:
        self._channel = create_channel(address)
        self._stub = pb_grpc.AgentServiceStub(self._channel)
        self._result = result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._stub.Join(pb.JoinRequest(agent_id="probe-hb", capability=pb.INFERENCE, federation="digits"), timeout=30)

    def _run(self) -> None:
        count = 0
        next_at = time.perf_counter()
        coin = random.Random(0)
        while not self._stop.is_set():
            count += 1
            started = time.perf_counter()
            try:
                # Join or Heartbeat at random, not in turn: a stall one kind of call leaves behind
                # (a collection its allocations triggered) must not always land on the other kind
                if coin.random() < 0.5:
                    request = pb.JoinRequest(agent_id=f"probe-{count:06d}", capability=pb.INFERENCE, federation="digits")
                    self._stub.Join(request, timeout=30)
                    self._result.join_ms.append((time.perf_counter() - started) * 1000)
                else:
                    self._stub.Heartbeat(pb.HeartbeatRequest(agent_id="probe-hb", federation="digits"), timeout=30)
                    self._result.heartbeat_ms.append((time.perf_counter() - started) * 1000)
            except Exception:  # noqa: BLE001 - a failed probe is counted, the run goes on
                self._result.probe_errors += 1
            next_at += PROBE_PERIOD_S
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def interval(self) -> float:
        """The heartbeat interval the aggregator hands out now (it grows with the fleet)."""
        reply = self._stub.Heartbeat(pb.HeartbeatRequest(agent_id="probe-hb", federation="digits"), timeout=60)
        return reply.next_interval_s

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=35)
        self._channel.close()


def run_phase(
    phase: Phase, root: Path, *, probe_s: float, heartbeat_s: float, sim_processes: int, profile: str | None
) -> Result:
    result = Result(phase=phase)
    work = root / phase.name
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    config = AggregatorConfig(
        id="agg-scale",
        listen=address,
        federation="digits",
        initial_model="task:digits",
        state_dir=str(work / "state"),
        store=str(work / "store"),
        round=RoundSettings(min_updates=1_000_000, deadline_s=3600.0),
        serving=ServingSettings(heartbeat_interval_s=heartbeat_s),
        metrics_port=metrics_port,
        log_level="warning",
    )
    work.mkdir(parents=True)
    (work / "aggregator.yaml").write_text(dump_config(config))
    logs: list = []

    def log(name: str):  # noqa: ANN202
        logs.append(open(work / f"{name}.log", "wb"))  # noqa: SIM115 - closed below
        return logs[-1]

    aggregator = subprocess.Popen(
        [*_python(), "aggregator", "serve", "--config", str(work / "aggregator.yaml")],
        stdout=log("aggregator"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    sims: list[subprocess.Popen] = []
    try:
        wait_for_port("127.0.0.1", port, 60)
        wait_for_port("127.0.0.1", metrics_port, 30)
        agg = psutil.Process(aggregator.pid)
        cpu_before = sum(agg.cpu_times()[:2])
        started = time.monotonic()
        count = max(1, min(sim_processes, phase.agents))
        for k in range(count):
            share = phase.agents // count + (k < phase.agents % count)
            stalled = phase.stalled // count + (k < phase.stalled % count)
            sims.append(subprocess.Popen(
                [
                    *_python(), "simulate", "--seeds", address, "--agents", str(share), "--trainer", "none",
                    "--stalled-uploads", str(stalled), "--id-prefix", f"scale-{phase.name}-{k}", "--seed", str(k),
                    "--progress", "5", "--json",
                ],
                stdout=log(f"sim-{k}.out"), stderr=log(f"sim-{k}.err"), start_new_session=True,
            ))
        sim_processes_ps = [psutil.Process(sim.pid) for sim in sims]
        expected = phase.agents  # (the probe's own agent may count too, or have timed out meanwhile)
        give_up = started + phase.agents / 250 + 120
        probe = Probe(address, result)
        while _active_agents(metrics_port) < expected:
            if time.monotonic() > give_up or any(sim.poll() is not None for sim in sims):
                raise SystemExit(f"{phase.name}: only {_active_agents(metrics_port)} of {expected} devices became active")
            time.sleep(0.5)
        result.connect_s = time.monotonic() - started
        # every device's first heartbeat falls within one interval of its join: wait that out
        result.interval_s = probe.interval()
        time.sleep(result.interval_s + 2)
        spy = _start_profile(profile, aggregator.pid, probe_s, Path(__file__).parent / f"scale-{phase.name}.speedscope.json")
        probe.start()
        until = time.monotonic() + probe_s
        while time.monotonic() < until:
            result.rss_mb.append(agg.memory_info().rss / _common.MIB)
            result.load.append(os.getloadavg()[0])
            time.sleep(1.0)
        probe.stop()
        if spy is not None:
            spy.wait(timeout=probe_s + 60)
        result.rss_mb.append(agg.memory_info().rss / _common.MIB)
        result.agg_cpu_s = sum(agg.cpu_times()[:2]) - cpu_before
        result.sim_cpu_s = sum(sum(ps.cpu_times()[:2]) for ps in sim_processes_ps)
        result.wall_s = time.monotonic() - started
        for sim in sims:
            sim.send_signal(signal.SIGINT)
        for sim in sims:
            sim.wait(timeout=120)
        for handle in logs:
            handle.flush()
        result.sims = [json.loads((work / f"sim-{k}.out.log").read_text()) for k in range(count)]
    finally:
        for process in (*sims, aggregator):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        for handle in logs:
            handle.close()
    return result


def _start_profile(profile: str | None, pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    if profile is None:
        return None
    return subprocess.Popen(
        [profile, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "speedscope", "--native",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 500 devices, short probes")
    parser.add_argument("--sizes", default="1000,5000,10000", help="fleet sizes (default: 1000,5000,10000)")
    parser.add_argument("--stalled", type=int, default=1000, help="stalled uploads in the last phase (0: skip it)")
    parser.add_argument("--probe-s", type=float, default=20.0, help="seconds of probing per phase (default: 20)")
    parser.add_argument(
        "--heartbeat-s", type=float, default=5.0,
        help="the aggregator's serving.heartbeat_interval_s; it hands out longer ones as the fleet grows (default: 5)",
    )
    parser.add_argument(
        "--sim-processes", type=int, default=1,
        help="split each phase's devices over this many `strata simulate` processes (default: 1)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the aggregator during each probe window")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", help="the py-spy executable")
    args = parser.parse_args()
    sizes = [500] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    probe_s = 8.0 if args.quick else args.probe_s
    phases = [Phase("baseline", 10)] + [Phase(f"{n}", n) for n in sizes]
    if args.stalled:
        phases.append(Phase("stalled", 10, stalled=100 if args.quick else args.stalled))
    root = Path(tempfile.mkdtemp(prefix="strata-bench-scale-"))
    os.environ["HOME"] = str(root / "home")  # the daemons' defaults (~/.strata) stay in here
    results = []
    try:
        for phase in phases:
            print(f"phase {phase.name}: {phase.agents} devices, {phase.stalled} stalled uploads …", file=sys.stderr, flush=True)
            results.append(
                run_phase(
                    phase, root / "runs", probe_s=probe_s, heartbeat_s=args.heartbeat_s, sim_processes=args.sim_processes,
                    profile=args.py_spy if args.profile else None,
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results[0]
    rows = []
    for r in results:
        rows.append([
            r.phase.name,
            r.phase.agents,
            r.phase.stalled,
            f"{r.connect_s:.1f}",
            f"{r.interval_s:g}",
            f"{r.p('join', 0.5):.1f}",
            f"{r.p('join', 0.99):.1f}",
            f"{r.p('join', 0.99) / base.p('join', 0.99):.2f}",
            f"{r.p('heartbeat', 0.5):.1f}",
            f"{r.p('heartbeat', 0.99):.1f}",
            f"{r.p('heartbeat', 0.99) / base.p('heartbeat', 0.99):.2f}",
            f"{max(r.rss_mb):.0f}",
            f"{r.agg_cpu_s / r.wall_s:.2f}",
            f"{r.sim_cpu_s / r.wall_s:.2f}",
            _ms(r.sim_worst("heartbeat")),
            _ms(r.sim_worst("loop_lag")),
            r.probe_errors,
            f"{max(r.load):.1f}",
        ])
    print_table(
        ["phase", "devices", "stalled", "connect s", "HB every s", "Join p50", "Join p99", "x base", "HB p50", "HB p99", "x base",
         "agg RSS MiB", "agg cores", "sim cores", "fleet HB p99", "sim lag p99", "probe errors", "load"],
        rows,
    )
    print("Join and HB (Heartbeat) in ms, from the probe's own connection; fleet HB p99: the devices' own view over the "
          "whole run (ramp included), from `strata simulate --json`; sim lag: how late the simulator's own loop ran; "
          "cores: CPU seconds per wall second of the phase; "
          "load: the machine's highest 1-minute load average while probing (2 cores)")
    for r in results:
        errors = r.sim_errors()
        if errors:
            print(f"{r.phase.name:>9}: the devices saw " + ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())))
    for r in results:
        verdicts = [
            ("Join p99", r.p("join", 0.99), JOIN_P99_TARGET_MS),
            ("Heartbeat p99", r.p("heartbeat", 0.99), HEARTBEAT_P99_TARGET_MS),
            ("RSS", max(r.rss_mb), RSS_TARGET_MB),
        ]
        misses = [f"{name} {value:.0f} > {target:.0f}" for name, value, target in verdicts if not value < target]
        print(f"{r.phase.name:>9}: " + ("meets every target" if not misses else "MISSES " + "; ".join(misses)))
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    sys.exit(main())
