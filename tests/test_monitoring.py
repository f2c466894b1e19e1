"""The monitoring stack's files, checked by the real tools: promtool validates the alert
rules and the Prometheus config and runs the rules' unit tests (deploy/config/alerts.test.yml),
and every metric an alert or a Grafana panel queries is one the README's catalogue lists.

promtool comes from Debian's `prometheus` package (.ci/run installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from strata.readme import METRICS_BY_DAEMON

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "deploy" / "config"
ALERTS = CONFIG / "alerts.yml"
# Prometheus's own series, which a query may use besides the catalogue's
PROMETHEUS_OWN = {"up"}
_METRIC_NAME = re.compile(r"\b(strata_[a-z0-9_]+|up)\b")
ALERT_NAMES = {
    "StrataAggregatorDown", "StrataCoordinatorUnreachable", "StrataRoundStalled", "StrataRefusalRateHigh",
    "StrataRelayBacklogGrowing",
}  # fmt: skip


def catalogue_samples() -> set[str]:
    """Every sample name the daemons serve, as a query names it."""
    return {spec.sample_name for specs in METRICS_BY_DAEMON.values() for spec in specs}


def metrics_named(expr: str) -> set[str]:
    return set(_METRIC_NAME.findall(expr))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, cwd=CONFIG)


def alert_rules() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in result.stdout


def test_promtool_unit_tests_every_alert_firing() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (CONFIG / "alerts.test.yml").read_text()))
    assert tested == ALERT_NAMES


def test_promtool_checks_the_prometheus_config_with_its_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_the_issue_alerts_exist_and_query_only_catalogued_metrics() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == ALERT_NAMES
    known = catalogue_samples() | PROMETHEUS_OWN
    for rule in rules:
        named = metrics_named(str(rule["expr"]))
        assert named and named <= known, f"{rule['alert']} queries {named - known}, not in the metrics catalogue"
        assert rule["labels"]["severity"] in ("critical", "warning")  # type: ignore[index]


# ---------------------------------------------------------------------- Grafana

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "strata-fleet.json"
# agents run on devices and phones, not in the compose fleet Prometheus scrapes
NOT_ON_THE_DASHBOARD = {spec.sample_name for spec in METRICS_BY_DAEMON["agent"]}


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] != "row"]


def panel_queries() -> dict[str, list[str]]:
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in dashboard_panels()}


def test_every_panel_queries_catalogued_metrics_through_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    known = catalogue_samples() | PROMETHEUS_OWN
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            named = metrics_named(target["expr"])
            assert named and named <= known, f"{panel['title']}: {named - known} not in the metrics catalogue"


def test_the_dashboard_covers_every_metric_the_fleet_serves() -> None:
    queried = set().union(*(metrics_named(expr) for exprs in panel_queries().values() for expr in exprs))
    missing = catalogue_samples() - NOT_ON_THE_DASHBOARD - queried
    assert not missing, f"no panel shows {sorted(missing)}"


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    # each query as a recording rule: `promtool check rules` parses its PromQL with Prometheus's own parser
    rules = [
        {"record": f"panel:{i}:{j}", "expr": expr}
        for i, exprs in enumerate(panel_queries().values())
        for j, expr in enumerate(exprs)
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_provisions_grafana_with_prometheus() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert {
        "./grafana/provisioning:/etc/grafana/provisioning:ro",
        "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
    } <= set(grafana["volumes"])
    assert grafana["depends_on"]["prometheus"] == {"condition": "service_healthy"}
    assert all(port.startswith("127.0.0.1:") for port in grafana["ports"])
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "strata.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    # Prometheus loads the alert rules the dashboard's operators are paged by
    assert "./config/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]
