"""CLI around the daemons: health probes, config listing, effective config, help that helps."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from tests.procs import run_strata


def test_health_reports_serving_and_unreachable(tmp_path: Path) -> None:
    config = CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"))
    with CoordinatorDaemon(config) as daemon:
        ok = run_strata("health", daemon.address, "--json", home=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["status"] == "SERVING"
        address = daemon.address
    down = run_strata("health", address, "--timeout", "1", home=tmp_path)
    assert down.returncode == 5
    assert down.stderr.count("\n") == 1 and "Traceback" not in down.stderr


def test_config_lists_every_key_with_env_names(tmp_path: Path) -> None:
    result = run_strata("config", "aggregator", "--json", home=tmp_path)
    assert result.returncode == 0
    rows = {row["key"]: row for row in json.loads(result.stdout)}
    assert rows["round.min_updates"]["env"] == "STRATA_ROUND__MIN_UPDATES"
    assert rows["listen"]["default"] == "'127.0.0.1:7070'"


def test_print_config_applies_file_env_and_set_in_order(tmp_path: Path) -> None:
    config = tmp_path / "agg.yaml"
    config.write_text("federation: mnist\nround:\n  min_updates: 2\n  quorum: 0.5\n")
    result = run_strata(
        "aggregator", "serve", "--config", str(config), "--set", "round.quorum=0.9", "--print-config",
        home=tmp_path, env={"STRATA_ROUND__MIN_UPDATES": "4"},
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["federation"] == "mnist"
    assert effective["round"]["min_updates"] == 4
    assert effective["round"]["quorum"] == 0.9


def test_bad_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agg.yaml"
    config.write_text("round:\n  quorum: 7\n")
    result = run_strata("aggregator", "serve", "--config", str(config), home=tmp_path)
    assert result.returncode == 2
    assert "quorum" in result.stderr and "Traceback" not in result.stderr
    unknown = run_strata("aggregator", "serve", "--set", "no_such_key=1", home=tmp_path)
    assert unknown.returncode == 2 and "no_such_key" in unknown.stderr


def test_help_lists_config_keys(tmp_path: Path) -> None:
    result = run_strata("aggregator", "serve", "--help", home=tmp_path)
    assert result.returncode == 0
    assert "round.deadline_s" in result.stdout and "STRATA_" in result.stdout


def test_ring_show_places_an_agent_like_the_aggregators_do(tmp_path: Path) -> None:
    from coordinator.membership import AggregatorInfo

    config = CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"))
    with CoordinatorDaemon(config) as daemon:
        assert daemon.membership is not None
        for name in ("agg-a", "agg-b", "agg-c"):
            daemon.membership.register(AggregatorInfo(id=name, address=f"127.0.0.1:{7200 + ord(name[-1])}"))
        expected = daemon.membership.ring().owner("agent-42").id
        result = run_strata("ring", "show", "--agent", "agent-42", "--coordinator", daemon.address, "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert [m["id"] for m in shown["members"]] == ["agg-a", "agg-b", "agg-c"]
    assert shown["agents"] == {"agent-42": expected}
