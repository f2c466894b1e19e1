"""Three aggregators, each publishing to its own real (embedded) Kubo node: semi-global synthesis
fetches the peers' cluster models through IPFS, over bitswap from the peers' nodes.

Each aggregator keeps its updates in a private local store and publishes cluster and
semi-global models to its Kubo node. The test closes rounds on B and C first, checks
that A's node does not hold their cluster models, then closes A's round and checks
that A's semi-global model used them, that they came through A's shared (IPFS) store
rather than a peer's FetchBlob, and that A's node now holds them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.client import Client
from agent.tasks.digits import DigitsTask
from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from aggregator.journal import RoundRecord
from storage.ipfs import IpfsStore
from storage.models import load_manifest
from strata.supervise import free_port
from strata.wiring import initial_model_factory
from tests.kubo_embedded import kubo_nodes  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

NAMES = ("agg-a", "agg-b", "agg-c")


def _train_once(address: str, agent_id: str, index: int) -> None:
    task = DigitsTask(partition={"scheme": "iid", "index": index, "count": 3}, epochs=1)
    with Client([address], agent_id=agent_id, federation="digits", watch=False) as client:
        weights = client.wait_for_model(timeout=30)
        new_weights, num_samples, metrics = task.train(weights, {})
        client.submit(new_weights, num_samples, metrics)


def _closed_round(daemon: AggregatorDaemon, timeout: float = 60.0) -> RoundRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        closed = [r for r in daemon.rounds.history() if r.closed_at is not None]
        if closed:
            return closed[0]
        time.sleep(0.1)
    raise AssertionError(f"{daemon.id} closed no round within {timeout}s")


def test_synthesis_fetches_peer_models_over_bitswap(tmp_path: Path, kubo_nodes) -> None:  # noqa: F811
    nodes = dict(zip(NAMES, kubo_nodes(3), strict=True))
    for a, b in (("agg-a", "agg-b"), ("agg-a", "agg-c"), ("agg-b", "agg-c")):
        nodes[a].connect(nodes[b])
    ports = {name: free_port() for name in NAMES}
    peers = [f"{name}=127.0.0.1:{port}" for name, port in ports.items()]
    daemons: dict[str, AggregatorDaemon] = {}
    try:
        for name in NAMES:
            config = AggregatorConfig(
                id=name,
                listen=f"127.0.0.1:{ports[name]}",
                peers=peers,
                state_dir=str(tmp_path / name),
                store=str(tmp_path / name / "private"),
                shared_store=f"ipfs:{nodes[name].api_multiaddr}?fetch_timeout=20",
                round=RoundSettings(quorum=1.0, deadline_s=60),
                synthesis=SynthesisSettings(fetch_timeout_s=20),
            )
            daemons[name] = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
        ring = daemons["agg-a"].ring_view.ring
        homed = {name: next(f"agent-{i}" for i in range(1000) if ring.owner(f"agent-{i}").id == name) for name in NAMES}

        for index, name in enumerate(("agg-b", "agg-c")):
            _train_once(daemons[name].address, homed[name], index)
        clusters = {}
        for name in ("agg-b", "agg-c"):
            clusters[name] = _closed_round(daemons[name]).cluster_cid
        shared_a = daemons["agg-a"].shared_store
        assert isinstance(shared_a, IpfsStore)
        for name, cid in clusters.items():
            assert daemons[name].shared_store.is_pinned(cid), "published models are pinned on their own node"
            assert not shared_a.has(cid), f"{name}'s cluster model must not be on A's node before synthesis"
            assert not daemons["agg-a"].store.has(cid), "nor in A's private store"

        _train_once(daemons["agg-a"].address, homed["agg-a"], 2)
        record = _closed_round(daemons["agg-a"])
        semi = load_manifest(daemons["agg-a"].store, record.next_base_cid)
        assert semi.kind == "semi-global"
        assert set(clusters.values()) <= set(semi.parents), semi.extra.get("refused_peers")
        sources = daemons["agg-a"].synthesizer.last_sources
        for name, cid in clusters.items():
            assert sources[cid] == "shared store", f"{name}'s model came via {sources.get(cid)}, not IPFS"
            assert shared_a.has(cid), "A's Kubo node now holds the block it fetched over bitswap"
        # A published its own semi-global model to its node, pinned
        assert shared_a.is_pinned(semi.cid) and shared_a.is_pinned(semi.weights)
    finally:
        for daemon in daemons.values():
            daemon.stop()
