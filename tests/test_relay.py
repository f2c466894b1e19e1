"""The relay: the agent-facing contract (against an aggregator and a relay), the model cache,
pre-aggregation (hand-computed FedAvg, full and partial), store-and-forward across an upstream
outage, stale-after-outage drops, and refused updates that never reach upstream.

Servers run in-process on 127.0.0.1 and are stopped by each test.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest

from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from aggregator.journal import Journal
from aggregator.rounds import RoundManager
from aggregator.strategies import FedAvg
from intake.config import ServingSettings
from intake.submission import Submission
from proto import strata_pb2 as pb
from proto.errors import FINAL_REFUSALS, Refusal, UpdateRefused
from relay.cache import ModelCache
from relay.config import ForwardSettings, RelayConfig, UpstreamSettings, WindowSettings
from relay.core import STALE_AFTER_OUTAGE, Relay
from relay.daemon import RelayDaemon
from relay.journal import RelayJournal
from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from storage.models import load_manifest, load_model, save_model
from storage.store import LocalStore
from strata.wiring import initial_model_factory
from tests.agent_service_contract import (
    AgentServiceContract,
    ServiceUnderTest,
    base_tensors,
    get_model,
    join,
    nudged,
    stub_for,
    submit,
    wait_until,
)
from tests.procs import free_port

T = TypeVar("T")

# ------------------------------------------------------------------ fixtures


def aggregator_config(tmp_path: Path, port: int = 0, **round_settings: object) -> AggregatorConfig:
    settings = {"min_updates": 1, "quorum": 0.01, "deadline_s": 60.0, **round_settings}
    return AggregatorConfig(
        id="agg-a",
        listen=f"127.0.0.1:{port}",
        state_dir=str(tmp_path / "agg-state"),
        store=str(tmp_path / "agg-store"),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        round=RoundSettings(**settings),
        synthesis=SynthesisSettings(enabled=False),
    )


def start_aggregator(config: AggregatorConfig) -> AggregatorDaemon:
    return AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()


def relay_config(tmp_path: Path, upstream: str, *, max_devices: int = 1, max_wait_s: float = 60.0, **extra: object) -> RelayConfig:
    return RelayConfig(
        id="relay-1",
        seeds=[upstream],
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "relay-state"),
        serving=ServingSettings(heartbeat_interval_s=0.5),
        window=WindowSettings(max_devices=max_devices, max_wait_s=max_wait_s),
        forward=extra.pop("forward", ForwardSettings(retry_s=0.2)),
        upstream=UpstreamSettings(join_timeout_s=5.0, backoff_base_s=0.1, backoff_max_s=0.5, rpc_timeout_s=5.0),
        **extra,
    )


def start_relay(config: RelayConfig) -> RelayDaemon:
    daemon = RelayDaemon(config).start()
    wait_until(lambda: daemon.relay.has_base, 20, "the relay to adopt an upstream base")
    return daemon


@dataclass
class Fleet:
    aggregator: AggregatorDaemon
    relay: RelayDaemon


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    aggregator = start_aggregator(aggregator_config(tmp_path))
    relay = start_relay(relay_config(tmp_path, aggregator.address))
    try:
        yield Fleet(aggregator, relay)
    finally:
        relay.stop()
        aggregator.stop()


@pytest.fixture(params=["aggregator", "relay"])
def agent_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceUnderTest]:
    aggregator = start_aggregator(aggregator_config(tmp_path))
    relay = start_relay(relay_config(tmp_path, aggregator.address)) if request.param == "relay" else None
    try:
        yield ServiceUnderTest(address=relay.address if relay else aggregator.address)
    finally:
        if relay is not None:
            relay.stop()
        aggregator.stop()


class TestAgentServiceContract(AgentServiceContract):
    """Devices cannot tell a relay from an aggregator."""


# ------------------------------------------------------------------ a core over tiny tensors

W = "w"
B = "b"


@dataclass
class TinyRelay:
    relay: Relay
    store: LocalStore
    upstream: LocalStore
    base: Manifest
    fetched: list[str]


def tiny_relay(
    tmp_path: Path, *, max_devices: int = 2, cache_bytes: int = 1 << 20, clock: Callable[[], float] = time.time
) -> TinyRelay:
    """A relay core whose upstream is a plain store holding a 2x2 + 2 base model."""
    upstream = LocalStore(tmp_path / "upstream")
    key = KeyPair.generate()
    base = save_model(
        upstream,
        weights=encode_tensors({W: np.zeros((2, 2), np.float32), B: np.zeros(2, np.float32)}),
        kind="base",
        federation="digits",
        round=3,
        producer=Producer(role="test", id="tiny"),
        key=key,
    )
    fetched: list[str] = []

    def fetch(model_cid: str) -> tuple[Manifest, bytes]:
        fetched.append(model_cid)
        return load_model(upstream, model_cid)

    store = LocalStore(tmp_path / "relay-store")
    config = RelayConfig(id="relay-1", window=WindowSettings(max_devices=max_devices), max_relative_norm=0)
    relay = Relay(
        relay_id="relay-1",
        config=config,
        store=store,
        journal=RelayJournal(tmp_path / "relay.sqlite"),
        cache=ModelCache(store, fetch, max_bytes=cache_bytes),
        key=KeyPair.generate(),
        clock=clock,
    )
    relay.adopt_base(base.cid, 3)
    return TinyRelay(relay=relay, store=store, upstream=upstream, base=base, fetched=fetched)


def device_submission(tiny: TinyRelay, agent: str, tensors: dict[str, np.ndarray], n: int, **metrics: float) -> Submission:
    blob = encode_tensors({k: np.asarray(v, np.float32) for k, v in tensors.items()})
    return Submission(
        agent_id=agent,
        round=3,
        base_cid=tiny.base.cid,
        num_samples=n,
        weights=blob,
        federation="digits",
        metrics=metrics,
        tensors=tuple(sorted(tensors)) if set(tensors) != {W, B} else (),
    )


def test_pre_aggregation_equals_hand_computed_fedavg_full_updates(tmp_path: Path) -> None:
    tiny = tiny_relay(tmp_path)
    first = tiny.relay.intake.submit(device_submission(tiny, "d1", {W: [[1, 2], [3, 4]], B: [1, 1]}, 1, loss=1.0, accuracy=0.2))
    assert tiny.relay.maybe_close(active_trainers=2) is None  # one of two devices
    second = tiny.relay.intake.submit(device_submission(tiny, "d2", {W: [[3, 4], [5, 6]], B: [3, 3]}, 3, loss=2.0, accuracy=0.6))
    combined = tiny.relay.maybe_close(active_trainers=2)
    assert combined is not None
    manifest, blob = load_model(tiny.store, combined.manifest.cid)
    tensors = decode_tensors(blob)
    # (1 * d1 + 3 * d2) / 4
    np.testing.assert_allclose(tensors[W], [[2.5, 3.5], [4.5, 5.5]])
    np.testing.assert_allclose(tensors[B], [2.5, 2.5])
    assert manifest.kind == "relay"
    assert manifest.producer == Producer(role="relay", id="relay-1")
    assert set(manifest.parents) == {first.update_cid, second.update_cid}
    assert manifest.base == tiny.base.cid and manifest.round == 3
    assert manifest.num_samples == 4
    assert manifest.metrics == pytest.approx({"loss": 1.75, "accuracy": 0.5})
    manifest.verify_signature()
    assert combined.tensors == (B, W)
    # the device updates stay in the relay's store: lineage goes down to them
    for parent in manifest.parents:
        assert load_manifest(tiny.store, parent).kind == "local"
    assert tiny.relay.journal.pending_windows()[0].update_cid == manifest.cid


def test_a_devices_inflated_claim_is_rescaled_against_the_windows_median(tmp_path: Path) -> None:
    tiny = tiny_relay(tmp_path, max_devices=3)
    tiny.relay.intake.submit(device_submission(tiny, "d1", {W: [[1, 1], [1, 1]], B: [1, 1]}, 10))
    tiny.relay.intake.submit(device_submission(tiny, "d2", {W: [[1, 1], [1, 1]], B: [1, 1]}, 10))
    greedy = tiny.relay.intake.submit(device_submission(tiny, "greedy", {W: [[4, 4], [4, 4]], B: [4, 4]}, 10**6))
    combined = tiny.relay.maybe_close(active_trainers=3)
    assert combined is not None
    manifest, blob = load_model(tiny.store, combined.manifest.cid)
    # credited 10, 10 and 10 x 10 (window.max_claim_ratio's default): (20 x 1 + 100 x 4) / 120
    np.testing.assert_allclose(decode_tensors(blob)[B], [420 / 120] * 2, rtol=1e-6)
    assert manifest.num_samples == 120  # upstream sees the credited total, not 10^6
    assert manifest.extra["rescaled_num_samples"]["claims"] == {
        greedy.update_cid: {"claimed": 10**6, "credited": 100, "agent": "greedy"}
    }


def test_pre_aggregation_partial_updates_weight_per_tensor(tmp_path: Path) -> None:
    tiny = tiny_relay(tmp_path)
    tiny.relay.intake.submit(device_submission(tiny, "head-only", {B: [1, 1]}, 1))
    tiny.relay.intake.submit(device_submission(tiny, "full", {W: [[3, 4], [5, 6]], B: [3, 3]}, 3))
    combined = tiny.relay.maybe_close(active_trainers=2)
    assert combined is not None
    tensors = decode_tensors(load_model(tiny.store, combined.manifest.cid)[1])
    np.testing.assert_allclose(tensors[W], [[3, 4], [5, 6]])  # only "full" trained w
    np.testing.assert_allclose(tensors[B], [2.5, 2.5])  # (1*1 + 3*3) / 4


def test_combined_partial_update_declares_only_trained_tensors_and_aggregator_weights_per_tensor(tmp_path: Path) -> None:
    tiny = tiny_relay(tmp_path)
    tiny.relay.intake.submit(device_submission(tiny, "h1", {B: [1, 1]}, 1))
    tiny.relay.intake.submit(device_submission(tiny, "h2", {B: [4, 4]}, 2))
    combined = tiny.relay.maybe_close(active_trainers=2)
    assert combined is not None and combined.tensors == (B,)
    manifest, blob = load_model(tiny.store, combined.manifest.cid)
    assert set(decode_tensors(blob)) == {B}
    np.testing.assert_allclose(decode_tensors(blob)[B], [3, 3])

    # upstream: a real RoundManager takes the relay's partial update beside a full device update
    agg_store = tiny.upstream
    with Journal(tmp_path / "agg.sqlite") as journal:
        rounds = RoundManager(
            aggregator_id="agg-a",
            federation="digits",
            settings=RoundSettings(min_updates=2, quorum=1.0, max_relative_norm=0),
            store=agg_store,
            journal=journal,
            strategy=FedAvg(),
            key=KeyPair.generate(),
            initial_base=tiny.base.cid,
        )
        rounds.start()
        # this aggregator serves the tiny base as its round 0 (the relay saw it as round 3): re-sign for round 0
        resigned = save_model(
            tiny.store, weights=blob, kind="relay", federation="digits", round=0,
            producer=Producer(role="relay", id="relay-1"), key=KeyPair.generate(), parents=manifest.parents,
            base=tiny.base.cid, num_samples=manifest.num_samples,
        )
        rounds.intake.submit(
            Submission(
                agent_id="relay-1", round=0, base_cid=tiny.base.cid, num_samples=3, weights=blob, federation="digits",
                tensors=(B,), weights_cid=resigned.weights, kind="relay", parents=resigned.parents,
                manifest=resigned.to_bytes(),
            )
        )
        full = encode_tensors({W: np.full((2, 2), 8, np.float32), B: np.zeros(2, np.float32)})
        rounds.intake.submit(Submission(agent_id="dev", round=0, base_cid=tiny.base.cid, num_samples=1, weights=full))
        cluster = rounds.maybe_close(active_trainers=2)
        assert cluster is not None
        result = decode_tensors(load_model(agg_store, cluster.cid)[1])
        np.testing.assert_allclose(result[W], np.full((2, 2), 8))  # only the device trained w
        np.testing.assert_allclose(result[B], [2.25, 2.25])  # (3*3 + 1*0) / 4
        assert resigned.cid in cluster.parents


def test_window_closes_on_max_wait_and_once_per_base(tmp_path: Path) -> None:
    now = [1000.0]
    tiny = tiny_relay(tmp_path, max_devices=5, clock=lambda: now[0])
    tiny.relay.intake.submit(device_submission(tiny, "d1", {B: [1, 1]}, 1))
    assert tiny.relay.maybe_close(active_trainers=5) is None
    now[0] += tiny.relay.config.window.max_wait_s + 1
    closed = tiny.relay.maybe_close(active_trainers=5)
    assert closed is not None and closed.record.trigger == "max_wait"
    # a late device on the same base waits for the next upstream base
    late = tiny.relay.intake.submit(device_submission(tiny, "d2", {B: [2, 2]}, 1))
    now[0] += 1000
    assert tiny.relay.maybe_close(active_trainers=1) is None
    assert tiny.relay.window_size == 1
    next_base = save_model(
        tiny.upstream, weights=encode_tensors({W: np.ones((2, 2), np.float32), B: np.ones(2, np.float32)}),
        kind="cluster", federation="digits", round=4, producer=Producer(role="aggregator", id="agg"), key=None,
    )
    tiny.relay.adopt_base(next_base.cid, 4)
    second = tiny.relay.maybe_close(active_trainers=1)
    assert second is not None and second.manifest.round == 4 and second.manifest.base == next_base.cid
    assert second.manifest.parents == (late.update_cid,)


def test_a_device_counts_once_per_window_when_its_late_update_waits_for_the_next_base(tmp_path: Path) -> None:
    now = [1000.0]
    tiny = tiny_relay(tmp_path, max_devices=5, clock=lambda: now[0])
    tiny.relay.intake.submit(device_submission(tiny, "d1", {B: [1, 1]}, 1))
    now[0] += tiny.relay.config.window.max_wait_s + 1
    assert tiny.relay.maybe_close(active_trainers=5) is not None
    late = device_submission(tiny, "d2", {B: [2, 2]}, 1)
    held = tiny.relay.intake.submit(late)
    next_base = save_model(
        tiny.upstream, weights=encode_tensors({W: np.ones((2, 2), np.float32), B: np.ones(2, np.float32)}),
        kind="cluster", federation="digits", round=4, producer=Producer(role="aggregator", id="agg"), key=None,
    )
    tiny.relay.adopt_base(next_base.cid, 4)
    fresh = dataclasses.replace(device_submission(tiny, "d2", {B: [3, 3]}, 1), round=4, base_cid=next_base.cid)
    with pytest.raises(UpdateRefused) as twice:
        tiny.relay.intake.submit(fresh)
    assert twice.value.reason == Refusal.ALREADY_COUNTED and twice.value.reason in FINAL_REFUSALS
    assert tiny.relay.intake.submit(late).duplicate  # a resend of the held one is still acknowledged
    tiny.relay.intake.submit(dataclasses.replace(device_submission(tiny, "d3", {B: [5, 5]}, 1), round=4, base_cid=next_base.cid))
    now[0] += tiny.relay.config.window.max_wait_s + 1
    combined = tiny.relay.maybe_close(active_trainers=5)
    assert combined is not None and combined.record.devices == 2
    assert held.update_cid in combined.manifest.parents
    assert tiny.relay.journal.refusal_counts() == {"already_counted": 1}


def test_device_refusals_keep_reason_codes(tmp_path: Path) -> None:
    tiny = tiny_relay(tmp_path)
    good = device_submission(tiny, "d1", {B: [1, 1]}, 1)
    tiny.relay.intake.submit(good)
    with pytest.raises(UpdateRefused) as conflict:
        tiny.relay.intake.submit(device_submission(tiny, "d1", {B: [2, 2]}, 1))
    assert conflict.value.reason == "conflict"
    assert tiny.relay.intake.submit(good).duplicate
    with pytest.raises(UpdateRefused) as wrong_shape:
        tiny.relay.intake.submit(device_submission(tiny, "d2", {B: [1, 1, 1]}, 1))
    assert wrong_shape.value.reason == "shape_mismatch"
    assert tiny.relay.journal.refusal_counts() == {"conflict": 1, "shape_mismatch": 1}


# ------------------------------------------------------------------ cache


def test_cache_fetches_each_cid_once_for_concurrent_devices(tmp_path: Path) -> None:
    tiny = tiny_relay(tmp_path)
    assert tiny.fetched == [tiny.base.cid]  # adopting the base fetched it
    other = save_model(
        tiny.upstream, weights=encode_tensors({W: np.ones((2, 2), np.float32)}), kind="cluster",
        federation="digits", round=1, producer=Producer(role="aggregator", id="agg"), key=None,
    )
    threads = [threading.Thread(target=tiny.relay.cache.ensure, args=(other.cid,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert tiny.fetched == [tiny.base.cid, other.cid]
    stats = tiny.relay.cache.stats()
    assert stats.upstream_fetches == 2


def test_cache_lru_eviction_by_size_never_evicts_the_current_base(tmp_path: Path) -> None:
    upstream = LocalStore(tmp_path / "up")
    models = [
        save_model(
            upstream, weights=encode_tensors({W: np.full(256, i, np.float32)}), kind="cluster", federation="digits",
            round=i, producer=Producer(role="aggregator", id="agg"), key=None,
        )
        for i in range(4)
    ]
    store = LocalStore(tmp_path / "cache")
    one = len(models[0].to_bytes()) + upstream.size(models[0].weights)
    cache = ModelCache(store, lambda cid: load_model(upstream, cid), max_bytes=int(one * 2.5))
    cache.protect([models[0].cid])
    for model in models[:3]:
        cache.ensure(model.cid)
    # over budget after the third: the oldest unprotected (models[1]) goes, the protected base stays
    assert cache.cached() == [models[0].cid, models[2].cid]
    assert not store.has(models[1].cid) and not store.has(models[1].weights)
    cache.ensure(models[3].cid)
    assert cache.cached() == [models[0].cid, models[3].cid]
    assert store.has(models[0].cid) and store.has(models[0].weights)
    assert cache.stats().evictions == 2


def test_devices_download_through_the_relay_one_upstream_fetch_per_cid(fleet: Fleet) -> None:
    relay = fleet.relay
    channel, stub = stub_for(relay.address)
    with channel:
        homes = [join(stub, f"dev-{i}") for i in range(5)]
        base = homes[0].base
        sizes = [len(get_model(stub)[1]) for _ in homes]
        not_modified, _ = get_model(stub, if_none_match=base.model_cid)
    assert not_modified.not_modified
    stats = relay.cache.stats()
    assert stats.upstream_fetches == 1
    assert stats.bytes_fetched_upstream == sizes[0]
    assert stats.bytes_served == sum(sizes) == 5 * sizes[0]
    assert stats.bytes_saved == 4 * sizes[0]
    assert relay.status()["cache"]["bytes_saved"] == 4 * sizes[0]


# ------------------------------------------------------------------ refusals and store-and-forward


def test_refused_device_updates_never_reach_upstream(fleet: Fleet) -> None:
    channel, stub = stub_for(fleet.relay.address)
    with channel:
        home = join(stub, "bad-device")
        tensors = base_tensors(stub, home.base.model_cid)
        poisoned = {k: v.copy() for k, v in tensors.items()}
        poisoned[sorted(poisoned)[0]].reshape(-1)[:3] = np.nan
        assert submit(stub, encode_tensors(poisoned), agent_id="nan", base=home.base).reason == "not_finite"
        assert submit(stub, b"\x00garbage", agent_id="junk", base=home.base).reason == "invalid_safetensors"
        huge = {k: v * np.float32(1e6) for k, v in tensors.items()}
        assert submit(stub, encode_tensors(huge), agent_id="huge", base=home.base).reason == "norm_bound"
    assert fleet.relay.journal.pending_windows() == [] and fleet.relay.journal.history() == []
    assert fleet.relay.journal.refusal_counts() == {"not_finite": 1, "invalid_safetensors": 1, "norm_bound": 1}
    journal = fleet.aggregator.journal
    assert list(journal.iter_all_updates()) == []
    assert journal.refusal_counts(0) == {}


def _retry_unavailable(call: Callable[[], T], timeout: float = 10.0) -> T:
    """Channels to one address share a subchannel, which may still be backing off from an outage."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                raise
            time.sleep(0.1)


