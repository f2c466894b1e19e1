"""The simulator's own logic, fast: percentiles, round bookkeeping, the fleet plan, the model cache,
options; and a few virtual devices against in-process fake homes (redirects, signed updates,
broken-off uploads resent byte for byte). The fleet-scale run is tests/test_sim_e2e.py."""

from __future__ import annotations

import asyncio
import math
import random
import time

import grpc
import numpy as np
import pytest

from agent.sim import Delay, SimOptions, Simulation
from agent.sim.connections import sim_channel_options
from agent.sim.models import ModelCache
from agent.sim.schedule import backoff_s, first_heartbeat_s, online_s, plan_fleet
from agent.sim.stats import Latencies, RoundLedger, nearest_rank, summarize
from agent.sim.trainers import NoiseTrainer
from proto import strata_pb2 as pb
from proto.errors import ConfigError, IntegrityError
from proto.retry import RetryPolicy
from storage.cid import cid_of
from storage.keys import KeyPair
from storage.manifest import Manifest
from tests.agent_fakes import FakeHome, make_model, serving

# ---------------------------------------------------------------- latency percentiles


def test_nearest_rank_is_a_measured_sample_and_survives_floating_point() -> None:
    assert nearest_rank(0.99, 100) == 99  # 0.99 x 100 is 99.00000000000001 in floating point
    assert nearest_rank(0.5, 1) == 1
    assert nearest_rank(0.5, 2) == 1
    assert nearest_rank(0.95, 10) == 10
    assert nearest_rank(0.0, 5) == 1


def test_percentiles_of_one_to_a_hundred_milliseconds() -> None:
    samples = np.array([ms / 1000 for ms in range(100, 0, -1)])  # unsorted on purpose
    summary = summarize(samples)
    assert summary.count == 100
    assert (summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms) == pytest.approx((50, 95, 99, 100))


def test_no_samples_no_percentiles() -> None:
    summary = Latencies().summary()
    assert summary.count == 0 and summary.p99_ms is None
    assert summary.to_json()["p99_ms"] is None


def test_a_window_summarises_only_what_came_after_its_mark() -> None:
    latencies = Latencies()
    for _ in range(1000):
        latencies.add(5.0)  # a slow start
    mark = latencies.mark()
    for ms in range(1, 11):
        latencies.add(ms / 1000)
    window = latencies.since(mark)
    assert window.count == 10 and window.max_ms == pytest.approx(10)
    assert latencies.summary().p99_ms == pytest.approx(5000)


# ---------------------------------------------------------------- rounds as devices see them


def test_ledger_rounds_participation_and_round_time() -> None:
    ledger = RoundLedger()
    ledger.base_seen("agg-a", 3, "cid-3", now=10.0, devices=1)
    ledger.devices_at("agg-a", 2)
    ledger.devices_at("agg-a", 4)
    ledger.base_seen("agg-a", 3, "cid-3", now=11.0, devices=4)  # seen again: changes nothing
    for accuracy in (0.5, 0.6, 0.7):
        ledger.accepted("agg-a", 3, duplicate=False, metrics={"base_accuracy": accuracy, "loss": float("nan")})
    ledger.accepted("agg-a", 3, duplicate=True, metrics={"base_accuracy": 0.0})  # a resend counts once
    ledger.refused("agg-a", 3, "stale")
    assert ledger.rounds_closed("agg-a") == 0
    ledger.base_seen("agg-a", 4, "cid-4", now=12.5, devices=4)
    ledger.accepted("agg-b", 7, duplicate=False)  # counted in a round never seen announced

    first, second = [r for r in ledger.rounds() if r.home == "agg-a"]
    assert (first.round, first.devices, first.accepted, first.duplicates) == (3, 4, 3, 1)
    assert first.closed and first.round_s == pytest.approx(2.5)
    assert first.to_json()["participation"] == 0.75 and first.to_json()["refused"] == {"stale": 1}
    assert first.metrics() == {"base_accuracy": pytest.approx(0.6)}  # a non-finite claim is left out
    assert not second.closed and second.round_s is None
    assert ledger.rounds_closed("agg-a") == 1 and ledger.rounds_closed("agg-b") == 0
    assert ledger.homes() == ["agg-a"]


# ---------------------------------------------------------------- the fleet plan


