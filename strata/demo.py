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
from storage.store import ContentStore, default_store_path, open_store
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
    timeout_s: float = 170.0
    home: Path = field(default_factory=lambda: Path.home() / ".strata")

    def __post_init__(self) -> None:
        if not 1 <= self.aggregators <= len(AGGREGATOR_NAMES):
            raise InvalidInput(f"--aggregators must be 1..{len(AGGREGATOR_NAMES)}", reason="bad_argument")
        if self.agents < self.aggregators:
            raise InvalidInput("--agents must be at least --aggregators (every aggregator needs agents)", reason="bad_argument")
        if self.rounds < 1:
            raise InvalidInput("--rounds must be >= 1", reason="bad_argument")


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
                "round": {"quorum": 1.0, "min_updates": 1, "deadline_s": 20.0, "agent_timeout_s": 30.0},
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
        self.say(f"logs          {self.supervisor.log_dir}")

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

    def summary(self) -> dict[str, Any]:
        final = self.final()
        with open_store(self.store_url) as store:
            graph = walk(store, final.model)
        kinds: dict[str, int] = {}
        for manifest in graph.nodes.values():
            kinds[manifest.kind] = kinds.get(manifest.kind, 0) + 1
        clusters = sorted(
            {graph.nodes[p].producer.id for p in graph.nodes[final.model].parents if p in graph.nodes}
        )
        return {
            "rounds": [
                {k: v for k, v in asdict(r).items() if k in ("round", "aggregator", "accuracy", "loss", "model")}
                | {"cluster_accuracy": r.cluster_accuracy, "participants": r.participants}
                for r in self.results
            ],
            "final_model": final.model,
            "final_accuracy": final.accuracy,
            "final_aggregator": final.aggregator,
            "lineage": {"kinds": kinds, "clusters_from": clusters, "ok": graph.ok},
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
    demo.say(
        f"\nfinal model   {final}  ({summary['final_aggregator']}, round {options.rounds - 1}, semi-global)\n"
        f"accuracy      {summary['final_accuracy']:.3f} on the held-out test split no agent trained on\n"
        f"lineage       {', '.join(f'{n} {k}' for k, n in lineage['kinds'].items())}; "
        f"cluster models from {', '.join(lineage['clusters_from'])}; verified={lineage['ok']}\n"
        f"took          {summary['seconds']} s\n\n"
        f"see it all:   strata lineage {final} --depth 2\n"
        f"              strata history\n"
    )
    if as_json:
        json.dump(summary, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    return 0
