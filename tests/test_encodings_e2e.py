"""Update encodings through real aggregators (in-process daemons, real gRPC on 127.0.0.1):

1. for each encoding, agents learn it from the round config, encode, and the cluster model is
   exactly the FedAvg of the decoded updates; manifests record the encoding and name the bytes stored;
2. top-k's residual lives in the agent's state dir and carries over a restart of the agent;
3. an aggregator restarted mid-round re-folds its encoded updates from the store;
4. refusals: another encoding (unexpected_encoding), malformed encoded blobs (bad_encoding);
5. through a relay: devices encode as upstream asks, the relay decodes, its combined update goes upstream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from agent.submit import SubmitRefused, local_update
from aggregator.daemon import AggregatorDaemon
from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors
from storage.encodings import Encoding, decode_update, encode_update, parse_encoding
from storage.manifest import Manifest
from storage.models import load_manifest, load_model
from storage.store import LocalStore
from tests.agent_service_contract import connect_client, noisy, wait_until
from tests.procs import procs_fixture  # noqa: F401  (registers the `procs` fixture)
from tests.test_relay import aggregator_config, relay_config, start_aggregator, start_relay

SAMPLES = (100, 250, 37)


def _aggregator(tmp_path: Path, encoding: str) -> AggregatorDaemon:
    config = aggregator_config(tmp_path, min_updates=len(SAMPLES), quorum=1.0, deadline_s=600.0)
    return start_aggregator(dataclasses.replace(config, encoding=encoding))


def _fedavg(updates: list[dict[str, np.ndarray]], samples: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {
        name: sum(n * u[name].astype(np.float64) for n, u in zip(samples, updates, strict=True)) / sum(samples)
        for name in updates[0]
    }


def _closed(aggregator: AggregatorDaemon, round_: int = 0):
    wait_until(lambda: len(aggregator.rounds.closed_rounds()) > round_, 20, f"round {round_} to close")
    return aggregator.rounds.closed_rounds()[round_]


@pytest.mark.parametrize("text", ["fp16", "bf16", "int8", "topk:0.1"])
def test_each_encoding_end_to_end(text: str, tmp_path: Path, clients: list[Client]) -> None:
    encoding = parse_encoding(text)
    aggregator = _aggregator(tmp_path, text)
    try:
        agents = [connect_client(clients, aggregator.address, f"a{i}") for i in range(len(SAMPLES))]
        base = agents[0].wait_for_model(timeout=10)
        for agent in agents[1:]:
            agent.wait_for_model(timeout=10)
        assert all(agent.round_config["encoding"] == encoding.name for agent in agents)
        trained = [noisy(base, seed) for seed in range(len(SAMPLES))]
        receipts = [a.submit(u, n, {"loss": 1.0}) for a, u, n in zip(agents, trained, SAMPLES, strict=True)]
        record = _closed(aggregator)
        store = aggregator.store
        # what the aggregator saw: each update decoded exactly as the codec decodes it
        decoded = [decode_update(encode_update(u, base, encoding)[0], base, encoding, expected=sorted(u)) for u in trained]
        cluster = decode_tensors(load_model(store, record.cluster_cid)[1])
        expected, exact = _fedavg(decoded, SAMPLES), _fedavg(trained, SAMPLES)
        for name in base:
            np.testing.assert_allclose(cluster[name], expected[name], rtol=1e-5, atol=1e-6)
        # and how far that is from the float32 FedAvg: the codecs' bounds on a 0.01-sized change
        tolerance = {"fp16": 2e-5, "bf16": 2e-4, "int8": 5e-4, "topk:0.1": 0.05}[text]
        assert max(float(np.abs(cluster[n] - exact[n]).max()) for n in base) < tolerance
        plain = len(encode_tensors(trained[0]))
        for receipt in receipts:
            manifest = load_manifest(store, receipt.update_cid)
            assert manifest.extra["encoding"] == encoding.name
            blob = store.get(manifest.weights)
            assert cid_of(blob) == manifest.weights  # the CID is of the bytes as stored: encoded
            assert len(blob) < plain * {"fp16": 0.55, "bf16": 0.55, "int8": 0.3, "topk:0.1": 0.25}[text]
        assert sorted(Manifest.from_bytes(store.get(record.cluster_cid)).parents) == sorted(r.update_cid for r in receipts)
    finally:
        aggregator.stop()


def test_a_robust_rule_aggregates_the_decoded_updates_not_the_stored_encoded_blobs(tmp_path: Path, clients: list[Client]) -> None:
    # the median reads float32 blobs back from the store; an encoded blob holds a quantized delta
    encoding = parse_encoding("int8")
    config = aggregator_config(tmp_path, min_updates=len(SAMPLES), quorum=1.0, deadline_s=600.0)
    aggregator = start_aggregator(dataclasses.replace(config, encoding=encoding.name, strategy="median"))
    try:
        agents = [connect_client(clients, aggregator.address, f"a{i}") for i in range(len(SAMPLES))]
        base = agents[0].wait_for_model(timeout=10)
        for agent in agents[1:]:
            agent.wait_for_model(timeout=10)
        trained = [noisy(base, seed) for seed in range(len(SAMPLES))]
        for agent, update, n in zip(agents, trained, SAMPLES, strict=True):
            agent.submit(update, n)
        record = _closed(aggregator)
        decoded = [decode_update(encode_update(u, base, encoding)[0], base, encoding, expected=sorted(u)) for u in trained]
        cluster = decode_tensors(load_model(aggregator.store, record.cluster_cid)[1])
        for name in base:
            np.testing.assert_allclose(cluster[name], np.median(np.stack([d[name] for d in decoded]), axis=0), rtol=1e-5, atol=1e-6)
    finally:
        aggregator.stop()


def test_topk_residual_is_kept_in_the_state_dir_across_an_agent_restart(tmp_path: Path, clients: list[Client]) -> None:
    encoding = parse_encoding("topk:0.05")
    aggregator = _aggregator(tmp_path, encoding.name)
    try:
        state = tmp_path / "a0-state"
        agents = [connect_client(clients, aggregator.address, "a0", state)] + [
            connect_client(clients, aggregator.address, f"a{i}") for i in (1, 2)
        ]
        base0 = agents[0].wait_for_model(timeout=10)
        for agent in agents[1:]:
            agent.wait_for_model(timeout=10)
        trained0 = noisy(base0, 0)
        for agent, seed, n in zip(agents, range(3), SAMPLES, strict=True):
            agent.submit(trained0 if seed == 0 else noisy(base0, seed), n)
        _, residual0 = encode_update(trained0, base0, encoding)
        held = decode_tensors((state / "topk_residual.safetensors").read_bytes())
        assert all(np.array_equal(held[n], residual0[n]) for n in residual0)
        _closed(aggregator, 0)

        # the agent restarts (a new client on the same state dir) and trains on round 1's base
        agents[0].close()
        restarted = connect_client(clients, aggregator.address, "a0", state)
        base1 = restarted.wait_for_model(timeout=10)
        trained1 = noisy(base1, 10)
        receipt = restarted.submit(trained1, SAMPLES[0])
        blob = aggregator.store.get(load_manifest(aggregator.store, receipt.update_cid).weights)
        expected_blob, residual1 = encode_update(trained1, base1, encoding, residual=residual0)
        assert blob == expected_blob  # the residual from before the restart was added in
        held = decode_tensors((state / "topk_residual.safetensors").read_bytes())
        assert all(np.array_equal(held[n], residual1[n]) for n in residual1)
    finally:
        aggregator.stop()


def test_a_restarted_aggregator_refolds_encoded_updates(tmp_path: Path, clients: list[Client]) -> None:
    encoding = parse_encoding("topk:0.2")
    aggregator = _aggregator(tmp_path, encoding.name)
    try:
        agents = [connect_client(clients, aggregator.address, f"a{i}") for i in range(3)]
        base = agents[0].wait_for_model(timeout=10)
        for agent in agents[1:]:
            agent.wait_for_model(timeout=10)
        trained = [noisy(base, seed) for seed in range(3)]
        for i in (0, 1):
            agents[i].submit(trained[i], SAMPLES[i])
    finally:
        aggregator.stop()
    # the same state dir and store, on a new port: the open round is rebuilt from the journal
    aggregator = _aggregator(tmp_path, encoding.name)
    try:
        assert aggregator.rounds.accepted_count == 2
        late = connect_client(clients, aggregator.address, "a2")
        late.wait_for_model(timeout=10)
        late.submit(trained[2], SAMPLES[2])
        record = _closed(aggregator)
        decoded = [decode_update(encode_update(u, base, encoding)[0], base, encoding, expected=sorted(u)) for u in trained]
        cluster = decode_tensors(load_model(aggregator.store, record.cluster_cid)[1])
        expected = _fedavg(decoded, SAMPLES)
        for name in base:
            np.testing.assert_allclose(cluster[name], expected[name], rtol=1e-5, atol=1e-6)
    finally:
        aggregator.stop()


def _send(client: Client, blob: bytes, encoding: Encoding) -> str:
    """Submit hand-made weight bytes under `encoding` through the client's signed path; the refusal reason."""
    base_manifest, _ = client.download()
    pending, _ = local_update(
        {}, base=base_manifest, federation=client.federation, round=0, agent_id=client.agent_id,
        key=client._key, num_samples=10, tensors=None, encoded=(blob, encoding),
    )  # fmt: skip
    with pytest.raises(SubmitRefused) as info:
        client.submit_signed(Manifest.from_bytes(pending.manifest.encode()), blob)
    return info.value.reason


