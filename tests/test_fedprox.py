"""FedProx: the proximal term on the local objective, from the federation's round config to the trainer.

- a known answer on a quadratic: minimizing 1/2 ||w - t||^2 + mu/2 ||w - w0||^2 lands on
  (t + mu w0) / (1 + mu), so a large mu keeps the local solution near the base;
- the built-in tasks follow it (and say so in their metrics), a user's trainer is warned about;
- end to end: two real aggregators hand prox_mu to real agents, whose updates carry it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agent.tasks import DigitsTask
from agent.tasks._torch import MomentumSGD, add_proximal_gradient
from agent.trainer import prox_mu, proximal_gradient, unsupported_algorithms
from aggregator.config import AggregatorConfig
from coordinator.ring import Member, Ring
from proto.errors import ConfigError, InvalidInput
from storage.codec import decode_tensors
from storage.manifest import Manifest
from storage.models import load_model
from storage.store import LocalStore
from tests.procs import (
    ProcessFactory,
    free_port,
    procs_fixture,  # noqa: F401  (registers the `procs` fixture)
    wait_healthy,
)


def _minimize_quadratic(target: torch.Tensor, base: torch.Tensor, mu: float, steps: int = 300) -> torch.Tensor:
    w = base.clone().requires_grad_(True)
    anchor = [base.clone()]
    opt = MomentumSGD([w], lr=0.5 / (1 + mu), momentum=0.5)  # the objective's curvature is 1 + mu
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (w - target).square().sum()).backward()
        add_proximal_gradient([w], anchor, mu)
        opt.step()
    return w.detach()


@pytest.mark.parametrize("mu", [0.0, 1.0, 9.0, 99.0])
def test_proximal_step_reaches_the_known_minimizer_of_a_quadratic(mu: float) -> None:
    target = torch.tensor([4.0, -2.0, 1.0])
    base = torch.tensor([0.0, 1.0, -1.0])
    found = _minimize_quadratic(target, base, mu)
    torch.testing.assert_close(found, (target + mu * base) / (1 + mu), atol=1e-4, rtol=0)
    if mu > 50:  # the term dominates: the local solution stays next to the base
        assert float((found - base).norm()) < 0.02 * float((target - base).norm())


def agent_ids_homed(ports: dict[str, int], per_home: int, prefix: str) -> list[str]:
    """Agent ids `prefix-N`, picked so the static ring of `ports` homes `per_home` of them on each aggregator
    (grouped by home, in the order of `ports`)."""
    ring = Ring([Member(id=name, address=f"127.0.0.1:{port}") for name, port in ports.items()], version=1)
    ids: dict[str, list[str]] = {name: [] for name in ports}
    candidate = 0
    while any(len(v) < per_home for v in ids.values()):
        agent_id = f"{prefix}-{candidate}"
        candidate += 1
        home = ring.owner(agent_id).id
        if len(ids[home]) < per_home:
            ids[home].append(agent_id)
    return [agent_id for group in ids.values() for agent_id in group]


def test_proximal_gradient_for_numpy_trainers() -> None:
    weights = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    base = {"w": np.array([0.5, 3.0], dtype=np.float32)}
    np.testing.assert_allclose(proximal_gradient(weights, base, 2.0)["w"], [1.0, -2.0])


def test_prox_mu_is_read_and_validated() -> None:
    assert prox_mu({}) == 0.0
    assert prox_mu({"prox_mu": "0.01"}) == 0.01
    for bad in ("x", "-1", "nan", "inf", True):
        with pytest.raises(InvalidInput) as caught:
            prox_mu({"prox_mu": bad})
        assert caught.value.reason == "bad_round_config"
    AggregatorConfig(round_config={"prox_mu": "0.1"})
    for bad in ("x", "-0.5", "nan"):
        with pytest.raises(ConfigError):
            AggregatorConfig(round_config={"prox_mu": bad})


def test_digits_with_a_large_mu_stays_near_its_base() -> None:
    task = DigitsTask(partition={"index": 0, "count": 5, "alpha": 0.5})
    base = task.initial_weights()
    config = {"round": 0, "epochs": 3, "lr": 0.05}

    def distance(weights: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(np.sum((weights[k] - base[k]) ** 2) for k in base)))

    plain, _, plain_metrics = task.train(base, config)
    near, _, near_metrics = task.train(base, {**config, "prox_mu": "5"})
    same, _, _ = task.train(base, {**config, "prox_mu": "0"})
    assert "prox_mu" not in plain_metrics and near_metrics["prox_mu"] == 5.0
    assert distance(near) < 0.5 * distance(plain)
    assert all(np.array_equal(plain[k], same[k]) for k in base)  # mu 0 is plain FedAvg, bit for bit
    with pytest.raises(InvalidInput):
        task.train(base, {**config, "prox_mu": "-1"})


class _PlainTrainer:
    def train(self, weights, round_config):  # noqa: ANN001, ANN201  (a user's minimal trainer)
        return weights, 1, {}


def test_a_trainer_that_does_not_declare_fedprox_is_reported() -> None:
    assert unsupported_algorithms(_PlainTrainer(), {"prox_mu": "0.1"}) == {"fedprox"}
    assert unsupported_algorithms(_PlainTrainer(), {}) == set()
    assert unsupported_algorithms(DigitsTask(partition={"index": 0, "count": 5}), {"prox_mu": "0.1"}) == set()


# --- end to end --------------------------------------------------------------------------------

ROUNDS = 3
AGENTS_PER_AGGREGATOR = 2
MU = 0.5


def test_fedprox_through_two_real_aggregators(procs: ProcessFactory, tmp_path: Path) -> None:
    """Two aggregators with static peers and prox_mu in their round config; each update the
    agents send names the mu it trained with, and the semi-global model still learns."""
    ports = {"agg-a": free_port(), "agg-b": free_port()}
    peers = ",".join(f"{name}=127.0.0.1:{port}" for name, port in ports.items())
    store = tmp_path / "store"
    aggregators = {}
    for name, port in ports.items():
        aggregators[name] = procs.strata(
            "aggregator", "serve",
            "--set", f"id={name}", "--set", f"listen=127.0.0.1:{port}",
            "--set", f"state_dir={tmp_path / name}", "--set", f"store={store}",
            "--set", f"peers={peers}", "--set", "serving.heartbeat_interval_s=1",
            "--set", f"round.min_updates={AGENTS_PER_AGGREGATOR}", "--set", "round.quorum=1.0",
            "--set", "round.deadline_s=60",
            "--set", f"round_config.prox_mu={MU}", "--set", "round_config.epochs=3",
            name=name,
        )
    for name, port in ports.items():
        aggregators[name].wait_for_event("aggregator_started", timeout=60)
        wait_healthy(f"127.0.0.1:{port}", timeout=20)

    # agents join through agg-a and are redirected to their home on the ring; ids are picked
    # so each aggregator is home to AGENTS_PER_AGGREGATOR of them
    configs = []
    count = 2 * AGENTS_PER_AGGREGATOR
    for index, agent_id in enumerate(agent_ids_homed(ports, AGENTS_PER_AGGREGATOR, "prox-agent")):
        path = tmp_path / f"agent-{index}.yaml"
        path.write_text(yaml.safe_dump({
            "id": agent_id,
            "seeds": [f"127.0.0.1:{ports['agg-a']}"],
            "task": "digits",
            "task_options": {"partition": {"scheme": "dirichlet", "alpha": 0.5, "index": index, "count": count}},
            "state_dir": str(tmp_path / f"agent-{index}"),
            "max_rounds": ROUNDS,
            "backoff_max_s": 1.0,
        }))
        configs.append(path)
    agents = procs.strata("agent", "run", *[arg for p in configs for arg in ("--config", str(p))], name="agents")
    assert agents.wait_exit(timeout=180) == 0, agents.tail()
    assert not agents.events("trainer_ignores_algorithm")

    with LocalStore(store) as models:
        last = None
        for name, process in aggregators.items():
            closes = process.events("round_closed")
            assert closes, f"{name} closed no round: {process.tail()}"
            for close in closes:
                cluster = Manifest.from_bytes(models.get(close["cluster"]))
                assert cluster.metrics["prox_mu"] == pytest.approx(MU)
                for update in cluster.parents:
                    assert Manifest.from_bytes(models.get(update)).metrics["prox_mu"] == pytest.approx(MU)
            last = closes[-1]
        assert last is not None
        _, weights = load_model(models, last["next_base"])
        accuracy = DigitsTask.evaluate_global(decode_tensors(weights))["accuracy"]
    assert accuracy > 0.5, accuracy  # 10 classes: chance is 0.1
    for process in aggregators.values():
        assert process.terminate() == 0, process.tail()


def test_the_agent_warns_once_when_its_trainer_ignores_fedprox(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from agent.config import AgentConfig
    from agent.daemon import AgentDaemon

    daemon = AgentDaemon(AgentConfig(id="a1", state_dir=str(tmp_path)), trainer=_PlainTrainer())
    client = SimpleNamespace(agent_id="a1")
    with caplog.at_level("WARNING", logger="strata.agent"):
        for round_number in range(3):
            daemon._warn_unsupported(client, {"prox_mu": "0.1", "round": round_number})
    # only warnings count: whether INFO lines are captured depends on what set up logging earlier
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["trainer_ignores_algorithm"]