def test_the_plan_is_deterministic_and_spreads_joins_over_the_ramp() -> None:
    options = SimOptions(agents=1000, ramp_s=10.0, relay="127.0.0.1:7080", relay_share=0.1, stragglers=0.25, seed=3)
    plan = plan_fleet(options)
    assert plan == plan_fleet(options)
    assert plan != plan_fleet(SimOptions(agents=1000, ramp_s=10.0, relay="127.0.0.1:7080", relay_share=0.1, stragglers=0.25, seed=4))
    assert len({p.agent_id for p in plan}) == 1000
    starts = sorted(p.start_s for p in plan)
    assert 0 <= starts[0] and starts[-1] < 10.0
    # evenly spread: every second of the ramp holds about a tenth of the joins
    per_second = np.bincount([int(s) for s in starts], minlength=10)
    assert per_second.min() >= 99 and per_second.max() <= 101
    relayed = [p for p in plan if p.behind_relay]
    assert len(relayed) == 100 and all(p.seeds == ("127.0.0.1:7080",) for p in relayed)
    assert all(p.seeds == options.seeds for p in plan if not p.behind_relay)
    assert sum(p.straggler for p in plan) == 250


def test_the_automatic_ramp_grows_with_the_fleet() -> None:
    assert SimOptions(agents=10_000).effective_ramp_s == pytest.approx(20.0)
    assert SimOptions(agents=10_000, ramp_s=0).effective_ramp_s == 0
    assert all(p.start_s == 0 for p in plan_fleet(SimOptions(agents=5, ramp_s=0)))


def test_first_heartbeats_are_spread_over_one_interval() -> None:
    rng = random.Random(1)
    firsts = [first_heartbeat_s(rng, 5.0) for _ in range(10_000)]
    assert 0 <= min(firsts) and max(firsts) < 5.0
    assert np.histogram(firsts, bins=5, range=(0, 5))[0].min() > 1800  # no burst at one moment


def test_churn_and_backoff_draws() -> None:
    rng = random.Random(2)
    assert math.isinf(online_s(rng, 0.0))
    sessions = [online_s(rng, 6.0) for _ in range(20_000)]  # 6 per minute: 10 s on average
    assert np.mean(sessions) == pytest.approx(10.0, rel=0.05)
    policy = RetryPolicy(base_s=0.5, max_s=4.0)
    assert all(0 <= backoff_s(rng, policy, 0) < 0.5 for _ in range(100))
    assert max(backoff_s(rng, policy, 10) for _ in range(1000)) <= 4.0


def test_delays_parse_draw_and_refuse_nonsense() -> None:
    rng = random.Random(0)
    assert Delay.parse("fixed:2").draw(rng) == 2.0
    assert 1.0 <= Delay.parse("uniform:1:3").draw(rng) <= 3.0
    exp = Delay.parse("exp:5")
    assert np.mean([exp.draw(rng) for _ in range(20_000)]) == pytest.approx(5.0, rel=0.05)
    lognormal = Delay.parse("lognormal:2:0.5")
    assert np.median([lognormal.draw(rng) for _ in range(20_000)]) == pytest.approx(2.0, rel=0.05)
    assert str(lognormal) == "lognormal:2:0.5"
    for bad in ("gamma:1", "exp", "exp:1:2", "uniform:3:1", "fixed:-1", "exp:x"):
        with pytest.raises(ConfigError):
            Delay.parse(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"seeds": ()},
        {"agents": -1},
        {"dropout": 1.0},
        {"stragglers": 1.5},
        {"relay_share": 0.2},  # no relay address
        {"leave_rate": 1.0, "join_rate": 0.0},
        {"partition": "zipf"},
        {"train_workers": 0},
        {"ramp_s": -1.0},
    ],
)
def test_options_refuse_what_cannot_run(bad: dict) -> None:
    with pytest.raises(ConfigError):
        SimOptions(**bad)


def test_device_channels_use_the_agent_channel_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """Virtual devices' channels carry exactly what proto.wire.create_channel gives an agent's."""
    from proto import wire

    captured: dict = {}
    monkeypatch.setattr(wire.grpc, "insecure_channel", lambda address, options: captured.setdefault("options", options))
    wire.create_channel("127.0.0.1:1")
    ours = sim_channel_options(own_connection=True)
    assert ours[:-1] == captured["options"]
    assert ours[-1] == ("grpc.use_local_subchannel_pool", 1)  # every device its own connection
    assert ("grpc.use_local_subchannel_pool", 1) not in sim_channel_options(own_connection=False)


