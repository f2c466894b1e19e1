"""What the Prometheus endpoints say, value by value, after known traffic: the aggregator's
accepted and refused updates (by reason), rounds and active agents; the relay's windows,
devices and cache bytes. Scraped over HTTP and parsed with prometheus_client's parser.

Daemons run in-process (built from their configs) on 127.0.0.1; agents and devices are
plain gRPC stubs. Waits are bounded only to turn a hang into a failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.client import AggregatorInfo
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from intake.config import ServingSettings
from relay.config import ForwardSettings, RelayConfig, UpstreamSettings, WindowSettings
from relay.daemon import RelayDaemon
from storage.codec import decode_tensors, encode_tensors
from strata.readme import METRICS_BY_DAEMON
from strata.wiring import initial_model_factory
from tests.agent_service_contract import (
    base_tensors,
    get_model,
    join,
    nudged,
    stub_for,
    submit,
    wait_until,
)
from tests.procs import free_port
from tests.scrape import Metrics, scrape, wait_for_metric
from tests.test_relay_backpressure import relay_ready

AGG = "strata_aggregator_"
RELAY = "strata_relay_"


def start_aggregator(tmp_path: Path, settings: RoundSettings) -> tuple[AggregatorDaemon, int]:
    metrics_port = free_port()
    config = AggregatorConfig(
        id="agg-metrics",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "agg-state"),
        store=str(tmp_path / "agg-store"),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        round=settings,
        synthesis=SynthesisSettings(enabled=False),
        metrics_port=metrics_port,
    )
    return AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start(), metrics_port


def aggregator_values(metrics: Metrics) -> dict[str, object]:
    return {
        "accepted": metrics.value(AGG + "updates_accepted_total"),
        "refused": metrics.labelled(AGG + "updates_refused_total", "reason"),
        "rounds_closed": metrics.value(AGG + "rounds_closed_total"),
        "round": metrics.value(AGG + "round"),
        "round_updates": metrics.value(AGG + "round_updates"),
        "active_agents": metrics.value(AGG + "active_agents"),
    }


def assert_in_catalogue(metrics: Metrics, daemon: str) -> None:
    """Every family the endpoint serves is in the README's catalogue, with the catalogue's type."""
    # Prometheus's text format has no info type: it serves NAME_info as a gauge
    catalogue = {
        spec.sample_name if spec.kind == "info" else spec.name: "gauge" if spec.kind == "info" else spec.kind
        for spec in METRICS_BY_DAEMON[daemon]
    }
    served = {name: kind for name, kind in metrics.types.items()}
    assert {name: catalogue.get(name) for name in served} == served


def poisoned(tensors: dict[str, np.ndarray]) -> bytes:
    bad = {name: array.copy() for name, array in tensors.items()}
    bad[sorted(bad)[0]].reshape(-1)[0] = np.nan
    return encode_tensors(bad)


def test_aggregator_counts_accepted_refused_and_rounds(tmp_path: Path) -> None:
    # quorum 1.0 over 3 trainers, a 10-minute deadline: round 0 closes on the third update
    daemon, port = start_aggregator(
        tmp_path, RoundSettings(quorum=1.0, min_updates=1, deadline_s=600.0, agent_timeout_s=600.0)
    )
    channel, stub = stub_for(daemon.address)
    try:
        base = {agent: join(stub, agent) for agent in ("a1", "a2", "a3")}["a1"].base
        tensors = base_tensors(stub, base.model_cid)
        idle = scrape(port)
        assert idle.types[AGG + "updates_accepted"] == "counter" and idle.types[AGG + "round"] == "gauge"

        refusals = [("a2", poisoned(tensors)), ("a3", b"not safetensors"), ("a2", poisoned(tensors))]
        for agent, blob in refusals:
            assert not submit(stub, blob, agent_id=agent, base=base).accepted
        good = [nudged(tensors, 0.01 * (i + 1)) for i in range(3)]
        # what each agent reports: its training accuracy, and the base's accuracy on its own data
        reports = [{"metrics": {"accuracy": 0.5 + 0.1 * i}, "base_metrics": {"accuracy": 0.2 * i}} for i in range(3)]
        for agent, blob, report in zip(("a1", "a2"), good[:2], reports[:2], strict=True):  # a refused agent may still send a good update
            assert submit(stub, blob, agent_id=agent, base=base, **report).accepted
        open_round = scrape(port)

        assert submit(stub, good[2], agent_id="a3", base=base, **reports[2]).accepted
        # one scrape reads the journal's counters and the live round separately, so a scrape
        # taken while the round closes can mix before and after: wait for both, then read again
        wait_for_metric(
            port,
            lambda m: m.value(AGG + "round") == 1 and m.value(AGG + "rounds_closed_total") == 1,
            "round 0 to close on quorum",
        )
        closed = scrape(port)
        latest = daemon.journal.latest_closed_round()
        opened_at = daemon.rounds.opened_at
    finally:
        channel.close()
        daemon.stop()

    refused = {"not_finite": 2, "invalid_safetensors": 1}
    assert aggregator_values(idle) == {
        "accepted": 0, "refused": {}, "rounds_closed": 0, "round": 0, "round_updates": 0, "active_agents": 3,
    }  # fmt: skip
    assert aggregator_values(open_round) == {
        "accepted": 2, "refused": refused, "rounds_closed": 0, "round": 0, "round_updates": 2, "active_agents": 3,
    }  # fmt: skip
    assert aggregator_values(closed) == {
        "accepted": 3, "refused": refused, "rounds_closed": 1, "round": 1, "round_updates": 0, "active_agents": 3,
    }  # fmt: skip
    assert closed.value(AGG + "ring_members") == 1
    # one download of the base (its weights) so far: the aggregator's egress to its fleet
    weights_size = len(encode_tensors(tensors))
    assert (idle.value(AGG + "model_downloads_total"), idle.value(AGG + "model_bytes_served_total")) == (1, weights_size)
    # ingress: the weight bytes of the accepted updates only (refused ones never count)
    assert open_round.value(AGG + "update_bytes_received_total") == sum(len(blob) for blob in good[:2])
    assert closed.value(AGG + "update_bytes_received_total") == sum(len(blob) for blob in good)
    assert closed.value(AGG + "round_deadline_seconds") == 600.0
    assert closed.value(AGG + "round_opened_timestamp_seconds") == opened_at > idle.value(AGG + "round_opened_timestamp_seconds") > 0
    # the model info metric: nothing closed yet, then round 0's cluster model (no synthesis: no semi-global)
    assert latest is not None and latest.cluster_cid
    assert idle.value(AGG + "model_info", federation="digits", round="", cluster_cid="", semi_global_cid="", base_cid=base.model_cid) == 1
    assert closed.value(
        AGG + "model_info", federation="digits", round="0", cluster_cid=latest.cluster_cid, semi_global_cid="",
        base_cid=latest.next_base_cid,
    ) == 1  # fmt: skip
    assert closed.types[AGG + "model_info"] == "gauge"
    # the closed round's sample-weighted means (10 samples each): train 0.5, 0.6, 0.7; base 0, 0.2, 0.4
    assert idle.labelled(AGG + "train_metric", "metric") == {} == idle.labelled(AGG + "base_metric", "metric")
    assert closed.labelled(AGG + "train_metric", "metric") == {"accuracy": pytest.approx(0.6)}
    assert closed.labelled(AGG + "base_metric", "metric") == {"accuracy": pytest.approx(0.2)}
    assert_in_catalogue(closed, "aggregator")


def test_relay_counts_windows_devices_and_cache_bytes(tmp_path: Path) -> None:
    # upstream needs 2 updates to close a round, so the relay's one combined update leaves its base alone
    aggregator, aggregator_port = start_aggregator(
        tmp_path, RoundSettings(quorum=1.0, min_updates=2, deadline_s=600.0, agent_timeout_s=600.0)
    )
    relay_port = free_port()
    relay = RelayDaemon(
        RelayConfig(
            id="relay-metrics",
            seeds=[aggregator.address],
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "relay-state"),
            serving=ServingSettings(heartbeat_interval_s=0.5),
            agent_timeout_s=600.0,
            window=WindowSettings(max_devices=2, max_wait_s=600.0),
            forward=ForwardSettings(retry_s=0.2),
            upstream=UpstreamSettings(join_timeout_s=5.0, backoff_base_s=0.1, backoff_max_s=0.5, rpc_timeout_s=5.0),
            metrics_port=relay_port,
        )
    ).start()
    channel, stub = stub_for(relay.address)
    try:
        wait_until(lambda: relay_ready(stub), 20, "the relay to serve an upstream base")  # joins an inference probe
        homes = {device: join(stub, device) for device in ("d1", "d2", "d3")}
        base = homes["d1"].base
        downloads = {device: get_model(stub)[1] for device in homes}  # each device fetches the base once
        model_bytes = len(downloads["d1"])
        tensors = decode_tensors(downloads["d1"])
        assert not submit(stub, poisoned(tensors), agent_id="d3", base=base).accepted
        for i, device in enumerate(("d1", "d2")):
            assert submit(stub, nudged(tensors, 0.01 * (i + 1)), agent_id=device, base=base).accepted
        relay_metrics = wait_for_metric(
            relay_port, lambda m: m.value(RELAY + "windows", status="forwarded") == 1, "the window to be forwarded"
        )
        upstream = scrape(aggregator_port)
    finally:
        channel.close()
        relay.stop()
        aggregator.stop()

    assert relay_metrics.labelled(RELAY + "windows", "status") == {"pending": 0, "forwarded": 1, "dropped": 0}
    assert relay_metrics.value(RELAY + "active_devices") == 4  # d1-d3 and the inference probe
    assert relay_metrics.value(RELAY + "bytes_served_total") == 3 * model_bytes
    assert relay_metrics.value(RELAY + "bytes_fetched_upstream_total") == model_bytes  # one fetch, cached
    assert relay_metrics.value(RELAY + "bytes_saved") == 2 * model_bytes
    # the base is fetched once when it changes; the first download loads it from the store (a hit),
    # and the two after it are served from memory
    assert relay_metrics.value(RELAY + "downloads_served_total") == 3
    assert (relay_metrics.value(RELAY + "cache_fetches_total"), relay_metrics.value(RELAY + "cache_hits_total")) == (1, 1)
    assert relay_metrics.value(RELAY + "cache_models") == 1
    assert relay_metrics.value(RELAY + "cache_bytes") > model_bytes  # the weights and their manifest
    assert relay_metrics.value(RELAY + "forward_queue") == 0 and relay_metrics.value(RELAY + "held_updates") == 0
    assert relay_metrics.value(RELAY + "upstream_connected") == 1
    assert_in_catalogue(relay_metrics, "relay")
    # upstream saw one update, the relay's combination; the refused device update never left the relay
    assert aggregator_values(upstream) == {
        "accepted": 1, "refused": {}, "rounds_closed": 0, "round": 0, "round_updates": 1, "active_agents": 1,
    }  # fmt: skip


def test_coordinator_counts_lease_changes_and_ring_version(tmp_path: Path) -> None:
    # a settable clock: leases expire when the test says so, not when the machine is slow
    now = [1_000_000.0]
    port = free_port()
    config = CoordinatorConfig(
        listen="127.0.0.1:0", state_dir=str(tmp_path / "coord"), metrics_port=port, lease_ttl_s=5.0, heartbeat_interval_s=1.0
    )
    with CoordinatorDaemon(config, clock=lambda: now[0]) as daemon:
        assert daemon.membership is not None
        idle = scrape(port)
        for name in ("agg-a", "agg-b"):
            daemon.membership.register(AggregatorInfo(id=name, address=f"127.0.0.1:{free_port()}", federations=("digits",)))
        daemon.membership.register(AggregatorInfo(id="agg-b", address=f"127.0.0.1:{free_port()}", federations=("digits",)))
        two = scrape(port)
        now[0] += 3.0
        daemon.membership.heartbeat("agg-a")  # a renewal is not a change
        now[0] += 3.0  # agg-b's lease (renewed at +0) has run out; agg-a's (at +3) has not
        expired = wait_for_metric(port, lambda m: m.value("strata_coordinator_aggregators_alive") == 1, "agg-b to expire")

    assert idle.labelled("strata_coordinator_lease_changes_total", "change") == {"granted": 0, "moved": 0, "expired": 0}
    assert two.labelled("strata_coordinator_lease_changes_total", "change") == {"granted": 2, "moved": 1, "expired": 0}
    assert expired.labelled("strata_coordinator_lease_changes_total", "change") == {"granted": 2, "moved": 1, "expired": 1}
    # every change of membership is a new ring version: two joins, one move, one expiry
    assert expired.value("strata_coordinator_ring_version") - idle.value("strata_coordinator_ring_version") == 4
    assert (two.value("strata_coordinator_ring_members"), expired.value("strata_coordinator_ring_members")) == (2, 1)
    assert_in_catalogue(expired, "coordinator")