def _device_submits(address: str, agents: list[str]) -> list[pb.SubmitUpdateReply]:
    channel, stub = stub_for(address)
    with channel:
        home = join(stub, agents[0])
        tensors = base_tensors(stub, home.base.model_cid)
        return [submit(stub, nudged(tensors, 0.01 * (i + 1)), agent_id=a, base=home.base) for i, a in enumerate(agents)]


@pytest.mark.slow
def test_store_and_forward_across_an_upstream_outage(tmp_path: Path) -> None:
    port = free_port()
    config = aggregator_config(tmp_path, port)
    aggregator = start_aggregator(config)
    relay = start_relay(relay_config(tmp_path, aggregator.address, max_devices=2))
    try:
        base_round = relay.relay.current.round
        aggregator.stop()
        replies = _device_submits(relay.address, ["d1", "d2"])
        assert all(r.accepted for r in replies), replies
        wait_until(lambda: len(relay.journal.history()) == 1, 10, "the window to close")
        assert relay.journal.pending_windows()[0].status == "pending"
        aggregator = start_aggregator(config)
        wait_until(lambda: relay.journal.pending_windows() == [], 30, "the combined update to be forwarded")
        record = relay.journal.history()[0]
        assert record.status == "forwarded" and record.devices == 2
        wait_until(lambda: aggregator.rounds.current.round > base_round, 10, "the aggregator to close its round")
        accepted = list(aggregator.journal.iter_all_updates())
        assert [(u.agent_id, u.kind) for u in accepted] == [("relay-1", "relay")]
        relay_update = load_manifest(aggregator.store, accepted[0].update_cid)
        assert set(relay_update.parents) == {r.update_cid for r in replies}
    finally:
        relay.stop()
        aggregator.stop()


