"""The relay's back-pressure, through running daemons: while its upstream aggregator is down it
holds device updates up to forward.max_pending_updates / forward.max_pending_bytes, then
answers SubmitUpdate with accepted=false, reason upstream_unavailable; once upstream is back
and the backlog is forwarded, devices are accepted again.

The aggregator and the relay run in-process (daemons built from their configs) on
127.0.0.1; devices are plain gRPC stubs; the backlog is watched on the relay's Prometheus
endpoint. Waits are bounded only to turn a hang into a failure.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from relay.config import ForwardSettings, RelayConfig, UpstreamSettings, WindowSettings
from relay.daemon import RelayDaemon
from strata.wiring import initial_model_factory
from tests.agent_service_contract import base_tensors, join, nudged, stub_for, submit, wait_until
from tests.procs import free_port
from tests.scrape import wait_for_metric

WINDOWS = "strata_relay_windows"


def aggregator_config(tmp_path: Path, port: int) -> AggregatorConfig:
    return AggregatorConfig(
        id="agg-up",
        listen=f"127.0.0.1:{port}",
        state_dir=str(tmp_path / "agg-state"),
        store=str(tmp_path / "agg-store"),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        round=RoundSettings(min_updates=1, quorum=0.01, deadline_s=60.0),
        synthesis=SynthesisSettings(enabled=False),
    )


def start_aggregator(config: AggregatorConfig) -> AggregatorDaemon:
    return AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()


def relay_ready(stub: object) -> bool:
    """True once the relay serves a base (it joins upstream and adopts one in the background)."""
    try:
        return bool(join(stub, "probe-device", capability=pb.INFERENCE).base.model_cid)
    except (grpc.RpcError, AssertionError):
        return False


def update_size(aggregator: AggregatorDaemon) -> int:
    """Bytes of one device update: every nudged copy of the base has the same safetensors size."""
    channel, stub = stub_for(aggregator.address)
    with channel:
        home = join(stub, "sizer", capability=pb.INFERENCE)
        return len(nudged(base_tensors(stub, home.base.model_cid)))


@pytest.mark.parametrize("limit", ["max_pending_updates", "max_pending_bytes"])
def test_full_backlog_refuses_devices_until_upstream_drains_it(tmp_path: Path, limit: str) -> None:
    port = free_port()
    config = aggregator_config(tmp_path, port)
    aggregator = start_aggregator(config)
    size = update_size(aggregator)
    # room for exactly two held updates, by count or by bytes; the other limit far away
    forward = (
        ForwardSettings(retry_s=0.2, max_pending_updates=2)
        if limit == "max_pending_updates"
        else ForwardSettings(retry_s=0.2, max_pending_updates=1000, max_pending_bytes=2 * size)
    )
    metrics_port = free_port()
    relay = RelayDaemon(
        RelayConfig(
            id="relay-bp",
            seeds=[aggregator.address],
            listen="127.0.0.1:0",
            state_dir=str(tmp_path / "relay-state"),
            serving=ServingSettings(heartbeat_interval_s=0.5),
            agent_timeout_s=600.0,
            window=WindowSettings(max_devices=2, max_wait_s=600.0),
            forward=forward,
            upstream=UpstreamSettings(join_timeout_s=5.0, backoff_base_s=0.1, backoff_max_s=0.5, rpc_timeout_s=5.0),
            metrics_port=metrics_port,
        )
    ).start()
    channel, stub = stub_for(relay.address)
    try:
        wait_until(lambda: relay_ready(stub), 20, "the relay to serve an upstream base")
        aggregator.stop()  # upstream down

        homes = {device: join(stub, device) for device in ("d1", "d2", "d3")}
        base = homes["d1"].base
        tensors = base_tensors(stub, base.model_cid)
        for i, device in enumerate(("d1", "d2")):
            reply = submit(stub, nudged(tensors, 0.01 * (i + 1)), agent_id=device, base=base)
            assert reply.accepted, reply
        # the two updates fill the backlog (they close one window, which cannot be forwarded)
        wait_for_metric(metrics_port, lambda m: m.value(WINDOWS, status="pending") == 1, "the window to close")
        refused = submit(stub, nudged(tensors, 0.03), agent_id="d3", base=base)
        assert (refused.accepted, refused.reason) == (False, "upstream_unavailable"), refused

        aggregator = start_aggregator(config)  # upstream back, same address and state
        drained = wait_for_metric(
            metrics_port,
            lambda m: m.value(WINDOWS, status="pending") == 0,
            "the held window to be forwarded upstream",
        )
        assert drained.labelled(WINDOWS, "status") == {"pending": 0, "forwarded": 1, "dropped": 0}

        base = join(stub, "d3").base  # the relay's base now: upstream may have moved on
        accepted = submit(stub, nudged(base_tensors(stub, base.model_cid), 0.03), agent_id="d3", base=base)
        assert accepted.accepted, accepted
    finally:
        channel.close()
        relay.stop()
        aggregator.stop()
