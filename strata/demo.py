"""`strata demo`: a whole fleet on this machine, training a real model on real data.

It starts a coordinator, N aggregators and M agents (grouped several per process)
as separate OS processes, places agents with the same consistent-hash ring the
aggregators use, gives each aggregator's agents a class-skewed share of the
digits data (so semi-global models matter), and follows every aggregator's round
journal. Each closed round is evaluated here, on a held-out test split no agent
trains on: the cluster model (this aggregator's agents only) and the semi-global
model (blended with peers). At the end it stops every process it started, also
on Ctrl-C, and prints the final model's CID and lineage.

All models go to the default store (~/.strata/store or $STRATA_STORE), so
`strata lineage <final_model>` works afterwards with no flags.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from aggregator.journal import Journal, RoundRecord
from coordinator.ring import Member, Ring
from proto.errors import InvalidInput, Unavailable
from storage.codec import decode_tensors
from storage.lineage import walk
from storage.models import load_model
from storage.open import open_store
from storage.store import ContentStore, default_store_path
from strata.supervise import Supervisor, free_port, wait_for_port

AGGREGATOR_NAMES = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    aggregators: int = 3
    agents: int = 12
    rounds: int = 10
    task: str = "digits"
    alpha: float = 0.5
    group_alpha: float = 0.3
    agent_processes: int = 2
    coordinator: bool = True
    relay_devices: int = 6
    inference_devices: int = 2
    timeout_s: float = 170.0
    home: Path = field(default_factory=lambda: Path.home() / ".strata")

    def __post_init__(self) -> None:
        if not 1 <= self.aggregators <= len(AGGREGATOR_NAMES):
            raise InvalidInput(f"--aggregators must be 1..{len(AGGREGATOR_NAMES)}", reason="bad_argument")
        if self.agents < self.aggregators:
            raise InvalidInput("--agents must be at least --aggregators (every aggregator needs agents)", reason="bad_argument")
        if self.rounds < 1:
            raise InvalidInput("--rounds must be >= 1", reason="bad_argument")
        if self.relay_devices and self.relay_devices <= self.inference_devices:
            raise InvalidInput("a relay needs more devices than inference-only ones", reason="bad_argument")


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    round: int
    aggregator: str
    participants: int
    accuracy: float
    loss: float
    model: str
    cluster_accuracy: float
    cluster_model: str
    kind: str


class Demo:
    def __init__(self, options: DemoOptions, *, out: IO[str], evaluate: Callable[[dict], dict[str, float]]) -> None:
        self.options = options
        self.out = out
        self.evaluate = evaluate
        self.dir = options.home / "demo"
        self.store_url = str(default_store_path())
        self.results: list[RoundResult] = []
        self.supervisor = Supervisor(self.dir / "logs")
        self.aggregators: list[Member] = []
        self._state_dirs: dict[str, Path] = {}
        self.relay_address = ""
        self.relay_state: Path | None = None
        self._seen: dict[str, int] = {}

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # ------------------------------------------------------------------ set-up

    def _fresh_dirs(self) -> None:
        for sub in ("aggregators", "agents", "coordinator", "config", "logs"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        (self.dir / "config").mkdir(parents=True, exist_ok=True)

    def _write_config(self, name: str, values: dict[str, Any]) -> Path:
        path = self.dir / "config" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def _base_model(self, store: ContentStore) -> str:
        from strata.cmd_model import operator_key
        from strata.wiring import task_base_model

        return task_base_model(store, operator_key(), task=self.options.task, federation=self.options.task)

    def _place_agents(self) -> dict[str, list[str]]:
        """Pick agent ids so each aggregator's arc holds an equal share (the same ring the fleet computes)."""
        ring = Ring(self.aggregators, version=1)
        per_home = {m.id: [] for m in self.aggregators}
        quota = -(-self.options.agents // self.options.aggregators)
        candidate = 0
        while sum(len(v) for v in per_home.values()) < self.options.agents:
            agent_id = f"demo-agent-{candidate:03d}"
            candidate += 1
            home = ring.owner(agent_id).id
            if len(per_home[home]) < quota:
                per_home[home].append(agent_id)
            if candidate > 10_000:
                raise InvalidInput("could not balance agents over the ring", reason="placement")
        return per_home

    def start(self) -> None:
        options = self.options
        self._fresh_dirs()
        with open_store(self.store_url) as store:
            base = self._base_model(store)
        self.say(f"base model {base} ({options.task}, seeded initial weights) in store {self.store_url}")

        coordinator_address = ""
        if options.coordinator:
            port = free_port()
            coordinator_address = f"127.0.0.1:{port}"
            config = self._write_config(
                "coordinator", {"listen": coordinator_address, "state_dir": str(self.dir / "coordinator")}
            )
            self.supervisor.start("coordinator", ["coordinator", "serve", "--config", str(config)])
            wait_for_port("127.0.0.1", port, 30)
            self.say(f"coordinator   {coordinator_address}")

        ports = [free_port() for _ in range(options.aggregators)]
        self.aggregators = [
            Member(id=f"agg-{AGGREGATOR_NAMES[i]}", address=f"127.0.0.1:{port}") for i, port in enumerate(ports)
        ]
        for member in self.aggregators:
            state_dir = self.dir / "aggregators" / member.id
            self._state_dirs[member.id] = state_dir
            values: dict[str, Any] = {
                "id": member.id,
                "listen": member.address,
                "federation": options.task,
                "initial_model": base,
                "state_dir": str(state_dir),
                "store": self.store_url,
                "round": {"quorum": 1.0, "min_updates": 1, "deadline_s": 10.0, "agent_timeout_s": 30.0},
                "synthesis": {"peers": "all", "decay": "exponential", "decay_params": {"half_life": 2.0}},
            }
            if coordinator_address:
                values["coordinator"] = coordinator_address
            else:
                values["peers"] = [f"{m.id}={m.address}" for m in self.aggregators]
            config = self._write_config(member.id, values)
            self.supervisor.start(member.id, ["aggregator", "serve", "--config", str(config)])
        for port in ports:
            wait_for_port("127.0.0.1", port, 60)
        self.say("aggregators   " + "  ".join(f"{m.id}={m.address}" for m in self.aggregators))

        homes = self._place_agents()
        agent_configs: list[Path] = []
        for group, member in enumerate(self.aggregators):
            ids = homes[member.id]
            for index, agent_id in enumerate(ids):
                agent_configs.append(
                    self._write_config(
                        agent_id,
                        {
                            "id": agent_id,
                            "seeds": [m.address for m in self.aggregators],
                            "federation": options.task,
                            "task": options.task,
                            "task_options": {
                                "partition": {
                                    "scheme": "dirichlet",
                                    "alpha": options.alpha,
                                    "groups": options.aggregators,
                                    "group": group,
                                    "group_alpha": options.group_alpha,
                                    "index": index,
                                    "count": len(ids),
                                },
                                "seed": index,
                            },
                            "state_dir": str(self.dir / "agents" / agent_id),
                            "max_rounds": options.rounds,
                            "backoff_max_s": 2.0,
                        },
                    )
                )
        processes = max(1, min(options.agent_processes, len(agent_configs)))
        for p in range(processes):
            mine = agent_configs[p::processes]
            args = ["agent", "run"]
            for path in mine:
                args += ["--config", str(path)]
            self.supervisor.start(f"agents-{p}", args)
        self.say(
            f"agents        {options.agents} in {processes} processes; "
            + ", ".join(f"{m.id}: {len(homes[m.id])}" for m in self.aggregators)
            + f" (class-skewed Dirichlet alpha={options.group_alpha} across aggregators)"
        )
        if options.relay_devices:
            self._start_relay()
        self.say(f"logs          {self.supervisor.log_dir}")

    def _start_relay(self) -> None:
        """One relay with low-power devices: small data, head-only training, some inference-only."""
        options = self.options
        port = free_port()
        self.relay_address = f"127.0.0.1:{port}"
        self.relay_state = self.dir / "relay"
        trainers = options.relay_devices - options.inference_devices
        config = self._write_config(
            "relay",
            {
                "id": "relay-1",
                "seeds": [m.address for m in self.aggregators],
                "listen": self.relay_address,
                "federation": options.task,
                "state_dir": str(self.relay_state),
                "window": {"max_devices": trainers, "max_wait_s": 8.0},
            },
        )
        self.supervisor.start("relay", ["relay", "serve", "--config", str(config)])
        wait_for_port("127.0.0.1", port, 60)
        devices = []
        for i in range(options.relay_devices):
            inference = i >= trainers
            device_id = f"demo-device-{i}"
            devices.append(
                self._write_config(
                    device_id,
                    {
                        "id": device_id,
                        "seeds": [self.relay_address],
                        "federation": options.task,
                        "task": options.task,
                        "capability": "inference" if inference else "train",
                        "task_options": {
                            "head_only": True,
                            "max_samples": 60,
                            "partition": {"scheme": "iid", "index": i, "count": options.relay_devices, "seed": 1},
                        },
                        "state_dir": str(self.dir / "agents" / device_id),
                        "max_rounds": 0 if inference else options.rounds,
                        "backoff_max_s": 2.0,
                    },
                )
            )
        args = ["agent", "run"]
        for path in devices:
            args += ["--config", str(path)]
        self.supervisor.start("devices", args)
        self.say(
            f"relay         relay-1={self.relay_address} with {options.relay_devices} low-power devices "
            f"({trainers} head-only trainers on 60 samples each, {options.inference_devices} inference-only)"
        )

    # ------------------------------------------------------------------ follow

    def _journal(self, aggregator: str) -> Journal | None:
        path = self._state_dirs[aggregator] / "journal.sqlite"
        return Journal(path, readonly=True) if path.exists() else None

    def poll(self, store: ContentStore) -> None:
        for member in self.aggregators:
            journal = self._journal(member.id)
            if journal is None:
                continue
            with journal:
                closed = [r for r in journal.history() if r.closed_at is not None]
            for record in closed[self._seen.get(member.id, 0) :]:
                self._report(store, member.id, record)
            self._seen[member.id] = len(closed)

    def _metrics_of(self, store: ContentStore, cid: str) -> dict[str, float]:
        _, weights = load_model(store, cid)
        return self.evaluate(decode_tensors(weights))

    def _report(self, store: ContentStore, aggregator: str, record: RoundRecord) -> None:
        assert record.cluster_cid and record.next_base_cid
        cluster = self._metrics_of(store, record.cluster_cid)
        semi = self._metrics_of(store, record.next_base_cid) if record.next_base_cid != record.cluster_cid else cluster
        result = RoundResult(
            round=record.round,
            aggregator=aggregator,
            participants=record.participants or 0,
            accuracy=semi["accuracy"],
            loss=semi["loss"],
            model=record.next_base_cid,
            cluster_accuracy=cluster["accuracy"],
            cluster_model=record.cluster_cid,
            kind=record.extra.get("next_base_kind", "cluster"),
        )
        if not self.results:
            self.say(f"\n{'round':>5}  {'aggregator':<10} {'agents':>6}  {'cluster acc':>11}  {'semi-global acc':>15}  {'loss':>6}  model")
        self.results.append(result)
        self.say(
            f"{result.round:>5}  {aggregator:<10} {result.participants:>6}  {result.cluster_accuracy:>11.3f}  "
            f"{result.accuracy:>15.3f}  {result.loss:>6.3f}  {result.model}"
        )

    def done(self) -> bool:
        return all(self._seen.get(m.id, 0) >= self.options.rounds for m in self.aggregators)

    def follow(self) -> None:
        deadline = time.monotonic() + self.options.timeout_s
        with open_store(self.store_url) as store:
            while not self.done():
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"the fleet did not finish {self.options.rounds} rounds within {self.options.timeout_s:.0f}s; "
                        f"see logs in {self.supervisor.log_dir}",
                        reason="demo_timeout",
                    )
                self.supervisor.check_alive()
                time.sleep(0.5)
                self.poll(store)

    # ------------------------------------------------------------------ finish

    def final(self) -> RoundResult:
        last = [r for r in self.results if r.round == self.options.rounds - 1] or self.results
        return max(last, key=lambda r: (r.round, r.accuracy))

    def relay_summary(self) -> dict[str, Any]:
        if self.relay_state is None:
            return {}
        path = self.relay_state / "status.json"
        if not path.exists():
            return {"error": "the relay left no status.json"}
        status = json.loads(path.read_text())
        cache = status.get("cache", {})
        return {
            "bytes_saved": cache.get("bytes_saved"),
            "bytes_served": cache.get("bytes_served"),
            "bytes_fetched": cache.get("bytes_fetched_upstream"),
            "windows": status.get("windows"),
        }

    def summary(self) -> dict[str, Any]:
        final = self.final()
        with open_store(self.store_url) as store:
            graph = walk(store, final.model)
        kinds: dict[str, int] = {}
        for manifest in graph.nodes.values():
            kinds[manifest.kind] = kinds.get(manifest.kind, 0) + 1
        # device updates behind the relay stay in the relay's private store: walk on there
        behind_relay = [cid for cid, m in graph.nodes.items() if m.kind == "relay"]
        device_updates = 0
        relay_ok = True
        if behind_relay and self.relay_state is not None:
            with open_store(str(self.relay_state / "store")) as relay_store:
                for cid in behind_relay:
                    below = walk(relay_store, cid)
                    device_updates += sum(1 for m in below.nodes.values() if m.kind == "local")
                    relay_ok = relay_ok and below.ok
        held_elsewhere = {p for cid in behind_relay for p in graph.nodes[cid].parents}
        verified = relay_ok and all(p.reason == "missing" and p.cid in held_elsewhere for p in graph.problems)
        clusters = sorted(
            {graph.nodes[p].producer.id for p in graph.nodes[final.model].parents if p in graph.nodes}
        )
        relay = self.relay_summary()
        relay_parents = sorted(
            {
                graph.nodes[parent].producer.id
                for cid in graph.nodes
                if graph.nodes[cid].kind == "cluster"
                for parent in graph.nodes[cid].parents
                if parent in graph.nodes and graph.nodes[parent].kind == "relay"
            }
        )
        return {
            "relay_update": behind_relay[0] if behind_relay else None,
            "relay": relay | {"in_final_lineage": relay_parents} if relay else {},
            "rounds": [
                {k: v for k, v in asdict(r).items() if k in ("round", "aggregator", "accuracy", "loss", "model")}
                | {"cluster_accuracy": r.cluster_accuracy, "participants": r.participants}
                for r in self.results
            ],
            "final_model": final.model,
            "final_accuracy": final.accuracy,
            "final_aggregator": final.aggregator,
            "lineage": {
                "kinds": kinds,
                "clusters_from": clusters,
                "ok": verified,
                "device_updates_behind_relay": device_updates,
            },
        }