def test_refusals_of_other_and_malformed_encodings(tmp_path: Path, clients: list[Client]) -> None:
    aggregator = _aggregator(tmp_path, "int8")
    try:
        agent = connect_client(clients, aggregator.address, "a0")
        base = agent.wait_for_model(timeout=10)
        int8 = parse_encoding("int8")
        good, _ = encode_update(noisy(base, 1), base, int8)
        # float32 weights, fp16 and top-k deltas: each well formed, none what the federation asked for
        assert _send(agent, encode_tensors(noisy(base, 1)), parse_encoding("float32")) == "unexpected_encoding"
        assert _send(agent, encode_update(noisy(base, 1), base, parse_encoding("fp16"))[0], parse_encoding("fp16")) == (
            "unexpected_encoding"
        )
        assert _send(agent, good, Encoding("int4")) == "bad_encoding"  # no such encoding
        parts = decode_tensors(good)
        name = next(n for n in parts if n.endswith("/q"))
        minus_128 = dict(parts, **{name: np.full_like(parts[name], -128)})
        assert _send(agent, encode_tensors(minus_128), int8) == "bad_encoding"
        nan_scale = dict(parts, **{name.replace("/q", "/scale"): np.array(np.nan, np.float32)})
        assert _send(agent, encode_tensors(nan_scale), int8) == "bad_encoding"
        assert _send(agent, encode_update(noisy(base, 1), base, parse_encoding("fp16"))[0], int8) == "bad_encoding"
        refusals = aggregator.journal.refusal_counts()
        assert refusals["unexpected_encoding"] == 2 and refusals["bad_encoding"] == 4, refusals
        # the well-formed int8 update is still accepted after all that
        assert not agent.submit(noisy(base, 1), 10).duplicate
    finally:
        aggregator.stop()