# ---------------------------------------------------------------- models: checked per download, decoded once


def _served(manifest: Manifest, blob: bytes) -> pb.ModelHeader:
    return pb.ModelHeader(model_cid=manifest.cid, manifest=manifest.to_bytes(), weights_cid=manifest.weights, weights_size=len(blob))


def test_a_model_is_verified_and_decoded_once_for_every_device() -> None:
    manifest, blob = make_model(value=2.0)
    cache = ModelCache()
    first = cache.admit(_served(manifest, blob), blob, asked_for=manifest.cid)
    for _ in range(999):
        again = cache.admit(_served(manifest, blob), bytes(blob), asked_for=manifest.cid)  # equal bytes, new object
        assert again is first
    assert (cache.decodes, cache.hits) == (1, 999)
    assert first.cid == manifest.cid and first.tensors["w"].tolist() == [2.0] * 4
    with pytest.raises(ValueError):
        first.tensors["w"][0] = 9.0  # shared by every device: read-only


def test_a_tampered_or_wrong_model_is_refused_before_and_after_it_is_cached() -> None:
    manifest, blob = make_model(value=3.0)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    cache = ModelCache()
    with pytest.raises(IntegrityError):
        cache.admit(_served(manifest, blob), bytes(tampered), asked_for=manifest.cid)  # not yet cached: hashed
    assert cache.decodes == 0
    cache.admit(_served(manifest, blob), blob, asked_for=manifest.cid)
    with pytest.raises(IntegrityError):
        cache.admit(_served(manifest, blob), bytes(tampered), asked_for=manifest.cid)  # cached: compared
    other, other_blob = make_model(value=4.0)
    with pytest.raises(IntegrityError, match="asked for"):
        cache.admit(_served(other, other_blob), other_blob, asked_for=manifest.cid)
    forged, forged_blob = make_model(value=5.0, key=KeyPair.generate())
    header = _served(forged, forged_blob)
    header.manifest = forged.to_bytes().replace(b'"round":0', b'"round":1')  # bytes that do not hash to the CID
    with pytest.raises(IntegrityError):
        cache.admit(header, forged_blob)


def test_noise_training_never_writes_the_shared_base() -> None:
    manifest, blob = make_model(value=1.0)
    model = ModelCache().admit(_served(manifest, blob), blob)
    plan = plan_fleet(SimOptions(agents=2))
    trainer = NoiseTrainer(seed=0, scale=1e-3)
    weights, num_samples, _ = trainer.for_device(plan[0]).train(model.tensors, {})
    other, _, _ = trainer.for_device(plan[1]).train(model.tensors, {})
    assert model.tensors["w"].tolist() == [1.0] * 4
    assert weights["w"].dtype == np.float32 and weights["w"].shape == (4,)
    assert not np.array_equal(weights["w"], other["w"]) and num_samples > 0


# ---------------------------------------------------------------- devices against fake homes


def _run_until(simulation: Simulation, done, timeout_s: float = 30.0):
    """Run `simulation` until `done()` holds (polled; bounded by `timeout_s`), then stop it."""

    async def main():
        run = asyncio.ensure_future(simulation.run())
        give_up = time.monotonic() + timeout_s
        while not done() and time.monotonic() < give_up and not run.done():
            await asyncio.sleep(0.05)
        simulation.stop("test")
        return await run

    return asyncio.run(main())