def run_demo(options: DemoOptions, *, as_json: bool) -> int:
    from agent.tasks import BUILTIN_TASKS

    task = BUILTIN_TASKS.get(options.task)
    if task is None:
        raise InvalidInput(f"unknown task {options.task!r}; built-in: {sorted(BUILTIN_TASKS)}", reason="bad_argument")
    out = sys.stderr if as_json else sys.stdout
    demo = Demo(options, out=out, evaluate=task.evaluate_global)
    started = time.monotonic()
    try:
        demo.start()
        demo.follow()
    finally:
        demo.say("\nstopping the fleet …")
        demo.supervisor.stop_all()
    summary = demo.summary()
    summary["seconds"] = round(time.monotonic() - started, 1)
    final = summary["final_model"]
    lineage = summary["lineage"]
    relay = summary.get("relay", {})
    demo.say(
        f"\nfinal model   {final}  ({summary['final_aggregator']}, round {options.rounds - 1}, semi-global)\n"
        f"accuracy      {summary['final_accuracy']:.3f} on the held-out test split no agent trained on\n"
        f"lineage       {', '.join(f'{n} {k}' for k, n in lineage['kinds'].items())}"
        + (
            f" (+{lineage['device_updates_behind_relay']} device updates in the relay's store)"
            if lineage["device_updates_behind_relay"]
            else ""
        )
        + "; "
        f"cluster models from {', '.join(lineage['clusters_from'])}; verified={lineage['ok']}\n"
        + (
            f"relay         saved {relay.get('bytes_saved')} upstream bytes (devices downloaded "
            f"{relay.get('bytes_served')}, fetched upstream {relay.get('bytes_fetched')}); "
            f"relay updates in the final lineage: {', '.join(relay.get('in_final_lineage', [])) or 'none'}\n"
            if relay
            else ""
        )
        + f"took          {summary['seconds']} s\n\n"
        f"see it all:   strata lineage {final} --depth 2\n"
        f"              strata history\n"
        + (
            f"              strata verify {final} --store {demo.store_url} --store {demo.relay_state / 'store'}"
            "   # down to the relay's device updates\n"
            if summary.get("relay_update") and demo.relay_state is not None
            else ""
        )
    )
    if as_json:
        json.dump(summary, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    return 0
