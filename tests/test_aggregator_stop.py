"""Stopping an aggregator while a round closes: the model still reaches the shared store and the
coordinator's index. A real coordinator daemon and a real aggregator daemon on 127.0.0.1, with a private
and a shared store in separate directories (as deploy/docker-compose.yml has them, Kubo standing in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.daemon import AggregatorDaemon
from coordinator.client import CoordinatorClient
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from storage.codec import encode_tensors
from storage.manifest import Producer
from storage.models import save_model
from storage.store import LocalStore
from strata.wiring import initial_model_factory
from tests.agent_service_contract import wait_until


def test_a_model_made_while_the_aggregator_stops_is_still_published_and_announced(
    tmp_path: Path,
) -> None:
    with CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"))) as coordinator:
        config = AggregatorConfig(
            id="agg-a",
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "agg"),
            store=str(tmp_path / "private"),
            shared_store=str(tmp_path / "shared"),
            coordinator=coordinator.address,
        )
        aggregator = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
        core = aggregator.federations[aggregator.default_federation]
        made: list[str] = []

        # join_ticker stands in for the ticker's last close: a real round closing exactly while stop()
        # drains cannot be timed deterministically; the model, stores, link and coordinator are real
        def a_round_closes_during_the_drain(timeout: float) -> None:
            cluster = save_model(
                core.store,
                weights=encode_tensors({"w": np.ones(3, np.float32)}),
                kind="cluster",
                federation=core.federation,
                round=7,
                producer=Producer(role="aggregator", id="agg-a"),
                key=core.key,
            )
            core._on_model(cluster)
            made.append(cluster.cid)

        core.join_ticker = a_round_closes_during_the_drain  # type: ignore[method-assign]
        aggregator.stop()
        assert made and LocalStore(tmp_path / "shared").has(made[0])  # peers can fetch it

        restarted = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()  # the outbox sends what stop() kept
        try:
            with CoordinatorClient(coordinator.address) as client:
                wait_until(lambda: made[0] in {m.cid for m in client.list_models(kind="cluster")}, 20, "announced")
        finally:
            restarted.stop()
