"""`strata simulate`: thousands of virtual devices in one process against real aggregators.

Parse → `agent.sim.Simulation` → render. With `--start-fleet K` it first starts a
coordinator, K aggregators (and a relay when part of the fleet is behind one) as
child processes through `strata.supervise`, like `strata demo` does, and stops
them afterwards, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from strata.cli_common import EXIT_INTERRUPTED, EXIT_OK, add_json_option, print_json

FLEET_DIR = Path("~/.strata/simulate")


def register(commands: argparse._SubParsersAction) -> None:
    sim = commands.add_parser(
        "simulate",
        help="run thousands of virtual devices against real aggregators, from one process",
        description="Virtual devices on one asyncio loop speak AgentService exactly as agent daemons do: "
        "join (following redirects), watch, heartbeat at the interval the aggregator hands out, download "
        "(each model decoded once and shared), train, and submit signed updates. Reports per-round "
        "participation, round time, latency percentiles, refusals and bytes moved. Stops after --rounds, "
        "--duration, or on Ctrl-C.",
    )
    sim.add_argument("--seeds", default="127.0.0.1:7070", help="aggregator addresses to join through, comma-separated")
    sim.add_argument("--agents", type=int, default=1000, help="virtual devices (default: 1000)")
    sim.add_argument("--federation", default="digits", help="federation (default: digits)")
    sim.add_argument(
        "--trainer", default="noise",
        help="none (join, watch, heartbeat only), noise (base + noise: cheap) or a built-in task: digits, mnist, fashion_mnist (default: noise)",
    )
    sim.add_argument("--rounds", type=int, default=0, help="stop once every home closed this many rounds")
    sim.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds")
    sim.add_argument("--ramp", type=float, default=None, help="spread first joins over this many seconds (default: agents/500)")
    churn = sim.add_argument_group("fleet behaviour")
    churn.add_argument("--leave-rate", type=float, default=0.0, help="churn: an online device leaves with this rate per minute")
    churn.add_argument("--join-rate", type=float, default=6.0, help="churn: a device that left comes back with this rate per minute")
    churn.add_argument("--dropout", type=float, default=0.0, help="chance an upload breaks off mid-stream (then resent)")
    churn.add_argument("--stragglers", type=float, default=0.0, help="share of devices that are stragglers")
    churn.add_argument(
        "--straggler-delay", default="exp:5",
        help="their extra delay: fixed:S, uniform:A:B, exp:MEAN or lognormal:MEDIAN:SIGMA (default: exp:5)",
    )
    churn.add_argument("--relay", default="", help="a relay's address (started for you with --start-fleet)")
    churn.add_argument("--relay-share", type=float, default=0.0, help="share of devices behind the relay")
    churn.add_argument("--partition", default="dirichlet", help="task trainers: iid, dirichlet or shards (default: dirichlet)")
    churn.add_argument("--alpha", type=float, default=0.5, help="task trainers: Dirichlet alpha (default: 0.5)")
    churn.add_argument("--stalled-uploads", type=int, default=0, help="misbehaving clients holding stalled SubmitUpdate streams")
    hostile = sim.add_argument_group("attacks")
    hostile.add_argument(
        "--attack", default="",
        help="what hostile devices send: sign_flip, scale, gaussian, label_flip (task trainers), little_is_enough, inflate_samples",
    )
    hostile.add_argument("--attackers", type=float, default=0.0, help="share of devices that are hostile (e.g. 0.2)")
    hostile.add_argument(
        "--attack-scale", type=float, default=10.0,
        help="scale: the factor (10, 100); gaussian: the noise std; inflate_samples: the claim multiplier (default: 10)",
    )
    hostile.add_argument("--attack-z", type=float, default=0.0, help="little_is_enough's z (default 0: Baruch et al.'s z_max)")
    wire = sim.add_argument_group("simulator")
    wire.add_argument("--connections", type=int, default=0, help="share N gRPC connections per address (default 0: one per device)")
    wire.add_argument("--train-workers", type=int, default=2, help="threads for training (default: 2)")
    wire.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same fleet")
    wire.add_argument("--id-prefix", default="sim", help="agent ids are PREFIX-00000, PREFIX-00001, … (default: sim)")
    wire.add_argument("--progress", type=float, default=2.0, help="seconds between progress lines on stderr (default: 2)")
    wire.add_argument(
        "--receipts", default="", metavar="PATH",
        help="write every acknowledged update (agent, home, base, update CID, round) to PATH, one JSON object a line, "
        "to check against the aggregators' journals",
    )
    fleet = sim.add_argument_group("--start-fleet")
    fleet.add_argument("--start-fleet", type=int, default=0, metavar="K", help="start a coordinator and K aggregators first")
    fleet.add_argument("--quorum", type=float, default=0.8, help="their round.quorum (default: 0.8)")
    fleet.add_argument("--deadline", type=float, default=30.0, help="their round.deadline_s (default: 30)")
    fleet.add_argument(
        "--heartbeat", type=float, default=5.0,
        help="their serving.heartbeat_interval_s, the shortest interval they hand out (default: 5)",
    )
    fleet.add_argument(
        "--fleet-set", action="append", default=[], metavar="KEY=VALUE", help="any other aggregator config key (repeatable)"
    )
    add_json_option(sim)
    sim.set_defaults(handler=cmd_simulate)


def _options(args: argparse.Namespace, seeds: Sequence[str], relay: str) -> Any:
    from agent.sim import Delay, SimOptions
    from agent.sim.attacks import AttackOptions

    return SimOptions(
        seeds=tuple(seeds),
        agents=args.agents,
        federation=args.federation,
        trainer=args.trainer,
        rounds=args.rounds,
        duration_s=args.duration,
        ramp_s=args.ramp,
        leave_rate=args.leave_rate,
        join_rate=args.join_rate,
        dropout=args.dropout,
        stragglers=args.stragglers,
        straggler_delay=Delay.parse(args.straggler_delay),
        relay=relay,
        relay_share=args.relay_share,
        partition=args.partition,
        alpha=args.alpha,
        connections=args.connections,
        stalled_uploads=args.stalled_uploads,
        train_workers=args.train_workers,
        seed=args.seed,
        id_prefix=args.id_prefix,
        attack=AttackOptions(name=args.attack, share=args.attackers, scale=args.attack_scale, z=args.attack_z),
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from strata.logs import setup_logging

    setup_logging("warning")
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    relay = args.relay
    local: LocalFleet | None = None
    out = sys.stderr
    # check the options before starting anything (a relay --start-fleet will start counts as given)
    _options(args, seeds, relay or ("(to be started)" if args.start_fleet and args.relay_share else ""))
    try:
        if args.start_fleet:
            local = LocalFleet(
                aggregators=args.start_fleet,
                federation=args.federation,
                task=_base_task(args.trainer),
                relay_devices=round(args.relay_share * args.agents) if not relay else 0,
                settings={
                    "round.quorum": args.quorum,
                    "round.deadline_s": args.deadline,
                    "serving.heartbeat_interval_s": args.heartbeat,
                    **dict(_key_value(item) for item in args.fleet_set),
                },
                say=lambda text: print(text, file=out, flush=True),
            )
            local.start()
            seeds, relay = local.seeds, relay or local.relay
        report = _run(_options(args, seeds, relay), progress_s=args.progress, out=out)
    finally:
        if local is not None:
            print("stopping the fleet …", file=out, flush=True)
            local.stop()
    if args.receipts:
        write_receipts(Path(args.receipts).expanduser(), report.receipts)
    if args.json:
        summary = report.to_json()
        if local is not None:
            summary["fleet"] = {"dir": str(local.dir), "seeds": local.seeds, "relay": local.relay}
        print_json(summary)
    else:
        print(report_text(report))
    return EXIT_INTERRUPTED if report.stopped_by == "interrupted" else EXIT_OK


def write_receipts(path: Path, receipts: Sequence[Any]) -> None:
    """One JSON object per acknowledged update, written whole before it is renamed into place."""
    import dataclasses
    import json

    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for receipt in receipts:
            out.write(json.dumps(dataclasses.asdict(receipt), sort_keys=True) + "\n")
    partial.replace(path)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        from proto.errors import InvalidInput

        raise InvalidInput(f"--fleet-set wants KEY=VALUE, got {item!r}", reason="bad_argument")
    return key.strip(), value


def _base_task(trainer: str) -> str:
    """The built-in task whose seeded weights a started fleet begins from."""
    from agent.tasks import BUILTIN_TASKS

    return trainer if trainer in BUILTIN_TASKS else "digits"


def _run(options: Any, *, progress_s: float, out: TextIO) -> Any:
    from agent.sim import Simulation

    simulation = Simulation(options, on_progress=lambda p: print(progress_line(p), file=out, flush=True), progress_s=progress_s)

    async def main() -> Any:
        loop = asyncio.get_running_loop()

        def interrupted(signum: int) -> None:
            # the first Ctrl-C stops cleanly and reports; a second one is Python's own (KeyboardInterrupt)
            loop.remove_signal_handler(signum)
            simulation.stop("interrupted")

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, interrupted, signum)
        try:
            return await simulation.run()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    ramp = options.effective_ramp_s
    print(
        f"simulating {options.agents} devices ({options.trainer}) against {', '.join(options.seeds)}; "
        f"joins spread over {ramp:.1f} s; Ctrl-C stops and reports",
        file=out,
        flush=True,
    )
    return asyncio.run(main())


# ---------------------------------------------------------------- rendering


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def progress_line(p: Any) -> str:
    homes = "  ".join(f"{home} r{rnd if rnd is not None else '-'}:{n}" for home, (rnd, n) in list(p.homes.items())[:6])
    more = f" +{len(p.homes) - 6} homes" if len(p.homes) > 6 else ""
    stalled = f"  stalled {p.stalled_open}" if p.stalled_open else ""
    return (
        f"[{p.elapsed_s:6.1f}s] online {p.online}/{p.agents}  {homes}{more}  acked {p.acknowledged}  "
        f"refused {p.refused}  errors {p.errors}{stalled}  hb p99 {_ms(p.heartbeat.p99_ms)} ms  "
        f"join p99 {_ms(p.join.p99_ms)} ms  lag p99 {_ms(p.loop_lag.p99_ms)} ms"
    )


def report_text(report: Any) -> str:
    o = report.options
    learning = any("base_accuracy" in r.metric_sums for r in report.rounds)
    lines = [
        f"simulated   {o.agents} devices ({o.trainer}) for {report.seconds:.1f} s against {', '.join(o.seeds)}; "
        f"stopped by {report.stopped_by}",
        f"online      {report.online_at_end} at the end; {report.joined} ever joined; homes: "
        + (", ".join(f"{h} {n}" for h, n in report.homes.items()) or "none"),
        "",
        f"{'home':<12} {'round':>5} {'devices':>7} {'invited':>7} {'accepted':>8} {'dup':>4} {'refused':>7} {'particip.':>9} {'round s':>8}"
        + (f" {'base acc':>8}" if learning else "")
        + "  model",
    ]
    for r in report.rounds:
        part = f"{r.accepted / r.devices:.3f}" if r.devices else "-"
        round_s = f"{r.round_s:.2f}" if r.round_s is not None else "open"
        accuracy = r.metrics().get("base_accuracy")
        lines.append(
            f"{r.home:<12} {r.round:>5} {r.devices:>7} {r.invited:>7} {r.accepted:>8} {r.duplicates:>4} {sum(r.refused.values()):>7} "
            f"{part:>9} {round_s:>8}"
            + (f" {accuracy:>8.3f}" if accuracy is not None else f" {'-':>8}" if learning else "")
            + f"  {r.model[:14] + '…' if r.model else '-'}"
        )
    lines += ["", f"{'latency ms':<12} {'count':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"]
    for kind, s in report.latency.items():
        lines.append(f"{kind:<12} {s.count:>7} {_ms(s.p50_ms):>7} {_ms(s.p95_ms):>7} {_ms(s.p99_ms):>7} {_ms(s.max_ms):>7}")
    lines.append("")
    lines.append("refusals    " + (", ".join(f"{k} {v}" for k, v in sorted(report.refusals.items())) or "none"))
    lines.append("errors      " + (", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"))
    lines.append("bytes       " + (", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(report.bytes.items())) or "none"))
    lines.append(f"models      {report.models_decoded} decoded once and shared by every device")
    lines.append("counts      " + ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items())))
    return "\n".join(lines)


# ---------------------------------------------------------------- --start-fleet


@dataclass
class LocalFleet:
    """A coordinator, K aggregators and optionally a relay, as child processes (strata.supervise)."""

    aggregators: int
    federation: str
    task: str
    relay_devices: int
    settings: dict[str, Any]
    say: Any

    def __post_init__(self) -> None:
        from strata.demo.fleet import AGGREGATOR_NAMES
        from strata.supervise import Supervisor

        if not 1 <= self.aggregators <= len(AGGREGATOR_NAMES):
            from proto.errors import InvalidInput

            raise InvalidInput(f"--start-fleet must be 1..{len(AGGREGATOR_NAMES)}", reason="bad_argument")
        self.dir = FLEET_DIR.expanduser()
        self.supervisor = Supervisor(self.dir / "logs")
        self.seeds: list[str] = []
        self.relay = ""

    def start(self) -> None:
        from aggregator.config import AggregatorConfig
        from coordinator.config import CoordinatorConfig
        from storage.open import open_store
        from strata.cmd_model import operator_key
        from strata.config import load_config
        from strata.demo.fleet import AGGREGATOR_NAMES
        from strata.supervise import free_port, wait_for_port
        from strata.wiring import task_base_model

        for sub in ("aggregators", "coordinator", "relay", "config", "logs", "store"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        (self.dir / "config").mkdir(parents=True, exist_ok=True)
        store = str(self.dir / "store")
        coordinator_port = free_port()
        coordinator = f"127.0.0.1:{coordinator_port}"
        self._run("coordinator", ["coordinator", "serve"], CoordinatorConfig(listen=coordinator, state_dir=str(self.dir / "coordinator")))
        with open_store(store) as opened:
            base = task_base_model(opened, operator_key(), task=self.task, federation=self.federation)
        wait_for_port("127.0.0.1", coordinator_port, 30)
        ports = [free_port() for _ in range(self.aggregators)]
        for name, port in zip(AGGREGATOR_NAMES, ports, strict=False):
            agg_id = f"agg-{name}"
            config = load_config(
                AggregatorConfig,
                None,
                env={},
                overrides={
                    "id": agg_id,
                    "listen": f"127.0.0.1:{port}",
                    "federation": self.federation,
                    "initial_model": base,
                    "state_dir": str(self.dir / "aggregators" / agg_id),
                    "store": store,
                    "coordinator": coordinator,
                    **{k: str(v) for k, v in self.settings.items()},
                },
            )
            self._run(agg_id, ["aggregator", "serve"], config)
        for port in ports:
            wait_for_port("127.0.0.1", port, 60)
        self.seeds = [f"127.0.0.1:{port}" for port in ports]
        self._wait_for_ring(coordinator)
        self.say(f"fleet         coordinator {coordinator}; aggregators {', '.join(self.seeds)}; logs {self.supervisor.log_dir}")
        if self.relay_devices:
            self._start_relay()

    def _wait_for_ring(self, coordinator: str, timeout_s: float = 30.0) -> None:
        """Every aggregator on the coordinator's ring, so devices are placed on the whole ring at once."""
        from coordinator.client import CoordinatorClient
        from proto.errors import StrataError, Unavailable

        give_up = time.monotonic() + timeout_s
        with CoordinatorClient(coordinator) as client:
            while time.monotonic() < give_up:
                self.supervisor.check_alive()
                try:
                    if len(client.ring(self.federation).members) >= self.aggregators:
                        return
                except StrataError:
                    pass
                time.sleep(0.2)
        raise Unavailable(f"the ring did not reach {self.aggregators} aggregators within {timeout_s:.0f} s", reason="start_timeout")

    def _start_relay(self) -> None:
        from intake.config import ServingSettings
        from relay.config import RelayConfig, WindowSettings
        from strata.supervise import free_port, wait_for_port

        port = free_port()
        self.relay = f"127.0.0.1:{port}"
        state_dir = self.dir / "relay"
        config = RelayConfig(
            id="relay-1",
            seeds=list(self.seeds),
            listen=self.relay,
            federation=self.federation,
            state_dir=str(state_dir),
            store=str(state_dir / "store"),
            window=WindowSettings(max_devices=max(1, self.relay_devices), max_wait_s=float(self.settings["round.deadline_s"]) / 2),
            serving=ServingSettings(heartbeat_interval_s=float(self.settings["serving.heartbeat_interval_s"])),
        )
        self._run("relay", ["relay", "serve"], config)
        wait_for_port("127.0.0.1", port, 60)
        self.say(f"relay         relay-1={self.relay} for {self.relay_devices} devices")

    def _run(self, name: str, command: list[str], config: object) -> None:
        from strata.config import dump_config

        path = self.dir / "config" / f"{name}.yaml"
        path.write_text(dump_config(config))
        self.supervisor.start(name, [*command, "--config", str(path)])

    def stop(self) -> None:
        self.supervisor.stop_all()
