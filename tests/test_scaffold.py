"""SCAFFOLD (Karimireddy et al. 2020): control variates from the round config to the agent, the wire and the cluster.

- a known answer on quadratics: two clients with different curvatures and optima; FedAvg with
  many local steps drifts to a point that is not the global optimum, SCAFFOLD reaches it;
- the variate update (option II) and its momentum step size, by hand;
- the built-in tasks follow the correction and report K and eta; the agent keeps c_i in its
  state directory across a restart, promoting c_i+ only once its update is acknowledged;
- through a real aggregator (in-process daemon, real gRPC on 127.0.0.1): delta_c travels with
  the update, c moves by |S|/N x their mean weighted like the models, and is served as a
  `control` model by CID, and every
  malformed delta_c is refused with its own reason;
- end to end: two aggregators with synthesis, real agent daemons training digits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agent.algorithms import momentum_step_size, variate_update
from agent.client import Client
from agent.state import AgentState
from agent.submit import local_update, update_header
from agent.tasks import DigitsTask
from agent.tasks._torch import MomentumSGD, add_control_correction
from agent.trainer import SCAFFOLD_CORRECTION, SCAFFOLD_LR, SCAFFOLD_STEPS, unsupported_algorithms
from aggregator.config import AggregatorConfig
from aggregator.daemon import AggregatorDaemon
from privacy.config import CentralDpSettings, PrivacySettings
from proto.errors import ConfigError, InvalidInput
from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors
from storage.control import CONTROL_KIND, scaffold_enabled, server_control_cid
from storage.manifest import Manifest
from storage.models import load_manifest, load_model
from storage.store import LocalStore
from tests.agent_service_contract import connect_client, wait_until
from tests.procs import (
    ProcessFactory,
    StrataProcess,
    free_port,
    procs_fixture,  # noqa: F401  (registers the `procs` fixture)
    wait_healthy,
)
from tests.test_fedprox import agent_ids_homed
from tests.test_relay import aggregator_config, start_aggregator

# --- a known answer on quadratics -----------------------------------------------------------------

# client i minimizes a_i / 2 ||w - t_i||^2; the federation's objective is their mean, minimized at
# sum(a_i t_i) / sum(a_i). Many local steps take each client to its own t_i, so FedAvg's average of
# them, mean(t_i), is off by as much as the curvatures differ.
CURVATURES = (1.0, 4.0)
OPTIMA = (torch.tensor([3.0, -1.0]), torch.tensor([-1.0, 2.0]))
GLOBAL_OPTIMUM = sum(a * t for a, t in zip(CURVATURES, OPTIMA, strict=True)) / sum(CURVATURES)


def _local_steps(x: torch.Tensor, client: int, correction: torch.Tensor | None, *, steps: int, lr: float,
                 momentum: float) -> torch.Tensor:
    w = x.clone().requires_grad_(True)
    opt = MomentumSGD([w], lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        (CURVATURES[client] / 2 * (w - OPTIMA[client]).square().sum()).backward()
        if correction is not None:
            add_control_correction([w], [correction])
        opt.step()
    return w.detach()


def _federate(*, scaffold: bool, rounds: int = 60, steps: int = 25, lr: float = 0.05, momentum: float = 0.0
              ) -> torch.Tensor:
    """Both clients train every round from x; the server averages (and steps c by sum(delta_c) / N)."""
    x = torch.zeros(2)
    server = {"w": np.zeros(2, np.float32)}
    clients = [{"w": np.zeros(2, np.float32)} for _ in OPTIMA]
    eta = momentum_step_size(lr, momentum, steps)
    for _ in range(rounds):
        trained, deltas = [], []
        for i in range(len(OPTIMA)):
            correction = torch.from_numpy(server["w"] - clients[i]["w"]) if scaffold else None
            y = _local_steps(x, i, correction, steps=steps, lr=lr, momentum=momentum)
            trained.append(y)
            if scaffold:
                delta, clients[i] = variate_update({"w": x.numpy()}, {"w": y.numpy()}, server, clients[i],
                                                   steps=steps, lr=eta)
                deltas.append(delta["w"])
        x = torch.stack(trained).mean(dim=0)
        if scaffold:
            server = {"w": server["w"] + sum(deltas) / len(OPTIMA)}
    return x


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts(momentum: float) -> None:
    fedavg = _federate(scaffold=False, momentum=momentum)
    scaffold = _federate(scaffold=True, momentum=momentum)
    drift = float((fedavg - GLOBAL_OPTIMUM).norm())
    assert drift > 0.5  # FedAvg settles near mean(t_i) = (1, 0.5), not (0.2, 1.4)
    torch.testing.assert_close(scaffold, GLOBAL_OPTIMUM, atol=1e-3, rtol=0)


def test_variate_update_is_option_ii() -> None:
    base = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.0], np.float32)}
    trained = {"w": np.array([0.5, 3.0], np.float32), "b": np.array([-1.0], np.float32)}
    server = {"w": np.array([0.1, 0.1], np.float32)}  # "b" absent: zeros
    client = {"w": np.array([1.0, -1.0], np.float32), "b": np.array([2.0], np.float32)}
    delta, updated = variate_update(base, trained, server, client, steps=5, lr=0.1)
    # (x - y) / (K eta) = (x - y) * 2
    np.testing.assert_allclose(delta["w"], [1.0 - 0.1, -2.0 - 0.1], rtol=1e-6)
    np.testing.assert_allclose(delta["b"], [2.0], rtol=1e-6)
    np.testing.assert_allclose(updated["w"], client["w"] + delta["w"], rtol=1e-6)
    np.testing.assert_allclose(updated["b"], [4.0], rtol=1e-6)
    for steps, lr in ((0, 0.1), (3, 0.0), (3, float("nan"))):
        with pytest.raises(InvalidInput) as caught:
            variate_update(base, trained, server, client, steps=steps, lr=lr)
        assert caught.value.reason == "bad_scaffold_metrics"


@pytest.mark.parametrize(("momentum", "steps"), [(0.0, 7), (0.9, 1), (0.9, 12), (0.5, 40)])
def test_momentum_step_size_makes_a_constant_gradient_add_up(momentum: float, steps: int) -> None:
    w = torch.zeros(3, requires_grad=True)
    gradient = torch.tensor([1.0, -2.0, 0.5])
    opt = MomentumSGD([w], lr=0.01, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        w.grad = gradient.clone()
        opt.step()
    eta = momentum_step_size(0.01, momentum, steps)
    torch.testing.assert_close(w.detach(), -steps * eta * gradient, rtol=1e-5, atol=1e-7)


def test_scaffold_switch_is_read_and_validated() -> None:
    assert not scaffold_enabled({})
    assert scaffold_enabled({"scaffold": "true"}) and scaffold_enabled({"scaffold": "1"})
    assert not scaffold_enabled({"scaffold": "false"})
    with pytest.raises(InvalidInput) as caught:
        scaffold_enabled({"scaffold": "maybe"})
    assert caught.value.reason == "bad_round_config"
    AggregatorConfig(round_config={"scaffold": "true"})
    with pytest.raises(ConfigError):
        AggregatorConfig(round_config={"scaffold": "maybe"})
    with pytest.raises(ConfigError):
        AggregatorConfig(round_config={"scaffold": "true"},
                         privacy=PrivacySettings(central=CentralDpSettings(clip=1.0, noise_multiplier=1.0)))


# --- the built-in tasks -----------------------------------------------------------------------------


def test_digits_follows_the_correction_and_reports_its_steps() -> None:
    task = DigitsTask(partition={"index": 0, "count": 5, "alpha": 0.5})
    assert unsupported_algorithms(task, {"scaffold": "true"}) == set()
    base = task.initial_weights()
    config = {"round": 0, "epochs": 1, "lr": 0.05, "momentum": 0.0}
    plain, _, plain_metrics = task.train(base, config)
    zero = {name: np.zeros_like(array) for name, array in base.items()}
    same, _, metrics = task.train(base, {**config, SCAFFOLD_CORRECTION: zero})
    assert all(np.array_equal(plain[k], same[k]) for k in base)  # c - c_i = 0 is plain FedAvg, bit for bit
    assert SCAFFOLD_STEPS not in plain_metrics
    assert metrics[SCAFFOLD_STEPS] == metrics["batches"] and metrics[SCAFFOLD_LR] == pytest.approx(0.05)
    # a constant correction g shifts plain SGD's result by -K eta g (up to how the loss gradients then differ)
    shift = {name: np.full_like(array, 0.01) for name, array in base.items()}
    moved, _, _ = task.train(base, {**config, SCAFFOLD_CORRECTION: shift})
    expected_shift = metrics[SCAFFOLD_STEPS] * 0.05 * 0.01
    for name in base:
        assert float(np.mean(plain[name] - moved[name])) == pytest.approx(expected_shift, rel=0.05)
    with pytest.raises(InvalidInput):
        task.train(base, {**config, SCAFFOLD_CORRECTION: {"fc1.weight": zero["fc1.weight"]}})  # tensors missing
    adam = DigitsTask(partition={"index": 0, "count": 5}, optimizer="adam")
    with pytest.raises(InvalidInput):
        adam.train(base, {**config, SCAFFOLD_CORRECTION: zero})


# --- the agent's state --------------------------------------------------------------------------------


def test_client_variate_is_promoted_on_acknowledgement_and_survives_a_restart(tmp_path: Path) -> None:
    from agent.state import PendingUpdate

    state = AgentState(tmp_path, agent_id="a1")
    assert state.variate() == {}
    first = {"w": np.array([1.0, 2.0], np.float32)}

    def pending() -> PendingUpdate:
        return PendingUpdate(round=0, base_cid="b", num_samples=1, metrics={}, base_metrics={}, tensors=[],
                             manifest="{}", weights_file="p.safetensors", control_file="p.delta_c.safetensors")

    state.set_pending(pending(), b"weights", b"delta")
    state.set_next_variate(first)
    assert state.variate() == {} and state.pending_control() == b"delta"  # not acknowledged yet
    restarted = AgentState(tmp_path, agent_id="a1")
    assert restarted.pending_control() == b"delta"  # the resend after a restart sends the same delta_c
    restarted.clear_pending(update_cid="QmAcknowledged")
    np.testing.assert_array_equal(AgentState(tmp_path, agent_id="a1").variate()["w"], first["w"])
    assert not (tmp_path / "p.delta_c.safetensors").exists()
    # a finally refused update leaves c_i as it was
    restarted.set_pending(pending(), b"weights", b"delta")
    restarted.set_next_variate({"w": np.array([9.0, 9.0], np.float32)})
    restarted.clear_pending(update_cid="")
    np.testing.assert_array_equal(AgentState(tmp_path, agent_id="a1").variate()["w"], first["w"])


# --- through a real aggregator -----------------------------------------------------------------------


def _scaffold_aggregator(tmp_path: Path, min_updates: int, **round_settings: object) -> AggregatorDaemon:
    config = aggregator_config(tmp_path, min_updates=min_updates, quorum=1.0, deadline_s=600.0, **round_settings)
    return start_aggregator(dataclasses.replace(config, round_config={"scaffold": "true"}))


def _step(base: Mapping[str, np.ndarray], gradient: float) -> dict[str, np.ndarray]:
    """K=4 plain SGD steps of size 0.001 along a constant gradient: (x - y) / (K eta) = gradient."""
    return {name: (array - 4 * 0.001 * gradient).astype(np.float32) for name, array in base.items()}


METRICS = {"loss": 1.0, SCAFFOLD_STEPS: 4.0, SCAFFOLD_LR: 0.001}


def test_server_variate_moves_by_the_mean_delta_and_is_served_by_cid(tmp_path: Path, clients: list[Client]) -> None:
    aggregator = _scaffold_aggregator(tmp_path, min_updates=2)
    try:
        agents = [connect_client(clients, aggregator.address, f"a{i}", tmp_path / f"agent-{i}") for i in range(2)]
        base = agents[0].wait_for_model(timeout=10)
        agents[1].wait_for_model(timeout=10)
        assert all(np.all(v == 0) for v in agents[0].scaffold_correction().values())  # c = c_i = 0 at first
        # delta_c of 1 from 10 samples and of 3 from 30: c weighs them like the models, (10 + 90) / 40
        receipts = [agent.submit(_step(base, g), n, METRICS) for agent, g, n in zip(agents, (1.0, 3.0), (10, 30), strict=True)]
        wait_until(lambda: len(aggregator.rounds.closed_rounds()) > 0, 20, "round 0 to close")
        store = aggregator.store
        for receipt, g in zip(receipts, (1.0, 3.0), strict=True):
            delta_cid = load_manifest(store, receipt.update_cid).extra["scaffold"]["delta_c"]
            assert all(np.allclose(v, g, atol=1e-3) for v in decode_tensors(store.get(delta_cid)).values())
        cluster = load_manifest(store, aggregator.rounds.closed_rounds()[0].cluster_cid)
        assert cluster.extra["scaffold"]["updates"] == 2 and cluster.extra["scaffold"]["agents"] == 2
        control_manifest, control_blob = load_model(store, server_control_cid(cluster.extra))
        assert control_manifest.kind == CONTROL_KIND
        assert all(np.allclose(v, 2.5, atol=1e-3) for v in decode_tensors(control_blob).values())

        # a restart of agent 0: c_i = 1 came back from its state directory; c = 2.5 is fetched by CID
        agents[0].close()
        again = connect_client(clients, aggregator.address, "a0", tmp_path / "agent-0")
        again.wait_for_model(timeout=10)
        assert server_control_cid(again.download()[0].extra) == control_manifest.cid
        assert all(np.allclose(v, 2.5 - 1.0, atol=1e-3) for v in again.scaffold_correction().values())
    finally:
        aggregator.stop()


def test_a_lowered_sample_claim_weighs_its_delta_c_as_it_weighs_its_model(tmp_path: Path, clients: list[Client]) -> None:
    """Claims 10, 10 and 1,000 with max_claim_ratio 2: the third is credited 20 (2 x the median). Its
    delta_c of 7 weighs 20 in c as its model does, (10 + 10 + 140) / 40 = 4.0, not 1,000 (6.88)."""
    aggregator = _scaffold_aggregator(tmp_path, min_updates=3, max_claim_ratio=2.0)
    try:
        agents = [connect_client(clients, aggregator.address, f"a{i}", tmp_path / f"agent-{i}") for i in range(3)]
        base = agents[0].wait_for_model(timeout=10)
        for agent in agents[1:]:
            agent.wait_for_model(timeout=10)
        for agent, g, n in zip(agents, (1.0, 1.0, 7.0), (10, 10, 1000), strict=True):
            agent.submit(_step(base, g), n, METRICS)
        wait_until(lambda: len(aggregator.rounds.closed_rounds()) > 0, 20, "round 0 to close")
        cluster = load_manifest(aggregator.store, aggregator.rounds.closed_rounds()[0].cluster_cid)
        assert cluster.num_samples == 40  # the claims as credited
        _, control_blob = load_model(aggregator.store, server_control_cid(cluster.extra))
        assert all(np.allclose(v, 4.0, atol=1e-3) for v in decode_tensors(control_blob).values())
    finally:
        aggregator.stop()


def _send(client: Client, weights: dict[str, np.ndarray], control: bytes, *, header_cid: str | None = None,
          manifest_control: bytes | None = None) -> str:
    """Submit an update with hand-made delta_c bytes through the client's signed path; the refusal reason."""
    base_manifest, _ = client.download()
    pending, blob = local_update(
        weights, base=base_manifest, federation=client.federation, round=0, agent_id=client.agent_id,
        key=client._key, num_samples=10, control=control if manifest_control is None else manifest_control,
    )  # fmt: skip
    manifest = Manifest.from_bytes(pending.manifest.encode())
    header = update_header(manifest, blob, agent_id=client.agent_id, federation=client.federation, control=control)
    if header_cid is not None:
        header.control_cid = header_cid
    reply = client._submitter._stream(header, blob + control)
    return "accepted" if reply.accepted else reply.reason