def test_devices_under_a_relay_encode_as_the_federation_asks(tmp_path: Path, clients: list[Client]) -> None:
    config = dataclasses.replace(aggregator_config(tmp_path), encoding="int8")
    aggregator = start_aggregator(config)
    relay = start_relay(relay_config(tmp_path, aggregator.address))
    try:
        device = connect_client(clients, relay.address, "d1")
        base = device.wait_for_model(timeout=10)
        assert device.round_config["encoding"] == "int8"
        trained = noisy(base, 3)
        receipt = device.submit(trained, 40)
        assert load_manifest(relay.store, receipt.update_cid).extra["encoding"] == "int8"
        # the relay decoded it and forwards its combined update upstream as float32 (its own uplink)
        wait_until(
            lambda: any(u.kind == "relay" for u in aggregator.journal.iter_all_updates()), 15, "the relay update upstream"
        )
        update = next(u for u in aggregator.journal.iter_all_updates() if u.kind == "relay")
        combined = decode_tensors(load_model(aggregator.store, update.update_cid)[1])
        int8 = parse_encoding("int8")
        expected = decode_update(encode_update(trained, base, int8)[0], base, int8, expected=sorted(trained))
        for name in base:
            np.testing.assert_allclose(combined[name], expected[name], rtol=1e-6, atol=1e-7)
        # a device that ignores the round config is refused by the relay, as by an aggregator
        stubborn = connect_client(clients, relay.address, "d2")
        stubborn.wait_for_model(timeout=10)
        assert _send(stubborn, encode_tensors(trained), parse_encoding("float32")) == "unexpected_encoding"
    finally:
        relay.stop()
        aggregator.stop()


