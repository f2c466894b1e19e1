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
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

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