def test_malformed_delta_c_is_refused_with_its_own_reason(tmp_path: Path, clients: list[Client]) -> None:
    aggregator = _scaffold_aggregator(tmp_path, min_updates=5)
    try:
        agent = connect_client(clients, aggregator.address, "a0")
        base = agent.wait_for_model(timeout=10)
        trained = _step(base, 0.1)
        good = {name: np.full_like(array, 0.1) for name, array in base.items()}
        first = next(iter(base))
        assert _send(agent, trained, b"") == "missing_control_variate"
        assert _send(agent, trained, b"not safetensors") == "bad_control_variate"
        assert _send(agent, trained, encode_tensors({k: v for k, v in good.items() if k != first})) == "bad_control_variate"
        assert _send(agent, trained, encode_tensors({**good, first: good[first][:1]})) == "bad_control_variate"
        assert _send(agent, trained, encode_tensors({**good, first: good[first].astype(np.float16)})) == "bad_control_variate"
        assert _send(agent, trained, encode_tensors(good), header_cid=cid_of(b"other")) == "bad_control_variate"
        nan = {**good, first: np.full_like(good[first], np.nan)}
        assert _send(agent, trained, encode_tensors(nan)) == "control_variate_out_of_bounds"
        huge = {**good, first: np.full_like(good[first], 1e6)}
        assert _send(agent, trained, encode_tensors(huge)) == "control_variate_out_of_bounds"
        # the manifest must name the delta_c that travelled
        good_cid = cid_of(encode_tensors(good))
        assert _send(agent, trained, encode_tensors(good), manifest_control=b"x", header_cid=good_cid) == "bad_manifest"
        assert _send(agent, trained, encode_tensors(good)) == "accepted"
        refusals = aggregator.journal.refusal_counts()
        assert refusals["bad_control_variate"] == 5 and refusals["control_variate_out_of_bounds"] == 2, refusals
    finally:
        aggregator.stop()