def test_a_stale_delta_is_decoded_against_its_own_base(tmp_path: Path, clients: list[Client]) -> None:
    """An update trained on round 0's base and accepted in round 1 adds its delta to round 0's base."""
    encoding = parse_encoding("int8")
    config = aggregator_config(tmp_path, min_updates=2, quorum=0.5, deadline_s=600.0)
    aggregator = start_aggregator(dataclasses.replace(config, encoding=encoding.name))
    try:
        agents = [connect_client(clients, aggregator.address, f"a{i}") for i in (0, 1, 3)]
        base0 = agents[0].wait_for_model(timeout=10)
        for agent in agents[1:]:
            agent.wait_for_model(timeout=10)
        for i in (0, 1):
            agents[i].submit(noisy(base0, i), SAMPLES[i])
        round0 = _closed(aggregator, 0)
        base1 = decode_tensors(load_model(aggregator.store, round0.next_base_cid)[1])
        late = noisy(base0, 7)  # a3 trained on round 0's base all along
        agents[2].submit(late, 50)
        fresh = connect_client(clients, aggregator.address, "a2")  # joins in round 1, so holds round 1's base
        held = fresh.wait_for_model(timeout=10)
        assert all(np.array_equal(held[n], base1[n]) for n in base1)
        current = noisy(base1, 8)
        fresh.submit(current, 60)
        round1 = _closed(aggregator, 1)
        weights = {u.agent_id: u.weight for u in aggregator.journal.iter_all_updates() if u.counted_round == 1}
        assert weights["a3"] < 50  # discounted: one round stale
        decoded = {
            "a3": decode_update(encode_update(late, base0, encoding)[0], base0, encoding, expected=sorted(late)),
            "a2": decode_update(encode_update(current, base1, encoding)[0], base1, encoding, expected=sorted(current)),
        }
        total = sum(weights.values())
        cluster = decode_tensors(load_model(aggregator.store, round1.cluster_cid)[1])
        for name in base0:
            expected = sum(weights[a] * decoded[a][name].astype(np.float64) for a in decoded) / total
            np.testing.assert_allclose(cluster[name], expected, rtol=1e-5, atol=1e-6)
    finally:
        aggregator.stop()


def test_a_simulated_fleet_encodes_as_its_aggregator_asks(tmp_path: Path) -> None:
    """`strata simulate`'s devices read the encoding from the round config like agents do."""
    import asyncio

    from agent.sim import SimOptions, Simulation

    devices = 20
    config = aggregator_config(tmp_path, min_updates=devices, quorum=1.0, deadline_s=3600.0)
    aggregator = start_aggregator(dataclasses.replace(config, encoding="topk:0.1"))
    try:
        options = SimOptions(seeds=(aggregator.address,), agents=devices, rounds=2, duration_s=120.0, ramp_s=0.5)
        report = asyncio.run(Simulation(options).run())
        assert report.stopped_by == "rounds", report.to_json()
        assert not report.refusals and not report.errors
        updates = list(aggregator.journal.iter_all_updates())
        assert len(updates) >= 2 * devices
        for update in updates:
            assert load_manifest(aggregator.store, update.update_cid).extra["encoding"] == "topk:0.1"
    finally:
        aggregator.stop(grace=0)


