"""The demo's fleet: typed configs for every daemon, written as YAML, and the processes that run them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from coordinator.config import CoordinatorConfig
from coordinator.ring import Member, Ring
from proto.errors import InvalidInput
from relay.config import RelayConfig, WindowSettings
from storage.keys import KeyPair
from storage.open import open_store
from storage.store import default_store_path
from strata.cmd_model import operator_key
from strata.config import dump_config
from strata.supervise import Supervisor, free_port, wait_for_port
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.security import ChannelFactory, Security, TlsSettings, channel_factory

AGGREGATOR_NAMES = "abcdefghijklmnopqrstuvwxyz"
RELAY_ID = "relay-1"
DEVICE_SAMPLES = 60  # a low-power device's data: the first 60 samples of its share
DEMO_FLEET = "demo"
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
# The federation's round config, handed to every trainer each round. Ten local epochs of small
# batches make each round count on a few hundred samples per agent, and decaying the learning
# rate by 0.8 a round lets the agents' skewed updates settle instead of pulling the average apart.
# Tuned for digits; another task trains with its own defaults.
ROUND_CONFIGS: dict[str, dict[str, str]] = {"digits": {"epochs": "10", "batch_size": "16", "lr": "0.1", "lr_decay": "0.8"}}


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
    tls: bool = False  # a throwaway fleet CA in the demo's directory; mutual TLS on every hop
    dashboard: bool = True  # serve `strata dashboard` on a free loopback port (needs the coordinator)
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
class RelayEndpoints:
    address: str
    metrics_address: str
    store: Path  # its private store, where the device updates behind it stay


class Fleet:
    """Starts the demo's daemons as child processes, each from a config file written here."""

    def __init__(self, options: DemoOptions, *, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.dir = options.home / "demo"
        self.store_url = str(default_store_path())
        self.supervisor = Supervisor(self.dir / "logs")
        self.coordinator_address = ""
        self._coordinator_port: int | None = None
        self.aggregators: list[Member] = []
        self.homes: dict[str, list[str]] = {}  # aggregator id -> the ids of the agents it is home to
        self.state_dirs: dict[str, Path] = {}  # aggregator id -> its state directory
        self.relay: RelayEndpoints | None = None
        self.dashboard_url = ""
        self._ca: FleetCA | None = None
        self._operator: Security | None = None

    @property
    def ca_dir(self) -> Path:
        return self.dir / "ca"

    def prepare(self) -> None:
        """Fresh directories, the aggregators' addresses and the agents' places on their ring, and
        the coordinator's process, which boots while the caller loads the task."""
        self._fresh_dirs()
        if self.options.tls:
            # a throwaway CA: each run makes a new one, so nothing outlives the demo's directory
            self._ca = FleetCA.init(self.ca_dir, DEMO_FLEET)
            self._operator = Security(self._tls(Role.OPERATOR, "demo").bundle)
            self.say(f"fleet CA      {self.ca_dir} (fleet {DEMO_FLEET!r}): mutual TLS on every hop")
        self.aggregators = [
            Member(id=f"agg-{AGGREGATOR_NAMES[i]}", address=f"127.0.0.1:{free_port()}")
            for i in range(self.options.aggregators)
        ]
        self.homes = self._place_agents()
        if self.options.coordinator:
            self._coordinator_port = self._launch_coordinator()

    def round_config(self) -> dict[str, str]:
        """The federation's round config, handed to every trainer each round."""
        return dict(ROUND_CONFIGS.get(self.options.task, {}))

    def agent_task_options(self) -> dict[str, dict[str, Any]]:
        """Each agent's task options (after prepare()): the class-skewed share of the data it trains on."""
        options = self.options
        result: dict[str, dict[str, Any]] = {}
        for group, member in enumerate(self.aggregators):
            ids = self.homes[member.id]
            for index, agent_id in enumerate(ids):
                partition = {
                    "scheme": "dirichlet",
                    "alpha": options.alpha,
                    "groups": options.aggregators,
                    "group": group,
                    "group_alpha": options.group_alpha,
                    "index": index,
                    "count": len(ids),
                }
                result[agent_id] = {"partition": partition, "seed": index}
        return result

    def start(self) -> None:
        """The base model, then every daemon (after prepare())."""
        options = self.options
        base = self._base_model()
        self.say(f"base model {base} ({options.task}, seeded initial weights) in store {self.store_url}")
        if self._coordinator_port is not None:
            wait_for_port("127.0.0.1", self._coordinator_port, 30)
            self.say(f"coordinator   {self.coordinator_address}")
        self._start_aggregators(base)
        self._start_agents()
        if options.relay_devices:
            self._start_relay()
        if options.dashboard and options.coordinator:
            self._start_dashboard()
        self.say(f"logs          {self.supervisor.log_dir}")

    def check_alive(self) -> None:
        self.supervisor.check_alive()

    def stop(self) -> None:
        self.supervisor.stop_all()
        if self._ca is not None:
            self._ca.close()
            self._ca = None

    @property
    def channels(self) -> ChannelFactory:
        """How the demo itself dials the fleet: as its operator under TLS, else in plaintext."""
        return channel_factory(self._operator)

    def _tls(self, role: Role, name: str) -> TlsSettings:
        """A bundle for `role`/`name` issued by the demo's CA (serving roles carry the loopback names);
        plaintext settings without --tls."""
        if self._ca is None:
            return TlsSettings()
        directory = self.dir / "bundles" / f"{role}-{name}"
        hosts = LOOPBACK_NAMES if role in (Role.COORDINATOR, Role.AGGREGATOR, Role.RELAY) else ()
        self._ca.issue(Identity(role, name), KeyPair.generate(), hosts=hosts).write(directory)
        return TlsSettings(bundle=str(directory))

    # ------------------------------------------------------------------ set-up

    def _fresh_dirs(self) -> None:
        for sub in ("aggregators", "agents", "coordinator", "relay", "config", "logs", "ca", "bundles"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        (self.dir / "config").mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, config: object) -> Path:
        path = self.dir / "config" / f"{name}.yaml"
        path.write_text(dump_config(config))
        return path

    def _run(self, name: str, command: list[str], configs: list[Path]) -> None:
        self.supervisor.start(name, [*command, *(arg for path in configs for arg in ("--config", str(path)))])

    def _base_model(self) -> str:
        # lazy: strata.wiring loads torch, which the coordinator's launch need not wait for
        from strata.wiring import task_base_model

        with open_store(self.store_url) as store:
            return task_base_model(store, operator_key(), task=self.options.task, federation=self.options.task)

    def _launch_coordinator(self) -> int:
        port = free_port()
        self.coordinator_address = f"127.0.0.1:{port}"
        config = CoordinatorConfig(
            listen=self.coordinator_address,
            state_dir=str(self.dir / "coordinator"),
            tls=self._tls(Role.COORDINATOR, "coordinator"),
        )
        self._run("coordinator", ["coordinator", "serve"], [self._write("coordinator", config)])
        return port

    def _start_aggregators(self, base: str) -> None:
        for member in self.aggregators:
            self.state_dirs[member.id] = self.dir / "aggregators" / member.id
            config = self._aggregator_config(member, base)
            self._run(member.id, ["aggregator", "serve"], [self._write(member.id, config)])
        for member in self.aggregators:
            wait_for_port("127.0.0.1", int(member.address.rpartition(":")[2]), 60)
        self.say("aggregators   " + "  ".join(f"{m.id}={m.address}" for m in self.aggregators))

    def _aggregator_config(self, member: Member, base: str) -> AggregatorConfig:
        return AggregatorConfig(
            id=member.id,
            listen=member.address,
            federation=self.options.task,
            initial_model=base,
            state_dir=str(self.state_dirs[member.id]),
            store=self.store_url,
            round=RoundSettings(quorum=1.0, min_updates=1, deadline_s=10.0, agent_timeout_s=30.0),
            synthesis=SynthesisSettings(peers="all", decay="exponential", decay_params={"half_life": 2.0}),
            round_config=self.round_config(),
            coordinator=self.coordinator_address,
            # without a coordinator, a static membership
            peers=[] if self.coordinator_address else [f"{m.id}={m.address}" for m in self.aggregators],
            tls=self._tls(Role.AGGREGATOR, member.id),
        )

    def _place_agents(self) -> dict[str, list[str]]:
        """Pick agent ids so each aggregator's arc holds an equal share (the same ring the fleet computes)."""
        ring = Ring(self.aggregators, version=1)
        per_home: dict[str, list[str]] = {m.id: [] for m in self.aggregators}
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

    def _agent_config(self, agent_id: str) -> AgentConfig:
        """What every demo agent and device shares; callers replace() the rest."""
        return AgentConfig(
            id=agent_id,
            federation=self.options.task,
            task=self.options.task,
            state_dir=str(self.dir / "agents" / agent_id),
            backoff_max_s=2.0,
            tls=self._tls(Role.AGENT, agent_id),
        )

    def _start_agents(self) -> None:
        options = self.options
        homes = self.homes
        seeds = [m.address for m in self.aggregators]
        paths: list[Path] = []
        for agent_id, task_options in self.agent_task_options().items():
            config = replace(self._agent_config(agent_id), seeds=seeds, task_options=task_options, max_rounds=options.rounds)
            paths.append(self._write(agent_id, config))
        processes = max(1, min(options.agent_processes, len(paths)))
        for p in range(processes):
            self._run(f"agents-{p}", ["agent", "run"], paths[p::processes])
        self.say(
            f"agents        {options.agents} in {processes} processes; "
            + ", ".join(f"{m.id}: {len(homes[m.id])}" for m in self.aggregators)
            + f" (class-skewed Dirichlet alpha={options.group_alpha} across aggregators)"
        )

    def _start_dashboard(self) -> None:
        """The web dashboard on loopback, reading the fleet as its operator: the journals for
        refusals, the shared store and the relay's for weights."""
        port = free_port()
        args = ["dashboard", "--coordinator", self.coordinator_address, "--listen", f"127.0.0.1:{port}"]
        args += [arg for d in self.state_dirs.values() for arg in ("--state-dir", str(d))]
        args += ["--store", self.store_url] + (["--store", str(self.relay.store)] if self.relay else [])
        if self._ca is not None:
            args += ["--bundle", self._tls(Role.OPERATOR, "dashboard").bundle]
        self.supervisor.start("dashboard", args)
        wait_for_port("127.0.0.1", port, 30)
        self.dashboard_url = f"http://127.0.0.1:{port}/"
        self.say(f"dashboard     {self.dashboard_url}")

    def _start_relay(self) -> None:
        """One relay with low-power devices: small data, head-only training, some inference-only."""
        options = self.options
        port, metrics_port = free_port(), free_port()
        state_dir = self.dir / "relay"
        self.relay = RelayEndpoints(
            address=f"127.0.0.1:{port}", metrics_address=f"127.0.0.1:{metrics_port}", store=state_dir / "store"
        )
        trainers = options.relay_devices - options.inference_devices
        config = RelayConfig(
            id=RELAY_ID,
            seeds=[m.address for m in self.aggregators],
            listen=self.relay.address,
            federation=options.task,
            state_dir=str(state_dir),
            store=str(self.relay.store),
            window=WindowSettings(max_devices=trainers, max_wait_s=8.0),
            metrics_port=metrics_port,
            tls=self._tls(Role.RELAY, RELAY_ID),
        )
        self._run("relay", ["relay", "serve"], [self._write("relay", config)])
        wait_for_port("127.0.0.1", port, 60)
        devices = []
        for i in range(options.relay_devices):
            inference = i >= trainers
            device_id = f"demo-device-{i}"
            config = replace(
                self._agent_config(device_id),
                seeds=[self.relay.address],
                capability="inference" if inference else "train",
                task_options={
                    "head_only": True,
                    "max_samples": DEVICE_SAMPLES,
                    "partition": {"scheme": "iid", "index": i, "count": options.relay_devices, "seed": 1},
                },
                max_rounds=0 if inference else options.rounds,
            )
            devices.append(self._write(device_id, config))
        self._run("devices", ["agent", "run"], devices)
        self.say(
            f"relay         {RELAY_ID}={self.relay.address} with {options.relay_devices} low-power devices "
            f"({trainers} head-only trainers on {DEVICE_SAMPLES} samples each, {options.inference_devices} inference-only)"
        )
