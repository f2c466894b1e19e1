"""The federated loop with real processes: one aggregator, several agents, rounds that improve a model.

1. `strata aggregator serve` plus one `strata agent run` process with 4 agents (digits,
   Dirichlet non-IID) run >= 4 rounds; the final model beats chance by far, the journal's
   base accuracy rises, the cluster manifests are right, and the CLI's lineage/verify agree.
2. kill -9 of the aggregator mid-round: the restarted aggregator rebuilds the round from
   its journal; nothing acknowledged is lost and a resend is not counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.client import Client
from agent.tasks.digits import DigitsTask
from aggregator.journal import Journal
from storage.codec import decode_tensors
from storage.manifest import Manifest
from storage.models import load_model
from storage.store import LocalStore
from tests.procs import (
    ProcessFactory,
    StrataProcess,
    free_port,
    procs_fixture,  # noqa: F401  (registers the `procs` fixture)
    run_strata,
    wait_healthy,
)

AGENTS = 4
ROUNDS = 5


def start_aggregator(
    procs: ProcessFactory, tmp_path: Path, port: int, *settings: str, name: str = "agg"
) -> StrataProcess:
    args = [
        "aggregator", "serve",
        "--set", "id=agg-a",
        "--set", f"listen=127.0.0.1:{port}",
        "--set", f"state_dir={tmp_path / 'agg-state'}",
        "--set", f"store={tmp_path / 'store'}",
        "--set", "serving.heartbeat_interval_s=1",
    ]
    for setting in settings:
        args += ["--set", setting]
    process = procs.strata(*args, name=name)
    process.wait_for_event("aggregator_started", timeout=60)
    wait_healthy(f"127.0.0.1:{port}", timeout=20)
    return process


def write_agent_configs(tmp_path: Path, port: int, count: int, max_rounds: int) -> list[Path]:
    paths = []
    for index in range(count):
        config = {
            "id": f"agent-{index}",
            "seeds": [f"127.0.0.1:{port}"],
            "task": "digits",
            "task_options": {"partition": {"scheme": "dirichlet", "alpha": 0.5, "index": index, "count": count}},
            "state_dir": str(tmp_path / f"agent-{index}"),
            "max_rounds": max_rounds,
            "backoff_max_s": 1.0,
        }
        path = tmp_path / f"agent-{index}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_agents_train_a_model_over_rounds(procs: ProcessFactory, tmp_path: Path) -> None:
    port = free_port()
    agg = start_aggregator(
        procs, tmp_path, port,
        "round.quorum=1.0", f"round.min_updates={AGENTS}", "round.deadline_s=60",
    )
    configs = write_agent_configs(tmp_path, port, AGENTS, ROUNDS)
    agents = procs.strata("agent", "run", *[arg for p in configs for arg in ("--config", str(p))], name="agents")
    assert agents.wait_exit(timeout=120) == 0, agents.tail()
    last_close = agg.wait_for_event("round_closed", lambda e: e["round"] == ROUNDS - 1, timeout=20)
    assert agg.terminate() == 0, agg.tail()  # SIGTERM is a clean shutdown

    closes = agg.events("round_closed")
    assert [e["round"] for e in closes] == list(range(ROUNDS))
    assert all(e["participants"] == AGENTS for e in closes), closes
    assert len(agg.events("update_accepted")) == AGENTS * ROUNDS
    assert not agg.events("update_refused")

    store = LocalStore(tmp_path / "store")
    final_cid = last_close["cluster"]
    _, final_weights = load_model(store, final_cid)
    final_accuracy = DigitsTask.evaluate_global(decode_tensors(final_weights))["accuracy"]
    assert final_accuracy > 0.6, final_accuracy
    print(f"final global accuracy {final_accuracy:.3f}")

    with Journal(tmp_path / "agg-state" / "journal.sqlite") as journal:
        history = [r for r in journal.history() if r.closed_at is not None]
        updates = list(journal.iter_all_updates())
    assert len(history) == ROUNDS
    # agents evaluate each base on their held-out slice before training: round 0's random
    # base is near chance, and each later base (the previous round's cluster model) is better
    base_accuracy = [r.base_metrics["accuracy"] for r in history]
    print("base accuracy by round", [round(a, 3) for a in base_accuracy])
    assert base_accuracy[0] < 0.35, base_accuracy
    assert base_accuracy[-1] > base_accuracy[0] + 0.3, base_accuracy
    assert base_accuracy[-1] >= max(base_accuracy) - 0.05, base_accuracy

    for record in history:
        cluster = Manifest.from_bytes(store.get(record.cluster_cid))
        accepted = [u for u in updates if u.counted_round == record.round]
        assert cluster.kind == "cluster"
        assert cluster.round == record.round
        assert cluster.base == record.base_cid
        assert cluster.producer.role == "aggregator" and cluster.producer.id == "agg-a"
        assert sorted(cluster.parents) == sorted(u.update_cid for u in accepted)
        assert len(cluster.parents) == AGENTS
        assert cluster.num_samples == sum(u.num_samples for u in accepted) == record.num_samples
        assert cluster.algorithm.get("name") == "fedavg", cluster.algorithm
        assert cluster.signature, "cluster model is unsigned"
        cluster.verify_signature()
        for update_cid in cluster.parents:
            update = Manifest.from_bytes(store.get(update_cid))
            assert update.kind == "local" and update.base == record.base_cid
            update.verify_signature()
        # no synthesizer without peers: the cluster model is the next round's base
        assert record.next_base_cid == record.cluster_cid

    cli_env = {"STRATA_STORE": str(tmp_path / "store")}
    lineage = run_strata("lineage", final_cid, "--json", home=tmp_path / "cli-home", env=cli_env)
    assert lineage.returncode == 0, lineage.stderr
    text = lineage.stdout
    assert final_cid in text
    final_parents = Manifest.from_bytes(store.get(final_cid)).parents
    assert all(cid in text for cid in final_parents), "lineage does not reach the final round's local updates"
    json.loads(text)

    verified = run_strata("verify", final_cid, home=tmp_path / "cli-home", env=cli_env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    store.close()


def local_update(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A small, distinct, valid change of the base weights."""
    rng = np.random.default_rng(seed)
    return {name: (array + rng.normal(0, 0.01, array.shape)).astype(array.dtype) for name, array in base.items()}