def test_model_export_of_an_encoded_update_writes_the_weights_it_stands_for(tmp_path: Path, clients: list[Client]) -> None:
    import argparse

    from strata.cmd_model import cmd_export

    encoding = parse_encoding("int8")
    aggregator = _aggregator(tmp_path, encoding.name)
    try:
        agent = connect_client(clients, aggregator.address, "a0")
        base = agent.wait_for_model(timeout=10)
        trained = noisy(base, 5)
        receipt = agent.submit(trained, 10)
        output = tmp_path / "update.safetensors"
        args = argparse.Namespace(cid=receipt.update_cid, output=output, json=True, store=[str(tmp_path / "agg-store")])
        assert cmd_export(args) == 0
        exported = decode_tensors(output.read_bytes())
        expected = decode_update(encode_update(trained, base, encoding)[0], base, encoding, expected=sorted(trained))
        assert sorted(exported) == sorted(base)
        for name in base:
            np.testing.assert_allclose(exported[name], expected[name], rtol=1e-6, atol=1e-7)
    finally:
        aggregator.stop()


def test_kill9_of_an_encoded_aggregator_loses_nothing(procs, tmp_path: Path, clients: list[Client]) -> None:  # noqa: ANN001
    """`strata aggregator serve` with encoding topk:0.2, killed -9 with two encoded updates acknowledged:
    the restarted process re-folds them from its journal and store, decoded against their base."""
    from tests.procs import free_port
    from tests.test_loop_e2e import start_aggregator as start_process

    encoding = parse_encoding("topk:0.2")
    port = free_port()
    settings = ("round.quorum=1.0", "round.min_updates=3", "round.deadline_s=600", f"encoding={encoding.name}")
    agg = start_process(procs, tmp_path, port, *settings)
    address = f"127.0.0.1:{port}"
    agents = [connect_client(clients, address, f"a{i}") for i in range(3)]
    base = agents[0].wait_for_model(timeout=10)
    for agent in agents[1:]:
        agent.wait_for_model(timeout=10)
    trained = [noisy(base, seed) for seed in range(3)]
    receipts = [agents[i].submit(trained[i], SAMPLES[i]) for i in (0, 1)]
    agg.kill9()
    agg = start_process(procs, tmp_path, port, *settings)
    recovered = agg.wait_for_event("round_recovered", timeout=10)
    assert recovered["updates"] == 2
    # a resend after the crash of the same encoded bytes and manifest (what a state dir's pending update is)
    held = LocalStore(tmp_path / "store")
    try:
        manifest = load_manifest(held, receipts[1].update_cid)
        again = agents[1].submit_signed(manifest, held.get(manifest.weights))
    finally:
        held.close()
    assert again.duplicate and again.update_cid == receipts[1].update_cid
    agents[2].submit(trained[2], SAMPLES[2])
    closed = agg.wait_for_event("round_closed", lambda e: e["round"] == 0, timeout=15)
    store = LocalStore(tmp_path / "store")
    try:
        cluster = decode_tensors(load_model(store, closed["cluster"])[1])
    finally:
        store.close()
    decoded = [decode_update(encode_update(u, base, encoding)[0], base, encoding, expected=sorted(u)) for u in trained]
    expected = _fedavg(decoded, SAMPLES)
    for name in base:
        np.testing.assert_allclose(cluster[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_non_canonical_encoding_name_is_recorded_canonically(tmp_path: Path, clients: list[Client]) -> None:
    """A sender without its own manifest may write "TOPK:0.10"; the recorded manifest says "topk:0.1"."""
    from proto import strata_pb2 as pb
    from tests.agent_service_contract import stub_for, submit

    aggregator = _aggregator(tmp_path, "topk:0.1")
    try:
        agent = connect_client(clients, aggregator.address, "a0")
        base = agent.wait_for_model(timeout=10)
        current = aggregator.rounds.current
        encoding = parse_encoding("topk:0.1")
        blob, _ = encode_update(noisy(base, 2), base, encoding)
        channel, stub = stub_for(aggregator.address)
        try:
            ref = pb.ModelRef(model_cid=current.model_cid, round=current.round)
            reply = submit(stub, blob, agent_id="a0", base=ref, num_samples=5, encoding="TOPK:0.10")
        finally:
            channel.close()
        assert reply.accepted, reply
        assert load_manifest(aggregator.store, reply.update_cid).extra["encoding"] == "topk:0.1"
    finally:
        aggregator.stop()
