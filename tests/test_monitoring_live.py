"""A real Prometheus (Debian's `prometheus` package) scrapes a live fleet on loopback: a
coordinator, two aggregators, a relay and two agents as real processes, with the
repository's scrape config (deploy/config/prometheus.yml, its targets pointed at the
fleet and its intervals at 1 s) and alert rules (deploy/config/alerts.yml, `for:` cut
to 2 s). The test reads Prometheus's HTTP API: the fleet's metrics arrive, and after a
kill -9 of one aggregator StrataAggregatorDown fires for it, and only for it.

Every wait is bounded only to turn a hang into a failure; Prometheus is stopped by the
`procs` fixture, by PID, like the fleet.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from storage.cid import is_cid
from tests.agent_service_contract import wait_until
from tests.procs import ProcessFactory, free_port, procs_fixture, wait_healthy  # noqa: F401
from tests.test_fleet_failures import Fleet

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "config"
AGGREGATORS = ("agg-a", "agg-b")
# how often Prometheus scrapes and evaluates here, and the `for:` every alert gets
INTERVAL = "1s"
FOR = "2s"


class MonitoredFleet(Fleet):
    """tests.test_fleet_failures' fleet, with a metrics port on every daemon and a relay."""

    def __init__(self, procs: ProcessFactory, root: Path) -> None:
        super().__init__(procs, root)
        self.metrics_ports = {name: free_port() for name in ("coordinator", *AGGREGATORS, "relay")}
        self.relay_port = free_port()

    def _config(self, name: str, values: dict) -> str:
        if name in self.metrics_ports:
            values = {**values, "metrics_port": self.metrics_ports[name]}
        return super()._config(name, values)

    def start_relay(self) -> None:
        config = self._config(
            "relay",
            {
                "id": "relay",
                "listen": f"127.0.0.1:{self.relay_port}",
                "seeds": [f"127.0.0.1:{self.ports[name]}" for name in AGGREGATORS],
                "state_dir": str(self.root / "relay"),
                "serving": {"heartbeat_interval_s": 1.0},
            },
        )
        self.procs.strata("relay", "serve", "--config", config, name="relay", home=self.home)

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.metrics_ports[name]}"