def test_devices_follow_redirects_and_submit_signed_updates_of_the_base_they_were_served() -> None:
    with serving(FakeHome("agg-door"), FakeHome("agg-home")) as (door, home):
        door.redirect_to = home.address
        options = SimOptions(seeds=(door.address,), agents=20, ramp_s=0.2, federation="digits")
        simulation = Simulation(options)
        report = _run_until(simulation, lambda: len(home.submitted) >= 20)
    assert report.stopped_by == "test"
    assert door.calls["Join"] == 20 and home.calls["Join"] == 20 and report.counts["redirects"] == 20
    assert report.homes == {"agg-home": 20}
    agents = {header.agent_id for header, _ in home.submitted}
    assert agents == {f"sim-{i:05d}" for i in range(20)}
    for header, blob in home.submitted:
        manifest = Manifest.from_bytes(header.manifest)
        manifest.verify_signature()
        assert manifest.kind == "local" and manifest.producer.id == header.agent_id
        assert manifest.base == header.base_cid == home.header_cid
        assert cid_of(blob) == manifest.weights == header.weights_cid and header.weights_size == len(blob)
        assert header.round == 0 and header.num_samples == manifest.num_samples > 0
    assert report.models_decoded == 1 and report.counts["downloads"] == 20
    assert report.latency["submit"].count == len(report.receipts) == 20
    assert report.latency["join"].count == 40  # each hop of each join
    assert report.to_json()["latency_ms"]["loop_lag"]["count"] == report.latency["loop_lag"].count


def test_a_broken_off_upload_is_sent_again_byte_for_byte() -> None:
    with serving(FakeHome()) as (home,):
        options = SimOptions(seeds=(home.address,), agents=30, ramp_s=0.1, dropout=0.5, backoff_base_s=0.05, backoff_max_s=0.1)
        report = _run_until(Simulation(options), lambda: len(home.submitted) >= 30)
    assert report.counts["dropouts"] > 0
    # each device's update reached the home whole exactly once, and only the one update it built
    assert sorted(h.agent_id for h, _ in home.submitted) == [f"sim-{i:05d}" for i in range(30)]
    assert report.counts["acknowledged"] == 30 and not report.refusals


def test_refusals_are_counted_by_reason_and_a_new_base_reaches_every_device() -> None:
    with serving(FakeHome()) as (home,):
        home.submit_refusal = "norm_bound"
        home.heartbeat_interval_s = 0.2
        options = SimOptions(seeds=(home.address,), agents=10, ramp_s=0.1)
        simulation = Simulation(options)

        def second_round_done() -> bool:
            if len(home.submitted) == 10 and home.calls["WatchModels"] >= 10 and home.events.empty():
                home.submit_refusal = ""
                # one device hears it on its watch stream (the fake's streams share one queue),
                # the others from their next heartbeat
                home.push_new_base(*make_model(round_=1, value=1.5))
            return len(home.submitted) >= 20

        report = _run_until(simulation, second_round_done)
    assert report.refusals == {"norm_bound": 10}
    assert report.counts["acknowledged"] == 10 and report.models_decoded == 2
    assert {h.round for h, _ in home.submitted[10:]} == {1}


def test_an_idle_fleet_joins_watches_and_heartbeats_at_the_interval_handed_out() -> None:
    with serving(FakeHome()) as (home,):
        home.heartbeat_interval_s = 0.2
        options = SimOptions(seeds=(home.address,), agents=25, trainer="none", ramp_s=0.1)
        report = _run_until(Simulation(options), lambda: home.calls["Heartbeat"] >= 100)
    assert home.calls["GetModel"] == 0 and not home.submitted
    assert home.calls["WatchModels"] >= 25 and report.counts["heartbeats"] >= 100
    assert report.latency["heartbeat"].count == report.counts["heartbeats"]


def test_stalled_uploads_are_held_open_until_stopped() -> None:
    with serving(FakeHome()) as (home,):
        options = SimOptions(seeds=(home.address,), agents=0, stalled_uploads=5)
        simulation = Simulation(options)
        report = _run_until(simulation, lambda: home.calls["SubmitUpdate"] >= 5 and simulation._stalled_open == 5)
    assert home.calls["SubmitUpdate"] == 5 and not home.submitted
    assert report.errors == {} or all(k.startswith("stalled_upload") for k in report.errors)


def test_grpc_cancel_of_a_stream_reaches_the_device_as_cancelled_error() -> None:
    """What the watch loop relies on: grpc.aio raises CancelledError in the reader of a call cancelled
    elsewhere, and the reading task itself is not being cancelled."""

    async def main() -> bool:
        with serving(FakeHome()) as (home,):
            async with grpc.aio.insecure_channel(home.address) as channel:
                from proto import strata_pb2_grpc as pb_grpc

                call = pb_grpc.AgentServiceStub(channel).WatchModels(pb.WatchModelsRequest(agent_id="x"), timeout=10)

                async def read() -> bool:
                    try:
                        async for _ in call:
                            pass
                    except asyncio.CancelledError:
                        return asyncio.current_task().cancelling() == 0
                    return False

                reader = asyncio.ensure_future(read())
                await asyncio.sleep(0.2)
                call.cancel()
                return await asyncio.wait_for(reader, 5)

    assert asyncio.run(main())


