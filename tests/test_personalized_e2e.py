"""Personalized evaluation through real daemons: two aggregators (static membership, shared local
store) with `evaluation: task:digits`, one `strata agent run` process with 4 digits agents for 2
rounds. `strata history` shows, per round, the semi-global model's mean accuracy on the agents' own
data and its accuracy on the held-out split, and both agree with what the journal and the model say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agent.tasks.digits import DigitsTask
from aggregator.journal import Journal
from storage.codec import decode_tensors
from storage.models import load_model
from storage.store import LocalStore
from tests.procs import ProcessFactory, free_port, procs_fixture, run_strata, wait_healthy  # noqa: F401
from tests.test_loop_e2e import write_agent_configs

AGENTS = 4
ROUNDS = 2


def _config(tmp_path: Path, name: str, ports: dict[str, int]) -> Path:
    config = {
        "id": name,
        "listen": f"127.0.0.1:{ports[name]}",
        "state_dir": str(tmp_path / f"{name}-state"),
        "store": str(tmp_path / "store"),
        "peers": [f"{peer}=127.0.0.1:{port}" for peer, port in ports.items()],
        "evaluation": "task:digits",
        "round": {"quorum": 1.0, "min_updates": 1, "deadline_s": 60},
        "synthesis": {"peer_wait_s": 5},
        "serving": {"heartbeat_interval_s": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_history_shows_the_semi_global_models_own_data_and_held_out_accuracy(procs: ProcessFactory, tmp_path: Path) -> None:
    ports = {"agg-a": free_port(), "agg-b": free_port()}
    aggregators = {
        name: procs.strata("aggregator", "serve", "--config", str(_config(tmp_path, name, ports)), name=name) for name in ports
    }
    for name, process in aggregators.items():
        process.wait_for_event("aggregator_started", timeout=150)  # two start at once on a loaded machine
        wait_healthy(f"127.0.0.1:{ports[name]}", timeout=20)
    configs = write_agent_configs(tmp_path, ports["agg-a"], AGENTS, ROUNDS)
    agents = procs.strata("agent", "run", *[arg for p in configs for arg in ("--config", str(p))], name="agents")
    assert agents.wait_exit(timeout=300) == 0, agents.tail()
    for process in aggregators.values():
        assert process.terminate() == 0, process.tail()

    store = LocalStore(tmp_path / "store")
    state_dirs = [arg for name in ports for arg in ("--state-dir", str(tmp_path / f"{name}-state"))]
    shown = run_strata("history", *state_dirs, "--json", home=tmp_path / "cli")
    assert shown.returncode == 0, shown.stderr
    histories = json.loads(shown.stdout)
    checked = 0
    for name in ports:
        rows = [r for r in histories[f"{name}-state"] if r["closed"]]
        with Journal(tmp_path / f"{name}-state" / "journal.sqlite", readonly=True) as journal:
            updates = list(journal.iter_all_updates())
        for row in rows:
            manifest, weights = load_model(store, row["next_base"])
            if manifest.kind != "semi-global":
                continue  # a round that closed while its peer had nothing yet keeps its cluster model
            # held out: the aggregator's own evaluation, in the manifest and in the history row
            expected = DigitsTask.evaluate_global(decode_tensors(weights))["accuracy"]
            assert manifest.metrics["heldout_accuracy"] == pytest.approx(expected, abs=1e-6)
            assert row["heldout_accuracy"] == pytest.approx(expected, abs=1e-6)
            cluster, cluster_weights = load_model(store, row["cluster"])
            assert row["cluster_heldout_accuracy"] == pytest.approx(
                DigitsTask.evaluate_global(decode_tensors(cluster_weights))["accuracy"], abs=1e-6
            )
            # own data: what the agents that trained on this model reported for it, one agent one vote
            reported = {u.agent_id: u.base_metrics["accuracy"] for u in updates if u.base_cid == row["next_base"]}
            if reported:
                assert row["own_accuracy"] == pytest.approx(sum(reported.values()) / len(reported))
                checked += 1
            else:
                assert row["own_accuracy"] is None  # the last round's model: nobody trained on it yet
    assert checked >= 1, histories  # round 0's semi-global model was trained on in round 1

    table = run_strata("history", *state_dirs, home=tmp_path / "cli")
    assert table.returncode == 0, table.stderr
    assert "own_accuracy" in table.stdout and "heldout_accuracy" in table.stdout
    store.close()
