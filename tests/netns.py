"""Network namespaces for fault tests and benchmarks: each daemon on its own host, one bridge between them.

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsLab() as lab:
        agg = lab.add("agg-a")                   # a namespace with its own address, e.g. 10.231.57.11
        argv = lab.command(agg, ["python", "-m", "strata", "aggregator", "serve", ...])
        lab.cut(agg)                             # unplug it: nothing reaches it, nothing leaves it
        lab.heal(agg)                            # plug it back in

The lab makes one Linux bridge in the root namespace with the first address of a
private /24 (10.231.N.0/24, N chosen so that no address here is in it already), and
for each namespace a veth pair: one end inside, holding the namespace's address,
the other on the bridge. The root namespace (this process, and a simulator started
from it) reaches every namespace through the bridge, and the namespaces reach each
other. Cutting one sets its bridge-side end down, so its packets go nowhere and
nobody's reach it, exactly as a pulled cable: no FIN, no RST, connections just stop
answering, which is what keepalives and deadlines must detect. A process inside
keeps running and keeps its state.

Names are unique per lab (the tag is the pid and a random suffix, so interfaces stay
within Linux's 15 characters), and `close()` deletes exactly what this lab created:
its namespaces, its veth pairs (the bridge side of each, which deletes the pair)
and its bridge. Processes started inside must be stopped by their owner before
`close()`; a namespace whose processes still run lingers until they exit.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aggregator.journal import Journal
from coordinator.client import CoordinatorClient
from proto.errors import StrataError
from tests.procs import ProcessFactory, StrataProcess, strata_command, wait_healthy
from tests.scrape import Metrics, scrape

# the private range the labs draw their /24 from: 10.231.0.0/16
_RANGE_PREFIX = "10.231"
_FIRST_HOST = 10  # .1 is the bridge (the root namespace); namespaces get .10, .11, …
_IP = "ip"


class NetnsError(RuntimeError):
    """An `ip` command of the lab failed (its stderr is in the message)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_IP, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why this machine cannot run a lab (not root, no `ip`, namespaces or veth refused), or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"strata-probe-{os.getpid()}-{secrets.token_hex(2)}"
    token = secrets.token_hex(4)
    veth, peer, bridge = f"sp{token}", f"sq{token}", f"sb{token}"
    try:
        _ip("netns", "add", probe)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    except NetnsError as exc:
        return f"ip netns add is not allowed here: {exc}"
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "add", bridge, "type", "bridge")
    except NetnsError as exc:
        return f"veth pairs or bridges are not allowed here: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
        _ip("link", "del", veth, check=False)
        _ip("link", "del", bridge, check=False)
    return None


@dataclass(frozen=True)
class Namespace:
    """One namespace of a lab: its name for `ip netns exec`, its address, and the bridge-side device that cuts it."""

    label: str
    name: str
    address: str
    host_device: str

    def endpoint(self, port: int) -> str:
        return f"{self.address}:{port}"