@pytest.mark.slow
def test_stale_after_outage_updates_are_dropped_with_the_reason(tmp_path: Path) -> None:
    port = free_port()
    config = aggregator_config(tmp_path, port, max_staleness=0)
    aggregator = start_aggregator(config)
    relay = start_relay(
        relay_config(tmp_path, aggregator.address, max_devices=1, forward=ForwardSettings(retry_s=0.2, max_staleness=0))
    )
    try:
        relay_base = relay.relay.current
        aggregator.stop()
        assert all(r.accepted for r in _device_submits(relay.address, ["d1"]))
        wait_until(lambda: len(relay.journal.history()) == 1, 10, "the window to close")
        # meanwhile upstream moves on without the relay: the same aggregator (same state)
        # runs on another port, out of the relay's reach, and closes a round
        elsewhere = start_aggregator(dataclasses.replace(config, listen=f"127.0.0.1:{free_port()}"))
        channel, stub = stub_for(elsewhere.address)
        with channel:
            tensors = _retry_unavailable(lambda: base_tensors(stub, relay_base.model_cid))
            ref = pb.ModelRef(model_cid=relay_base.model_cid, round=relay_base.round)
            assert submit(stub, nudged(tensors), agent_id="direct", base=ref).accepted
        wait_until(lambda: elsewhere.rounds.current.round > relay_base.round, 10, "upstream to move on")
        elsewhere.stop()
        aggregator = start_aggregator(config)
        wait_until(lambda: relay.journal.pending_windows() == [], 30, "the held update to be decided")
        record = relay.journal.history()[0]
        assert (record.status, record.reason) == ("dropped", STALE_AFTER_OUTAGE)
        assert relay.status()["dropped"] == {record.update_cid: STALE_AFTER_OUTAGE}
        assert [u.agent_id for u in aggregator.journal.iter_all_updates()] == ["direct"]
    finally:
        relay.stop()
        aggregator.stop()


def test_combined_update_is_accepted_upstream_with_relay_manifest(fleet: Fleet) -> None:
    replies = _device_submits(fleet.relay.address, ["d1"])
    assert replies[0].accepted
    wait_until(lambda: any(u.kind == "relay" for u in fleet.aggregator.journal.iter_all_updates()), 15, "the relay update upstream")
    update = next(u for u in fleet.aggregator.journal.iter_all_updates() if u.kind == "relay")
    manifest = load_manifest(fleet.aggregator.store, update.update_cid)
    assert manifest.producer == Producer(role="relay", id="relay-1")
    assert manifest.parents == (replies[0].update_cid,)
    assert cid_of(manifest.to_bytes()) == fleet.relay.journal.history()[0].update_cid
