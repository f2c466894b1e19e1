"""The monitoring stack's files, checked by the real tools: promtool validates the alert
rules and the Prometheus config and runs the rules' unit tests (deploy/config/alerts.test.yml),
and every metric an alert or a Grafana panel queries is one the README's catalogue lists.

promtool comes from Debian's `prometheus` package (.ci/run installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

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