def prometheus_files(root: Path, fleet: MonitoredFleet) -> Path:
    """The deploy config with this fleet's targets and short intervals; the rules with short `for:`."""
    config = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL, "scrape_timeout": INTERVAL}
    targets = {
        "strata-coordinator": [fleet.target("coordinator")],
        "strata-aggregator": [fleet.target(name) for name in AGGREGATORS],
        "strata-relay": [fleet.target("relay")],
    }
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(targets) <= set(jobs), "the deploy config lost a Strata scrape job"
    config["scrape_configs"] = [{**jobs[name], "static_configs": [{"targets": t}]} for name, t in targets.items()]
    rules = yaml.safe_load((CONFIG / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = FOR
    (root / "alerts.yml").write_text(yaml.safe_dump(rules))
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class PrometheusAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """An instant query's vector: labels (without __name__) -> value."""
        return {
            frozenset((k, v) for k, v in item["metric"].items() if k != "__name__"): float(item["value"][1])
            for item in self.get("/api/v1/query", query=expr)["result"]
        }

    def firing(self, alertname: str) -> list[dict[str, str]]:
        alerts = self.get("/api/v1/alerts")["alerts"]
        return [a["labels"] for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"]

    def rules_evaluated_after(self, unix_s: float) -> bool:
        """Whether every rule group has been evaluated since ``unix_s`` (Prometheus's clock)."""
        groups = self.get("/api/v1/rules")["groups"]
        return bool(groups) and all(parse_rfc3339(g["lastEvaluation"]) > unix_s for g in groups)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False


def parse_rfc3339(stamp: str) -> float:
    """Prometheus's RFC 3339 stamps (nanoseconds, Z or an offset) to Unix seconds; Python's
    parser stops at microseconds, so the fraction is added apart."""
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp)
    assert match, stamp
    whole, fraction, zone = match.groups()
    seconds = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).timestamp()
    return seconds + float(fraction or 0)


def by_instance(vector: dict[frozenset[tuple[str, str]], float]) -> dict[str, float]:
    return {dict(labels)["instance"]: value for labels, value in vector.items()}


def test_prometheus_scrapes_the_fleet_and_alerts_when_an_aggregator_dies(procs: ProcessFactory, tmp_path: Path) -> None:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (Debian package prometheus; .ci/run installs it)")
    fleet = MonitoredFleet(procs, tmp_path)
    fleet.start_coordinator()
    for name in AGGREGATORS:
        fleet.start_aggregator(name)
    for name in AGGREGATORS:
        wait_healthy(f"127.0.0.1:{fleet.ports[name]}", timeout=30)
    fleet.start_relay()
    fleet.start_agents(2)

    web_port = free_port()
    config = prometheus_files(tmp_path, fleet)
    prometheus = procs.spawn(
        [
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        name="prometheus",
        command=[exe],
    )
    api = PrometheusAPI(web_port)
    wait_until(api.ready, 30, "Prometheus to be ready", poll_s=0.5)

    # the fleet's metrics arrive: every target up, and each daemon's own series
    targets = {fleet.target(name) for name in fleet.metrics_ports}
    wait_until(lambda: by_instance(api.query("up")) == dict.fromkeys(targets, 1.0), 30, "every target to be up", poll_s=0.5)
    wait_until(lambda: api.query("strata_coordinator_ring_members") == {
            frozenset({("job", "strata-coordinator"), ("instance", fleet.target("coordinator"))}): 2.0
        }, 30, "the coordinator's ring of two", poll_s=0.5)
    assert set(by_instance(api.query("strata_aggregator_round"))) == {fleet.target(name) for name in AGGREGATORS}
    # the ring may home both agents on one aggregator (the other then waits for its min_updates)
    wait_until(lambda: api.query("sum(strata_aggregator_rounds_closed_total) > 0"), 120, "a round to close", poll_s=0.5)
    wait_until(lambda: by_instance(api.query("strata_relay_upstream_connected")) == {fleet.target("relay"): 1.0}, 30, "the relay's upstream", poll_s=0.5)
    models = api.query("strata_aggregator_model_info")
    assert {dict(labels)["federation"] for labels in models} == {"digits"}
    assert all(is_cid(dict(labels)["base_cid"]) for labels in models), models
    # Prometheus drops empty labels: an aggregator with no closed round has no round or model CIDs
    closed = [dict(labels) for labels in models if "round" in dict(labels)]
    assert closed and all(is_cid(labels["cluster_cid"]) and is_cid(labels["semi_global_cid"]) for labels in closed), models
    # Until Prometheus's first scrape of the coordinator, `absent(up{...})` rightly holds and the
    # alert may fire (its first scrapes can trail the first rule evaluations by seconds); it clears
    # at the first evaluation after a scrape, so judge the alerts only after one
    first_scrape = max(api.query('timestamp(up{job="strata-coordinator"})').values())
    wait_until(lambda: api.rules_evaluated_after(first_scrape), 30, "a rule evaluation after the first scrape", poll_s=0.5)
    assert api.firing("StrataAggregatorDown") == [] and api.firing("StrataCoordinatorUnreachable") == []

    # kill -9 one aggregator: its scrape fails, and after `for:` the alert fires for it alone
    victim = "agg-b"
    fleet.aggregators[victim].kill9()
    firing = wait_until(lambda: api.firing("StrataAggregatorDown"), 60, "StrataAggregatorDown to fire", poll_s=0.5)
    assert [(a["instance"], a["job"], a["severity"]) for a in firing] == [(fleet.target(victim), "strata-aggregator", "critical")]
    # the coordinator saw it too: the lease expired (a lease change) and the ring shrank
    wait_until(lambda: by_instance(api.query('strata_coordinator_lease_changes_total{change="expired"}'))
        == {fleet.target("coordinator"): 1.0}, 30, "the coordinator to expire the dead aggregator's lease", poll_s=0.5)
    assert api.firing("StrataCoordinatorUnreachable") == []
    assert prometheus.alive