class NetnsLab:
    """Namespaces on one private bridge; a context manager that deletes everything it made."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"  # 8 characters
        self.bridge = f"sbr{self.tag}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.namespaces: dict[str, Namespace] = {}
        self._bridge_made = False
        self._closed = False

    def __enter__(self) -> NetnsLab:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> NetnsLab:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add(self, label: str) -> Namespace:
        """A new namespace with loopback up and one address on the bridge."""
        if label in self.namespaces:
            raise ValueError(f"namespace {label!r} exists in this lab")
        index = len(self.namespaces)
        name = f"strata-{self.tag}-{label}"
        host_device = f"sv{self.tag}{index:02d}"  # 12 characters
        inner = f"si{self.tag}{index:02d}"
        address = str(self.subnet.network_address + _FIRST_HOST + index)
        _ip("netns", "add", name)
        # recorded before the links exist, so close() deletes whatever part of it was made
        namespace = self.namespaces[label] = Namespace(label=label, name=name, address=address, host_device=host_device)
        _ip("link", "add", host_device, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("link", "set", host_device, "master", self.bridge)
        _ip("link", "set", host_device, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inner)
        _ip("-n", name, "link", "set", inner, "up")
        return namespace

    def command(self, namespace: Namespace, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `namespace` (ip netns exec execs it: the process keeps the pid Popen returns)."""
        return [_IP, "netns", "exec", namespace.name, *argv]

    def cut(self, namespace: Namespace) -> None:
        """Unplug the namespace: its bridge-side end goes down, so no packet enters or leaves it."""
        _ip("link", "set", namespace.host_device, "down")

    def heal(self, namespace: Namespace) -> None:
        _ip("link", "set", namespace.host_device, "up")

    def close(self) -> None:
        """Delete this lab's namespaces, veth pairs and bridge (idempotent; every step tried)."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for namespace in self.namespaces.values():
            # deleting one end of a veth pair deletes both; the namespace's own end goes with the namespace anyway
            for args in (("link", "del", namespace.host_device), ("netns", "del", namespace.name)):
                result = _ip(*args, check=False)
                if result.returncode != 0 and "Cannot find" not in result.stderr and "No such" not in result.stderr:
                    errors.append(f"ip {' '.join(args)}: {result.stderr.strip()}")
        if self._bridge_made:
            result = _ip("link", "del", self.bridge, check=False)
            if result.returncode != 0:
                errors.append(f"ip link del {self.bridge}: {result.stderr.strip()}")
        if errors:
            raise NetnsError("; ".join(errors))


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.231.N.0/24 no interface here has an address in (labs running side by side each take their own)."""
    taken = set()
    listing = _ip("-o", "-4", "addr", "show", check=False).stdout
    for line in listing.splitlines():
        for word in line.split():
            if word.startswith(f"{_RANGE_PREFIX}."):
                taken.add(ipaddress.ip_interface(word).network.network_address.packed[2])
    candidates = [n for n in range(1, 255) if n not in taken]
    if not candidates:
        raise NetnsError(f"every {_RANGE_PREFIX}.N.0/24 is in use")
    # random among the free ones: two labs opening at once rarely pick the same
    return ipaddress.ip_network(f"{_RANGE_PREFIX}.{secrets.choice(candidates)}.0/24")


# ---------------------------------------------------------------- a fleet in namespaces

COORDINATOR_PORT = 7000
AGGREGATOR_PORT = 7070
METRICS_PORT = 9100  # every namespace has its own ports, so every aggregator uses the same ones


