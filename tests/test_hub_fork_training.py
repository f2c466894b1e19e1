"""A fork trains another task: the FLHub experiment's mechanism (bench/flhub.py) at its smallest.

tests/test_hub.py forks within one task (digits). Here an MNIST release is forked, feature layers
only with a new head, into a Fashion-MNIST federation; the fork's CID is an aggregator's
initial_model and a real `fashion_mnist` agent trains it one round over gRPC. The round's model
starts from the fork, keeps nothing of MNIST's head, evaluates on Fashion-MNIST, and names the fork
as its base (the fork's own lineage reaching MNIST's base is tests/test_hub.py's). A real
coordinator daemon and the real CLI (in-process, like tests/test_hub.py), on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.daemon import run_agents
from agent.tasks.fashion_mnist import DEFAULT_DIR
from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.client import CoordinatorClient
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from storage.codec import decode_tensors
from storage.manifest import Manifest
from storage.store import LocalStore
from strata.cli import main
from tests.agent_service_contract import wait_until

needs_package = pytest.mark.skipif(
    not (Path(DEFAULT_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)
ROUND_WAIT_S = 120.0  # bounds a hang only: one local batch on a loaded machine takes seconds


def _cli(coordinator: str, *args: str) -> Any:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*args, "--coordinator", coordinator, "--json"])
    assert code == 0, f"strata {' '.join(args)} -> {code}: {stdout.getvalue()}"
    return json.loads(stdout.getvalue())


@needs_package
@pytest.mark.slow  # ~25 s under load: the round waits on a real agent loading Fashion-MNIST and training
def test_a_feature_fork_of_an_mnist_release_trains_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_path = tmp_path / "store"
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the operator key the CLI signs with
    monkeypatch.setenv("STRATA_STORE", str(store_path))
    with CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"))) as coordinator:
        source = _cli(coordinator.address, "federation", "create", "mnist", "--base", "task:mnist")
        _cli(coordinator.address, "release", source["base"], "--federation", "mnist", "--version", "1.0.0")
        fork = _cli(coordinator.address, "fork", "mnist@1.0.0", "--as", "fashion-features", "--layers", "features",
                    "--new-head", "classes=10", "--seed", "7", "--task", "fashion_mnist")
        assert fork["task"] == "fashion_mnist" and fork["forked_from"] == source["base"]

        aggregator = AggregatorDaemon(AggregatorConfig(
            id="agg-fork", listen="127.0.0.1:0", federation="fashion-features", initial_model=fork["base"],
            state_dir=str(tmp_path / "agg"), store=str(store_path), coordinator=coordinator.address,
            round=RoundSettings(quorum=1.0, min_updates=1, deadline_s=ROUND_WAIT_S, agent_timeout_s=ROUND_WAIT_S),
        )).start()  # fmt: skip
        stop = threading.Event()
        agent = AgentConfig(
            id="fashion-agent", seeds=[aggregator.address], federation="fashion-features", task="fashion_mnist",
            task_options={"max_samples": 64, "max_batches": 1, "batch_size": 16, "seed": 0},
            state_dir=str(tmp_path / "agent"), max_rounds=1, backoff_max_s=1.0,
        )  # fmt: skip
        runner = threading.Thread(target=run_agents, args=([agent], stop), daemon=True)
        try:
            runner.start()
            wait_until(lambda: aggregator.rounds.closed_rounds(), timeout=ROUND_WAIT_S, what="round 0 to close")
            record = aggregator.rounds.closed_rounds()[0]
        finally:
            stop.set()
            runner.join(timeout=30)
            aggregator.stop()

        store = LocalStore(store_path)
        cluster = Manifest.from_bytes(store.get(record.cluster_cid))
        assert cluster.base == fork["base"] and cluster.federation == "fashion-features"
        source_weights = decode_tensors(store.get(Manifest.from_bytes(store.get(source["base"])).weights))
        fork_weights = decode_tensors(store.get(Manifest.from_bytes(store.get(fork["base"])).weights))
        assert np.array_equal(fork_weights["conv1.weight"], source_weights["conv1.weight"])  # the backbone came across
        assert not np.array_equal(fork_weights["head.weight"], source_weights["head.weight"])  # the head did not
        trained = decode_tensors(store.get(cluster.weights))
        assert not np.array_equal(trained["head.weight"], fork_weights["head.weight"])  # the agent trained the new head

        evaluated = _cli(coordinator.address, "evaluate", record.cluster_cid, "--task", "fashion_mnist")
        assert 0.0 <= evaluated["accuracy"] <= 1.0

        # lineage crosses federations: from the fork's trained model, through its base, into MNIST's
        from_store = _lineage(record.cluster_cid, "--bases")
        assert from_store["nodes"][record.cluster_cid]["base"] == fork["base"]
        assert from_store["nodes"][fork["base"]]["parents"] == [source["base"]]
        assert from_store["nodes"][source["base"]]["kind"] == "base" and from_store["ok"]
        assert source["base"] not in _lineage(record.cluster_cid)["nodes"]  # without --bases: what it was made of
        wait_until(lambda: _indexed(coordinator.address, record.cluster_cid), timeout=30, what="the cluster's announcement")
        from_index = _lineage(record.cluster_cid, "--bases", "--coordinator", coordinator.address)
        assert from_index["source"] == "coordinator"
        assert {fork["base"], source["base"]} <= set(from_index["nodes"])
        assert from_index["nodes"][record.cluster_cid]["base"] == fork["base"]


def _lineage(cid: str, *args: str) -> dict[str, Any]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["lineage", cid, *args, "--json"])
    assert code == 0, stdout.getvalue()
    return json.loads(stdout.getvalue())


def _indexed(coordinator: str, cid: str) -> bool:
    with CoordinatorClient(coordinator) as client:
        return any(model.cid == cid for model in client.list_models(kind="cluster"))