def test_delta_c_is_refused_where_the_federation_runs_no_scaffold(tmp_path: Path, clients: list[Client]) -> None:
    aggregator = start_aggregator(aggregator_config(tmp_path, min_updates=5, quorum=1.0, deadline_s=600.0))
    try:
        agent = connect_client(clients, aggregator.address, "a0")
        base = agent.wait_for_model(timeout=10)
        control = encode_tensors({name: np.zeros_like(array) for name, array in base.items()})
        assert _send(agent, _step(base, 0.1), control) == "unexpected_control_variate"
    finally:
        aggregator.stop()


def test_an_aggregator_restarted_mid_round_refolds_the_delta_c(tmp_path: Path, clients: list[Client]) -> None:
    aggregator = _scaffold_aggregator(tmp_path, min_updates=2)
    try:
        first = connect_client(clients, aggregator.address, "a0")
        base = first.wait_for_model(timeout=10)
        first.submit(_step(base, 1.0), 10, METRICS)
    finally:
        aggregator.stop()
    aggregator = _scaffold_aggregator(tmp_path, min_updates=2)
    try:
        second = connect_client(clients, aggregator.address, "a1")
        second.wait_for_model(timeout=10)
        second.submit(_step(base, 3.0), 10, METRICS)
        wait_until(lambda: len(aggregator.rounds.closed_rounds()) > 0, 20, "round 0 to close")
        cluster = load_manifest(aggregator.store, aggregator.rounds.closed_rounds()[0].cluster_cid)
        control = decode_tensors(load_model(aggregator.store, server_control_cid(cluster.extra))[1])
        assert cluster.extra["scaffold"]["updates"] == 2
        assert all(np.allclose(v, 2.0, atol=1e-3) for v in control.values())  # equal samples: (1 + 3) / 2
    finally:
        aggregator.stop()


