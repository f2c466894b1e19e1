"""Robust rules end to end: two real aggregator processes (static membership, shared local store),
clients over gRPC, coordinate-wise median inside each cluster with FedAvgM on top, and median
for the semi-global merge; the CLI shows which rule made each model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from agent.client import Client
from storage.codec import decode_tensors
from storage.manifest import Manifest
from storage.models import load_model
from storage.store import LocalStore
from tests.procs import ProcessFactory, free_port, procs_fixture, run_strata, wait_healthy  # noqa: F401

CLIENTS = 8


def _config(tmp_path: Path, name: str, ports: dict[str, int]) -> Path:
    config = {
        "id": name,
        "listen": f"127.0.0.1:{ports[name]}",
        "state_dir": str(tmp_path / f"{name}-state"),
        "store": str(tmp_path / "store"),
        "peers": [f"{peer}=127.0.0.1:{port}" for peer, port in ports.items()],
        "strategy": "median",
        "server_opt": "fedavgm",
        "round": {"quorum": 1.0, "min_updates": CLIENTS // 2, "deadline_s": 600, "max_relative_norm": 0, "max_num_samples": 1000},
        "synthesis": {"strategy": "median", "peer_wait_s": 20, "decay": "constant", "decay_params": {}},
        "serving": {"heartbeat_interval_s": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_median_clusters_and_median_synthesis_through_real_aggregators(procs: ProcessFactory, tmp_path: Path) -> None:
    ports = {"agg-a": free_port(), "agg-b": free_port()}
    aggregators = {}
    for name in ports:
        aggregators[name] = procs.strata("aggregator", "serve", "--config", str(_config(tmp_path, name, ports)), name=name)
    for name, process in aggregators.items():
        process.wait_for_event("aggregator_started", timeout=60)
        wait_healthy(f"127.0.0.1:{ports[name]}", timeout=20)

    clients = [
        Client(f"127.0.0.1:{ports['agg-a']}", agent_id=f"client-{i}", watch=False, join_timeout_s=30, backoff_max_s=0.5).connect()
        for i in range(CLIENTS)
    ]
    homes: dict[str, list[int]] = {name: [] for name in ports}
    try:
        bases = [client.wait_for_model(timeout=20) for client in clients]
        for i, client in enumerate(clients):
            homes[client.home_id].append(i)
        # ketama over the ids alone: these 8 ids always split 4 / 4, and min_updates = 4 makes each
        # round wait for all four (a median of two, one hostile, would be half the hostile's shift)
        assert sorted(len(members) for members in homes.values()) == [CLIENTS // 2] * 2, homes
        for members in homes.values():
            for rank, i in enumerate(members):
                rng = np.random.default_rng(i)
                # the first client of each cluster is hostile: a huge shift, and an inflated sample claim
                shift = 50.0 if rank == 0 else 0.0
                update = {k: (v + rng.normal(0, 0.01, v.shape) + shift).astype(v.dtype) for k, v in bases[i].items()}
                clients[i].submit(update, 10**9 if shift else 100, {"loss": 1.0})
        closed = {
            name: process.wait_for_event("round_closed", lambda e: e["round"] == 0, timeout=60)
            for name, process in aggregators.items()
        }
    finally:
        for client in clients:
            client.close()
    for process in aggregators.values():
        assert process.terminate() == 0, process.tail()

    store = LocalStore(tmp_path / "store")
    clusters = {}
    for name, event in closed.items():
        cluster, weights = load_model(store, event["cluster"])
        clusters[name] = decode_tensors(weights)
        assert cluster.algorithm["name"] == "median" and cluster.algorithm["server_opt"]["name"] == "fedavgm"
        assert cluster.extra["aggregation"]["server_opt"]["step"] == 1
        # FedAvgM's first step with lr 1 is the rule's aggregate: the coordinate-wise median of
        # exactly the updates the cluster names (the round closes on quorum of the agents active then)
        inputs = [decode_tensors(load_model(store, parent)[1]) for parent in cluster.parents]
        assert len(inputs) == event["participants"] == CLIENTS // 2
        for key, tensor in clusters[name].items():
            expected = np.median(np.stack([u[key] for u in inputs]), axis=0)
            np.testing.assert_allclose(tensor, expected, rtol=1e-5, atol=1e-5)
            assert np.abs(tensor - bases[0][key]).max() < 1.0  # the +50 shift never got in
        # its hostile update was counted, capped, and outvoted
        assert any(np.abs(u[key] - bases[0][key]).min() > 10 for u in inputs)
        assert cluster.extra["capped_num_samples"]["max"] == 1000
    for event in closed.values():
        semi = Manifest.from_bytes(store.get(event["next_base"]))
        assert semi.kind == "semi-global" and semi.algorithm["strategy"]["name"] == "median"
        assert set(semi.parents) == {e["cluster"] for e in closed.values()}, semi.extra.get("refused_peers")
        merged = decode_tensors(load_model(store, semi.cid)[1])
        for key, tensor in merged.items():  # the median of two models is their mean
            np.testing.assert_allclose(tensor, (clusters["agg-a"][key] + clusters["agg-b"][key]) / 2, rtol=1e-5, atol=1e-6)
    store.close()

    env = {"STRATA_STORE": str(tmp_path / "store")}
    shown = run_strata("model", "show", closed["agg-a"]["cluster"], home=tmp_path / "cli", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "rule       median+fedavgm(lr=1.0,momentum=0.9)" in shown.stdout
    lineage = run_strata("lineage", closed["agg-a"]["next_base"], "--json", home=tmp_path / "cli", env=env)
    assert lineage.returncode == 0, lineage.stderr
    nodes = json.loads(lineage.stdout)["nodes"]
    assert nodes[closed["agg-a"]["next_base"]]["rule"] == "semi-global: median"
    assert nodes[closed["agg-b"]["cluster"]]["rule"] == "median+fedavgm(lr=1.0,momentum=0.9)"


BULYAN_CLIENTS = 7  # Bulyan with f = 1 needs 4f + 3 updates


def test_bulyan_through_a_real_aggregator_keeps_the_hostile_updates_out(procs: ProcessFactory, tmp_path: Path) -> None:
    port = free_port()
    config = {
        "id": "agg-bulyan",
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "store": str(tmp_path / "store"),
        "peers": [f"agg-bulyan=127.0.0.1:{port}"],
        "strategy": "bulyan",
        "strategy_params": {"f": 1},
        "round": {"quorum": 1.0, "min_updates": BULYAN_CLIENTS, "deadline_s": 600, "max_relative_norm": 0},
        "synthesis": {"enabled": False},
        "serving": {"heartbeat_interval_s": 1},
    }
    path = tmp_path / "agg.yaml"
    path.write_text(yaml.safe_dump(config))
    aggregator = procs.strata("aggregator", "serve", "--config", str(path), name="agg-bulyan")
    aggregator.wait_for_event("aggregator_started", timeout=60)
    wait_healthy(f"127.0.0.1:{port}", timeout=20)
    clients = [
        Client(f"127.0.0.1:{port}", agent_id=f"client-{i}", watch=False, join_timeout_s=30, backoff_max_s=0.5).connect()
        for i in range(BULYAN_CLIENTS)
    ]
    try:
        bases = [client.wait_for_model(timeout=20) for client in clients]
        base = bases[0]
        for i, client in enumerate(clients):
            rng = np.random.default_rng(i)
            # client-0 shifts everything by +50 and claims 10^6 samples. (With a second hostile at -50,
            # Krum's last pick can be either hostile, as it is a near tie of distances to the last
            # honest one; the coordinate step then outvotes it, but which update is refused is noise.)
            shift = 50.0 if i == 0 else 0.0
            update = {k: (v + rng.normal(0, 0.01, v.shape) + shift).astype(v.dtype) for k, v in base.items()}
            client.submit(update, 10**6 if i == 0 else 100, {"loss": 1.0})
        closed = aggregator.wait_for_event("round_closed", lambda e: e["round"] == 0, timeout=60)
    finally:
        for client in clients:
            client.close()
    assert aggregator.terminate() == 0, aggregator.tail()

    store = LocalStore(tmp_path / "store")
    cluster, weights = load_model(store, closed["cluster"])
    result = decode_tensors(weights)
    assert cluster.algorithm["name"] == "bulyan" and cluster.algorithm["params"] == {"f": 1}
    report = cluster.extra["aggregation"]
    assert report["f_used"] == 1 and len(report["selected"]) == BULYAN_CLIENTS - 2
    refused = {r["agent"] for r in report["refused"]}
    assert "client-0" in refused and len(refused) == 2  # θ = 7 - 2: one honest update is left out too
    # the hostile claim was also rescaled against the round's median (round.max_claim_ratio 10 x 100)
    (claim,) = cluster.extra["rescaled_num_samples"]["claims"].values()
    assert claim["agent"] == "client-0" and claim["credited"] == 1000
    # per coordinate: the mean of the 5 - 2 chosen values nearest their median (numpy, independently)
    chosen = [decode_tensors(load_model(store, cid)[1]) for cid in report["selected"]]
    for key, tensor in result.items():
        stack = np.stack([u[key].astype(np.float64) for u in chosen])
        nearest = np.take_along_axis(stack, np.argsort(np.abs(stack - np.median(stack, axis=0)), axis=0)[:3], axis=0)
        np.testing.assert_allclose(tensor, nearest.mean(axis=0), rtol=1e-5, atol=1e-5)
        assert np.abs(tensor - base[key]).max() < 1.0  # the shift never got in
    store.close()

    shown = run_strata("model", "show", closed["cluster"], home=tmp_path / "cli", env={"STRATA_STORE": str(tmp_path / "store")})
    assert shown.returncode == 0, shown.stderr
    assert "rule       bulyan(f=1)" in shown.stdout and "2 refused (client-" in shown.stdout