def test_kill9_mid_round_loses_nothing_and_counts_nothing_twice(procs: ProcessFactory, tmp_path: Path) -> None:
    port = free_port()
    settings = ("round.quorum=1.0", "round.min_updates=3", "round.deadline_s=600")
    agg = start_aggregator(procs, tmp_path, port, *settings)
    address = f"127.0.0.1:{port}"

    clients = [
        Client(address, agent_id=f"client-{i}", watch=False, join_timeout_s=30, backoff_max_s=0.5).connect()
        for i in range(3)
    ]
    try:
        base = clients[0].wait_for_model(timeout=10)
        for client in clients[1:]:
            client.wait_for_model(timeout=10)
        samples = [100, 250, 37]
        updates = [local_update(base, seed) for seed in range(3)]
        receipts = [clients[i].submit(updates[i], samples[i], {"loss": 1.0}) for i in range(2)]
        assert not any(r.duplicate for r in receipts)
        assert agg.wait_for_event("update_accepted", lambda e: e["accepted"] == 2, timeout=10)

        agg.kill9()
        agg = start_aggregator(procs, tmp_path, port, *settings, name="agg")
        recovered = agg.wait_for_event("round_recovered", timeout=10)
        assert recovered["round"] == 0 and recovered["updates"] == 2

        # the client library remembers nothing without a state_dir: resend through the raw path
        again = clients[1].submit(updates[1], samples[1], {"loss": 1.0})
        assert again.duplicate and again.update_cid == receipts[1].update_cid
        third = clients[2].submit(updates[2], samples[2], {"loss": 1.0})
        assert not third.duplicate

        closed = agg.wait_for_event("round_closed", lambda e: e["round"] == 0, timeout=15)
    finally:
        for client in clients:
            client.close()
    assert closed["participants"] == 3
    assert closed["num_samples"] == sum(samples)
    assert len(agg.events("round_closed")) == 1

    store = LocalStore(tmp_path / "store")
    cluster = Manifest.from_bytes(store.get(closed["cluster"]))
    assert sorted(cluster.parents) == sorted([receipts[0].update_cid, receipts[1].update_cid, third.update_cid])
    assert cluster.num_samples == sum(samples)
    # FedAvg of exactly those three updates, weighted by their sample counts
    _, weights = load_model(store, closed["cluster"])
    result = decode_tensors(weights)
    for name in base:
        expected = sum(n * u[name].astype(np.float64) for n, u in zip(samples, updates, strict=True)) / sum(samples)
        np.testing.assert_allclose(result[name], expected, rtol=1e-4, atol=1e-5)
    store.close()
