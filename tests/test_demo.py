"""`strata demo` end to end: the --json contract, the lineage it leaves behind, and that it stops every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from storage.cid import is_cid

pytestmark = pytest.mark.slow


def _strata(home: Path, *args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}
    env.pop("STRATA_STORE", None)
    env.pop("STRATA_COORDINATOR", None)
    return subprocess.run(
        [sys.executable, "-m", "strata", *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _leftovers(home: Path) -> list[psutil.Process]:
    """Processes whose command line mentions this test's private HOME: the demo's children."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(home) in part for part in process.info["cmdline"] or ()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_demo_json_contract_and_lineage(tmp_path: Path) -> None:
    result = _strata(tmp_path, "demo", "--json", "--rounds", "4", "--agents", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    assert set(summary) >= {"rounds", "final_model", "final_accuracy"}
    assert len(summary["rounds"]) == 3 * 4
    for entry in summary["rounds"]:
        assert set(entry) >= {"round", "aggregator", "accuracy", "loss", "model"}
        assert is_cid(entry["model"]) and 0.0 <= entry["accuracy"] <= 1.0
    assert {e["aggregator"] for e in summary["rounds"]} == {"agg-a", "agg-b", "agg-c"}
    assert is_cid(summary["final_model"])
    assert summary["dashboard"].startswith("http://127.0.0.1:")  # the web dashboard ran beside the fleet
    assert summary["final_accuracy"] > 0.3  # 10 classes: chance is 0.1
    # the centralized reference: one accuracy per round, shown beside every aggregator's row
    centralized = summary["centralized"]
    assert len(centralized["accuracy"]) == 4 and centralized["epochs_per_round"] == 10
    assert centralized["samples"] > 0 and centralized["accuracy"][-1] > 0.9
    assert [e["centralized_accuracy"] for e in summary["rounds"]] == [centralized["accuracy"][e["round"]] for e in summary["rounds"]]

    # the store the demo used is the CLI's default one: lineage needs no flags
    lineage = _strata(tmp_path, "lineage", summary["final_model"], "--json", timeout=60)
    assert lineage.returncode == 0, lineage.stderr
    nodes = json.loads(lineage.stdout)["nodes"]
    assert nodes[summary["final_model"]]["kind"] == "semi-global"
    kinds = [node["kind"] for node in nodes.values()]
    # the relay's combined update sits among one cluster model's parents; its device
    # updates stay in the relay's private store
    assert kinds.count("cluster") == 3 and kinds.count("local") == 6 and kinds.count("relay") == 1
    assert summary["relay"]["in_final_lineage"] == ["relay-1"]
    assert summary["relay"]["bytes_saved"] > 0
    # the relay forwards when its window holds 4 updates or 8 s passed: under load a slow device
    # misses a window and its update waits for the next one, so how many is a matter of timing; at
    # least one, and never more than its 4 devices (each counts once per window)
    assert 1 <= summary["lineage"]["device_updates_behind_relay"] <= 4
    producers = {node["producer"] for node in nodes.values() if node["kind"] == "cluster"}
    assert producers == {"aggregator:agg-a", "aggregator:agg-b", "aggregator:agg-c"}
    # the whole chain verifies once the relay's private store is searched too
    relay_store = tmp_path / ".strata" / "demo" / "relay" / "store"
    default_store = tmp_path / ".strata" / "store"
    assert _strata(tmp_path, "verify", summary["final_model"], timeout=60).returncode == 4  # device updates out of reach
    both = _strata(tmp_path, "verify", summary["final_model"], "--store", str(default_store), "--store", str(relay_store), timeout=60)
    assert both.returncode == 0, both.stdout + both.stderr

    assert _leftovers(tmp_path) == []


def test_demo_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("STRATA_STORE", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "strata", "demo", "--rounds", "50"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.lstrip().startswith("0  agg-"):
                break
            assert time.monotonic() < deadline, "no round was reported"
        assert _leftovers(tmp_path), "the fleet should be running"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    time.sleep(0.5)
    assert _leftovers(tmp_path) == []


def test_demo_with_tls_runs_every_hop_on_a_throwaway_fleet_ca(tmp_path: Path) -> None:
    result = _strata(tmp_path, "demo", "--tls", "--json", "--rounds", "2", "--agents", "3", "--aggregators", "2", "--devices", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert is_cid(summary["final_model"])
    assert {e["aggregator"] for e in summary["rounds"]} == {"agg-a", "agg-b"}

    demo = tmp_path / ".strata" / "demo"
    ca_pem = demo / "ca" / "ca.pem"
    assert ca_pem.is_file() and (demo / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    # every process served or dialed with its own bundle, and none spoke plaintext
    logs = {path.stem: path.read_text() for path in (demo / "logs").glob("*.log")}
    assert set(logs) >= {"coordinator", "agg-a", "agg-b", "relay", "devices", "agents-0", "agents-1"}
    for name, text in logs.items():
        assert '"tls_on"' in text, name
        assert "plaintext_on_the_network" not in text, name
    # the demo read the coordinator's index as its operator, over mTLS
    assert "the coordinator's index holds" in result.stderr

    # every signer in the final model's chain (device updates behind the relay included) is certified by the demo's CA
    stores = ["--store", str(tmp_path / ".strata" / "store"), "--store", str(demo / "relay" / "store")]
    verified = _strata(tmp_path, "verify", summary["final_model"], "--ca", str(ca_pem), *stores, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "certified by fleet demo's CA" in verified.stdout
    assert _leftovers(tmp_path) == []