# --- end to end ------------------------------------------------------------------------------------

AGENTS_PER_AGGREGATOR = 2


def _start_aggregators(procs: ProcessFactory, tmp_path: Path) -> tuple[dict[str, int], dict[str, StrataProcess]]:
    ports = {"agg-a": free_port(), "agg-b": free_port()}
    peers = ",".join(f"{name}=127.0.0.1:{port}" for name, port in ports.items())
    processes = {}
    for name, port in ports.items():
        processes[name] = procs.strata(
            "aggregator", "serve",
            "--set", f"id={name}", "--set", f"listen=127.0.0.1:{port}",
            "--set", f"state_dir={tmp_path / name}", "--set", f"store={tmp_path / 'store'}",
            "--set", f"peers={peers}", "--set", "serving.heartbeat_interval_s=1",
            "--set", f"round.min_updates={AGENTS_PER_AGGREGATOR}", "--set", "round.quorum=1.0",
            "--set", "round.deadline_s=60",
            "--set", "round_config.scaffold=true", "--set", "round_config.epochs=2",
            name=name,
        )  # fmt: skip
        processes[name].wait_for_event("aggregator_started", timeout=60)
        wait_healthy(f"127.0.0.1:{port}", timeout=20)
    return ports, processes


def _agent_configs(tmp_path: Path, ports: dict[str, int], max_rounds: int) -> list[Path]:
    """One config per agent, ids picked so each aggregator is home to AGENTS_PER_AGGREGATOR of them."""
    paths = []
    everyone = agent_ids_homed(ports, AGENTS_PER_AGGREGATOR, "scaffold-agent")
    for index, agent_id in enumerate(everyone):
        path = tmp_path / f"{agent_id}.yaml"
        path.write_text(yaml.safe_dump({
            "id": agent_id,
            "seeds": [f"127.0.0.1:{ports['agg-a']}"],
            "task": "digits",
            "task_options": {"partition": {"scheme": "dirichlet", "alpha": 0.3, "index": index, "count": len(everyone)}},
            "state_dir": str(tmp_path / agent_id),
            "max_rounds": max_rounds,
            "backoff_max_s": 1.0,
        }))  # fmt: skip
        paths.append(path)
    return paths