class NetnsFleet:
    """A coordinator and aggregators as `strata` processes, each in its own namespace of `lab`.

    `aggregator_settings` and `coordinator_settings` are config values (nested dicts,
    as in the YAML) laid over the fleet's own (addresses, state directories, one
    shared store directory on the one filesystem: a cut isolates the network, not the
    disk). Processes are started through `procs` (tests.procs.ProcessFactory), which
    stops them by pid.
    """

    def __init__(
        self,
        lab: NetnsLab,
        procs: ProcessFactory,
        root: Path,
        *,
        aggregators: Sequence[str] = ("agg-a", "agg-b", "agg-c"),
        aggregator_settings: Mapping[str, Any] | None = None,
        coordinator_settings: Mapping[str, Any] | None = None,
        federation: str = "digits",
    ) -> None:
        self.lab = lab
        self.procs = procs
        self.root = root
        self.home = root / "home"
        self.store = root / "store"
        self.names = tuple(aggregators)
        self.federation = federation
        self._aggregator_settings = dict(aggregator_settings or {})
        self._coordinator_settings = dict(coordinator_settings or {})
        self.coordinator_ns = lab.add("coord")
        self.namespaces = {name: lab.add(name) for name in self.names}
        self.coordinator: StrataProcess | None = None
        self.aggregators: dict[str, StrataProcess] = {}

    @property
    def coordinator_address(self) -> str:
        return self.coordinator_ns.endpoint(COORDINATOR_PORT)

    def address(self, name: str) -> str:
        return self.namespaces[name].endpoint(AGGREGATOR_PORT)

    @property
    def seeds(self) -> list[str]:
        return [self.address(name) for name in self.names]

    def _config(self, name: str, values: Mapping[str, Any]) -> str:
        path = self.root / "config" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(dict(values)))
        return str(path)

    def start(self, timeout: float = 90.0) -> NetnsFleet:
        self.start_coordinator()
        for name in self.names:
            self.start_aggregator(name, wait=False)
        for name in self.names:
            self.aggregators[name].wait_for_event("aggregator_started", timeout=timeout)
            wait_healthy(self.address(name), timeout=timeout)
        self.wait_ring(set(self.names), timeout=timeout)
        return self

    def start_coordinator(self) -> StrataProcess:
        values = _merge(
            {"listen": self.coordinator_address, "state_dir": str(self.root / "coordinator"), "log_level": "info"},
            self._coordinator_settings,
        )
        config = self._config("coordinator", values)
        argv = ["coordinator", "serve", "--config", config]
        self.coordinator = self.procs.spawn(
            argv, name="coordinator", home=self.home, command=self.lab.command(self.coordinator_ns, strata_command())
        )
        self.coordinator.wait_for_event("coordinator_started", timeout=60)
        return self.coordinator

    def start_aggregator(self, name: str, *, wait: bool = True) -> StrataProcess:
        namespace = self.namespaces[name]
        values = _merge(
            {
                "id": name,
                "listen": self.address(name),
                "coordinator": self.coordinator_address,
                "federation": self.federation,
                "state_dir": str(self.state_dir(name)),
                "store": str(self.store),
                "metrics_port": METRICS_PORT,
                "log_level": "info",
            },
            self._aggregator_settings,
        )
        config = self._config(name, values)
        process = self.procs.spawn(
            ["aggregator", "serve", "--config", config],
            name=name,
            home=self.home,
            command=self.lab.command(namespace, strata_command()),
        )
        self.aggregators[name] = process
        if wait:
            process.wait_for_event("aggregator_started", timeout=60)
        return process

    def state_dir(self, name: str) -> Path:
        return self.root / "aggregators" / name

    def cut(self, name: str) -> None:
        self.lab.cut(self.namespaces[name])

    def heal(self, name: str) -> None:
        self.lab.heal(self.namespaces[name])

    # ------------------------------------------------------------------ what the fleet says

    def metrics(self, name: str, timeout: float = 2.0) -> Metrics | None:
        """The aggregator's metrics, or None when it does not answer (cut off, dead, or busy past `timeout`)."""
        try:
            return scrape(METRICS_PORT, host=self.namespaces[name].address, timeout=timeout)
        except OSError:
            return None

    def ring_members(self) -> set[str] | None:
        """The coordinator's ring for the federation, or None when the coordinator does not answer."""
        try:
            with CoordinatorClient(self.coordinator_address) as client:
                return {m.id for m in client.ring(self.federation).members}
        except StrataError:
            return None

    def ring(self) -> Any:
        with CoordinatorClient(self.coordinator_address) as client:
            return client.ring(self.federation)

    def wait_ring(self, members: set[str], timeout: float) -> None:
        give_up = time.monotonic() + timeout
        while (seen := self.ring_members()) != members:
            if time.monotonic() > give_up:
                raise TimeoutError(f"the coordinator's ring is {seen}, wanted {members} within {timeout}s")
            time.sleep(0.2)

    def journaled_updates(self) -> dict[str, list[tuple[str, int]]]:
        """update CID -> every (aggregator, counted round) that journaled it, from the journals on disk
        (an update resent to a new home after its first home journaled it is in both)."""
        found: dict[str, list[tuple[str, int]]] = {}
        for name in self.names:
            path = self.state_dir(name) / "journal.sqlite"
            if path.exists():
                with Journal(path, readonly=True) as journal:
                    for update in journal.iter_all_updates():
                        found.setdefault(update.update_cid, []).append((name, update.counted_round))
        return found

    def indexed_cluster_parents(self) -> dict[str, str]:
        """update CID -> the cluster model naming it as a parent, from the coordinator's model index."""
        parents: dict[str, str] = {}
        with CoordinatorClient(self.coordinator_address) as client:
            for name in self.names:
                for record in client.list_models(kind="cluster", aggregator=name, federation=self.federation):
                    for parent in record.parents:
                        parents[parent] = record.cid
        return parents


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- what a running `strata simulate` says

_PROGRESS = re.compile(r"^\[\s*([\d.]+)s\] online (\d+)/(\d+)\s+(.*?)\s+acked (\d+)")
_HOME = re.compile(r"(\S+) r(\d+|-):(\d+)")


@dataclass
class SimProgress:
    """The latest progress line of one `strata simulate` process, timestamped on arrival."""

    process: StrataProcess
    _offset: int = 0
    online: int = 0
    acked: int = 0
    homes: dict[str, int] = field(default_factory=dict)
    history: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def poll(self) -> None:
        try:
            with open(self.process.stderr_path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        now = time.monotonic()
        for line in data[:cut].decode(errors="replace").splitlines():
            match = _PROGRESS.match(line)
            if match:
                self.online, self.acked = int(match[2]), int(match[5])
                self.homes = {home: int(count) for home, _, count in _HOME.findall(match[4])}
                self.history.append((now, dict(self.homes)))