def test_an_upload_cut_off_by_a_move_to_another_home_is_sent_to_the_new_home() -> None:
    """Re-homing closes the old home's channel, and grpc.aio raises CancelledError in the upload still
    waiting on it. The device sends the update to its new home and goes on training. (Found by
    bench/partition.py: devices back from a cut-off aggregator heartbeated but never trained again, so
    their home's quorum was never met and every round waited for its deadline.)"""
    with serving(FakeHome("agg-old"), FakeHome("agg-new")) as (old, new):
        old.submit_hang = True
        old.heartbeat_interval_s = 0.2
        options = SimOptions(seeds=(old.address,), agents=5, ramp_s=0.1)

        def moved_and_resent() -> bool:
            if old.calls["SubmitUpdate"] >= 5 and old.heartbeat_home_changed is None:
                old.redirect_to = new.address
                old.heartbeat_home_changed = pb.Redirect(aggregator_id="agg-new", address=new.address)
            return len(new.submitted) >= 5

        report = _run_until(Simulation(options), moved_and_resent)
    assert sorted(h.agent_id for h, _ in new.submitted) == [f"sim-{i:05d}" for i in range(5)]
    assert report.homes["agg-new"] == 5
    assert report.errors.get("submit:CUT_OFF") == 5, report.errors


def test_a_refusal_answered_before_the_last_chunk_is_counted_not_a_crash() -> None:
    """Intake refuses on the header alone (unknown base, stale round) while the device is still writing
    chunks; grpc.aio then fails the next write with InvalidStateError, and the answer is the call's own."""
    with serving(FakeHome()) as (home,):
        home.serve(*make_model(params=1 << 21))  # 8 MiB: several chunks behind the header
        home.refuse_at_header = "unknown_base"
        simulation = Simulation(SimOptions(seeds=(home.address,), agents=3, ramp_s=0.1))
        report = _run_until(simulation, lambda: simulation.stats.refusals["unknown_base"] >= 3, timeout_s=60)
    assert report.refusals == {"unknown_base": 3} and not report.errors and "acknowledged" not in report.counts


def test_devices_train_only_on_a_base_they_are_invited_to() -> None:
    with serving(FakeHome()) as (home,):
        home.heartbeat_interval_s = 0.2
        home.announced.not_invited = True  # a home with selection left these devices out of the round
        home.announced.check_back_s = 0.2
        options = SimOptions(seeds=(home.address,), agents=8, ramp_s=0.1)
        simulation = Simulation(options)

        def invited_later() -> bool:
            if home.calls["Heartbeat"] >= 24 and home.announced.not_invited:
                assert home.calls["GetModel"] == 0 and not home.submitted  # idle while not invited
                home.announced.not_invited = False  # the next heartbeat invites them
            return len(home.submitted) >= 8

        report = _run_until(simulation, invited_later)
    assert len(home.submitted) == 8 and report.counts["acknowledged"] == 8
    (round_0,) = report.rounds
    assert (round_0.devices, round_0.invited, round_0.accepted) == (8, 8, 8)


def test_receipts_are_written_one_json_object_a_line(tmp_path) -> None:
    """`strata simulate --receipts PATH`: what tests and bench/partition.py check against the journals."""
    import json

    from agent.sim.stats import Receipt
    from strata.cmd_simulate import write_receipts

    receipts = [Receipt(agent_id=f"sim-{i}", home="agg-a", base_cid="Qmbase", update_cid=f"Qm{i}", round=i, duplicate=False) for i in range(3)]
    path = tmp_path / "receipts.jsonl"
    write_receipts(path, receipts)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["update_cid"] for line in lines] == ["Qm0", "Qm1", "Qm2"]
    assert lines[0] == {"agent_id": "sim-0", "home": "agg-a", "base_cid": "Qmbase", "update_cid": "Qm0", "round": 0, "duplicate": False}
    assert not (tmp_path / "receipts.jsonl.partial").exists()