def test_scaffold_through_two_real_aggregators_with_an_agent_restart(procs: ProcessFactory, tmp_path: Path) -> None:
    """Two aggregator processes with synthesis and SCAFFOLD; four agents in one process run two rounds,
    stop, and run a third after the restart. From the store: every round's c is the last c plus the
    sample-weighted mean of its updates' delta_c (all N agents send); every agent's c_i on disk is the sum of its acknowledged
    delta_c (so it survived the restart); the semi-global bases name their cluster's c; it learns."""
    ports, aggregators = _start_aggregators(procs, tmp_path)
    for run, rounds in (("first", 2), ("after-restart", 1)):
        configs = _agent_configs(tmp_path, ports, max_rounds=rounds)
        agents = procs.strata("agent", "run", *[arg for p in configs for arg in ("--config", str(p))], name=f"agents-{run}")
        assert agents.wait_exit(timeout=240) == 0, agents.tail()
        assert not agents.events("trainer_ignores_algorithm") and not agents.events("update_refused")
    for process in aggregators.values():
        wait_until(lambda process=process: len(process.events("round_closed")) >= 3, 60, "the third round to close")

    sent: dict[str, dict[str, np.ndarray]] = {}
    with LocalStore(tmp_path / "store") as store:
        for process in aggregators.values():
            previous: dict[str, np.ndarray] | None = None
            for close in process.events("round_closed")[:3]:
                cluster = load_manifest(store, close["cluster"])
                control_cid = server_control_cid(cluster.extra)
                assert server_control_cid(load_manifest(store, close["next_base"]).extra) == control_cid
                control = decode_tensors(load_model(store, control_cid)[1])
                total = {k: np.zeros_like(v, dtype=np.float64) for k, v in control.items()}
                samples = 0
                for update_cid in cluster.parents:
                    update = load_manifest(store, update_cid)
                    delta = decode_tensors(store.get(update.extra["scaffold"]["delta_c"]))
                    mine = sent.setdefault(update.producer.id, {k: np.zeros_like(v, dtype=np.float64) for k, v in delta.items()})
                    samples += update.num_samples
                    for k, v in delta.items():
                        total[k] += v * update.num_samples  # every update is fresh: its weight is its sample count
                        mine[k] += v
                assert cluster.extra["scaffold"]["agents"] == AGENTS_PER_AGGREGATOR == len(cluster.parents)
                for k, v in control.items():
                    before = previous[k] if previous is not None else 0.0
                    np.testing.assert_allclose(v, before + total[k] / samples, rtol=1e-4, atol=1e-5)
                previous = control
            _, weights = load_model(store, process.events("round_closed")[2]["next_base"])
            assert DigitsTask.evaluate_global(decode_tensors(weights))["accuracy"] > 0.5  # chance is 0.1
    assert len(sent) == 2 * AGENTS_PER_AGGREGATOR
    for agent_id, total in sent.items():
        variate = AgentState(tmp_path / agent_id, agent_id=agent_id).variate()
        for k, v in total.items():
            np.testing.assert_allclose(variate[k], v, rtol=1e-4, atol=1e-5)
    for process in aggregators.values():
        assert process.terminate() == 0, process.tail()
