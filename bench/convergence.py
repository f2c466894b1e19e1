"""Convergence: rounds to 97% MNIST test accuracy for one aggregator, cluster-only and semi-global fleets.

Run alone: `python bench/convergence.py` (`--quick` for a smoke run, `--rounds N`; `--alphas 0.1,0.5,1.0` sweeps
the Dirichlet alpha at both split levels; `--epochs`, `--batch-size`, `--lr`, `--lr-decay` tune the agents).

MNIST's 60k training images are split two-level (agent.tasks.partition): a
class-skewed Dirichlet(group_alpha = 0.5) across 3 groups (one per aggregator), then
Dirichlet(alpha = 0.5) across the 10 agents of each group. The same 30 slices train:
  (a) one aggregator with all 30 agents;
  (b) 3 aggregators x 10 agents, cluster models only (synthesis.enabled = false: each
      aggregator's next base is its own cluster model);
  (c) 3 aggregators x 10 agents, semi-global (synthesis on, peers = all);
  (d) centralized: one MnistTask holding the union of the same 30 slices (MnistTask.pooled),
      trained in-process with a matched compute budget: each "round" it takes as many
      batches of the same size and learning rate as the whole fleet does in one round
      (30 agents x max_batches), so (a)-(d) see the same number of training samples.

Everything is the real code path: in-process `AggregatorDaemon`s on 127.0.0.1 with a
static peer ring, and 30 real `AgentDaemon`s (agent.daemon.run_agents, task "mnist") in
threads, joining, downloading and submitting over gRPC. Round policy: quorum 1.0 and
min_updates = the aggregator's agent count (every round waits for all its agents), a
generous deadline. After a fleet has run, every aggregator's base model after each round
(the next_base of each closed round in the journal) is loaded from the store and
evaluated with MnistTask.evaluate_global on the 10k test split.

Target: (c) reaches 97% in <= 1.25x the rounds of (a), and (b) is visibly worse.
Writes bench/convergence_results.json and bench/convergence.png (NAME_results.json and NAME.png with
--name NAME; --quick writes to a
temporary directory unless --out-dir is given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common
from _common import print_table, quiet_logs

TARGET_ACCURACY = 0.97
TARGET_RATIO = 1.25
FEDERATION = "mnist"
AGGREGATOR_NAMES = "abcdefghij"
CHECKPOINTS = (5, 10, 15, 20, 30)


@dataclass(frozen=True, kw_only=True)
class Setup:
    key: str
    label: str
    aggregators: int
    synthesis: bool
    # synthesis.peers: 'all', 'random:K' (bench/convergence_fleet.py measures the sparse ones)
    peers: str = "all"
    # the last aggregator's agents take this many times as long per round (bench/_paced.py)
    slowdown: float = 1.0


SETUPS: dict[str, Setup] = {
    "a": Setup(key="a", label="(a) 1 aggregator x 30 agents", aggregators=1, synthesis=False),
    "b": Setup(key="b", label="(b) 3 aggregators, cluster only", aggregators=3, synthesis=False),
    "c": Setup(key="c", label="(c) 3 aggregators, semi-global", aggregators=3, synthesis=True),
    "d": Setup(key="d", label="(d) centralized, matched compute", aggregators=0, synthesis=False),
}


@dataclass(frozen=True, kw_only=True)
class Params:
    rounds: int = 35
    groups: int = 3
    agents_per_group: int = 10
    alpha: float = 0.5
    group_alpha: float = 0.5
    partition_seed: int = 0
    max_samples: int = 1000
    max_batches: int = 20
    batch_size: int = 64
    lr: float = 0.05
    # local epochs per round (max_batches still caps the steps) and the learning rate of round r: lr * lr_decay**r
    epochs: int = 1
    lr_decay: float = 1.0
    holdout: float = 0.05
    round_timeout_s: float = 300.0
    # what the agents train: built-in task "mnist", or a bench module's "module:Class" (e.g. _wide_cnn:WideMnistTask)
    trainer: str = "mnist"


# ---------------------------------------------------------------- one fleet


def _place_agents(members: Sequence[Any], setup: Setup, params: Params) -> list[tuple[str, int, int, Any]]:
    """(agent id, group, index, home member) for every agent: ids are picked so the ring the
    aggregators compute sends group g's agents to aggregator g (all to the one in setup a)."""
    from coordinator.ring import Ring

    ring = Ring(members, version=1)
    placed = []
    candidate = 0
    for group in range(params.groups):
        home = members[group % len(members)]
        for index in range(params.agents_per_group):
            while True:
                agent_id = f"conv-{setup.key}-{candidate:04d}"
                candidate += 1
                if ring.owner(agent_id).id == home.id:
                    break
            placed.append((agent_id, group, index, home))
    return placed


def _task_options(group: int, index: int, params: Params) -> dict[str, Any]:
    return {
        "partition": {
            "scheme": "dirichlet",
            "alpha": params.alpha,
            "groups": params.groups,
            "group": group,
            "group_alpha": params.group_alpha,
            "index": index,
            "count": params.agents_per_group,
            "seed": params.partition_seed,
        },
        "seed": group * params.agents_per_group + index,
        "max_samples": params.max_samples,
        "max_batches": params.max_batches,
        "batch_size": params.batch_size,
        "lr": params.lr,
        "holdout": params.holdout,
        "epochs": params.epochs,
        "lr_decay": params.lr_decay,
    }


def _agent_config(agent_id: str, group: int, index: int, home: Any, state_dir: Path, params: Params,
                  slowdown: float = 1.0, *, task: str = "mnist", federation: str = FEDERATION) -> Any:
    from agent.config import AgentConfig

    options = _task_options(group, index, params)
    return AgentConfig(
        id=agent_id,
        seeds=[home.address],
        federation=federation,
        task="_paced:PacedMnistTask" if slowdown > 1.0 else task,
        task_options={**options, "slowdown": slowdown} if slowdown > 1.0 else options,
        state_dir=str(state_dir),
        # a margin: an agent whose update was refused once (seen under heavy load) still counts that round,
        # and would otherwise leave before its aggregator closes the last one; `stop` ends every agent anyway
        max_rounds=params.rounds + 5,
        backoff_max_s=2.0,
    )


def run_fleet(setup: Setup, params: Params, workdir: Path, round_config: dict[str, str] | None = None, *,
              task: str = "mnist", federation: str = FEDERATION, initial_model: str = "",
              store_path: Path | None = None) -> dict[str, Any]:
    """Run one configuration for params.rounds rounds (with the aggregators' extra `round_config`, e.g.
    bench/noniid.py's prox_mu or scaffold); return its closed-round records.

    By default every setup starts from `task`'s seeded base in a store of its own; bench/flhub.py passes
    a hub-made `initial_model` (a fork's CID) already in the shared `store_path`."""
    from agent.daemon import run_agents
    from agent.trainer import trainer_target
    from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
    from aggregator.daemon import AggregatorDaemon
    from coordinator.ring import Member
    from intake.config import ServingSettings
    from storage.keys import KeyPair
    from storage.open import open_store
    from strata.supervise import free_port
    from strata.wiring import seeded_base_model

    home = workdir / setup.key
    store_path = store_path or home / "store"
    base_cid = initial_model
    if not base_cid:
        with open_store(str(store_path)) as store:
            base_cid = seeded_base_model(store, KeyPair.generate(), task_class=trainer_target(task), task=task,
                                         federation=federation)
    members = [
        Member(id=f"agg-{AGGREGATOR_NAMES[i]}", address=f"127.0.0.1:{free_port()}") for i in range(setup.aggregators)
    ]
    per_aggregator = params.groups * params.agents_per_group // setup.aggregators
    daemons = []
    for member in members:
        config = AggregatorConfig(
            id=member.id,
            listen=member.address,
            federation=federation,
            initial_model=base_cid,
            state_dir=str(home / "aggregators" / member.id),
            store=str(store_path),
            round=RoundSettings(
                quorum=1.0,
                min_updates=per_aggregator,
                deadline_s=params.round_timeout_s,
                agent_timeout_s=params.round_timeout_s,
            ),
            synthesis=SynthesisSettings(enabled=setup.synthesis, peers=setup.peers),
            peers=[f"{m.id}={m.address}" for m in members] if len(members) > 1 else [],
            serving=ServingSettings(heartbeat_interval_s=2.0),
            round_config=dict(round_config or {}),
        )
        daemons.append(AggregatorDaemon(config).start())

    placed = _place_agents(members, setup, params)
    slow_ids = {members[-1].id} if setup.slowdown > 1.0 and len(members) > 1 else set()
    configs = [
        _agent_config(agent_id, group, index, member, home / "agents" / agent_id, params,
                      setup.slowdown if member.id in slow_ids else 1.0, task=task, federation=federation)
        for agent_id, group, index, member in placed
    ]
    stop = threading.Event()
    started = time.monotonic()
    runner = threading.Thread(target=run_agents, args=(configs, stop), name="convergence-agents", daemon=True)
    runner.start()
    records: dict[str, list[Any]] = {}
    try:
        last_progress, last_total = time.monotonic(), -1
        while True:
            rounds_now = [d.rounds.current.round for d in daemons]
            total = sum(rounds_now)
            if total != last_total:
                last_progress, last_total = time.monotonic(), total
                print(f"  [{setup.key}] rounds closed {rounds_now}  {time.monotonic() - started:6.1f} s", flush=True)
            # a slow aggregator is not waited for: the run is as long as the others' rounds
            if min(r for d, r in zip(daemons, rounds_now, strict=True) if d.id not in slow_ids) >= params.rounds:
                break
            if time.monotonic() - last_progress > params.round_timeout_s:
                raise RuntimeError(f"setup {setup.key}: no round closed for {params.round_timeout_s:.0f} s at {rounds_now}")
            # the last submit ends the agents' thread a tick before the aggregator closes that round
            if not runner.is_alive() and time.monotonic() - last_progress > 10.0:
                raise RuntimeError(f"setup {setup.key}: agents exited early at rounds {rounds_now}")
            time.sleep(0.5)
        wall_s = time.monotonic() - started
        for daemon in daemons:
            records[daemon.id] = daemon.rounds.closed_rounds()[: params.rounds]
    finally:
        stop.set()
        runner.join(timeout=30)
        for daemon in daemons:
            daemon.stop()
    return {"base": base_cid, "store": str(store_path), "records": records, "wall_s": wall_s, "agents": len(configs),
            "slow": sorted(slow_ids)}


def run_centralized(params: Params) -> dict[str, Any]:
    """(d): the union of the 30 slices in one task, trained with the fleet's per-round budget;
    evaluated after every round like the fleets' base models."""
    import math

    from agent.trainer import trainer_target

    task = trainer_target(params.trainer)
    started = time.monotonic()
    slices = [task(**_task_options(group, index, params))
              for group in range(params.groups) for index in range(params.agents_per_group)]
    union = task.pooled(slices)
    # batches the whole fleet trains per round: each agent stops at max_batches or after `epochs` passes over
    # its slice, whichever comes first (an agent's slice is often under max_batches x batch_size)
    budget = sum(min(params.max_batches, params.epochs * math.ceil(s.num_train_samples / params.batch_size))
                 for s in slices)
    epochs = math.ceil(budget * params.batch_size / union.num_train_samples)
    weights = task.seeded_weights(0)  # task_base_model's seed: the fleets' base
    initial = task.evaluate_global(weights)
    points = [{"round": 0, "accuracy": initial["accuracy"], "loss": initial["loss"]}]
    train_s = 0.0
    for round_number in range(params.rounds):
        tick = time.monotonic()
        weights, _, _ = union.train(weights, {"round": round_number, "epochs": epochs, "max_batches": budget})
        train_s += time.monotonic() - tick
        metrics = task.evaluate_global(weights)
        points.append({"round": round_number + 1, "accuracy": metrics["accuracy"], "loss": metrics["loss"]})
        print(f"  [d] round {round_number + 1}: {metrics['accuracy']:.4f}  {time.monotonic() - started:6.1f} s", flush=True)
    return {"points": points, "wall_s": train_s, "samples": union.num_train_samples, "batches_per_round": budget}


# ---------------------------------------------------------------- evaluation


def evaluate_fleet(setup: Setup, fleet: dict[str, Any], metric: Any = None) -> dict[str, Any]:
    """Test accuracy of every aggregator's base after each round (round 0 = the initial base);
    `metric` (weights -> {"accuracy", "loss"}) defaults to MnistTask.evaluate_global (10k test split)."""
    from agent.tasks import MnistTask
    from storage.codec import decode_tensors
    from storage.models import load_manifest, load_model
    from storage.open import open_store

    cache: dict[str, dict[str, float]] = {}
    metric = metric or MnistTask.evaluate_global

    def evaluate(store: Any, model_cid: str) -> dict[str, float]:
        manifest, weights = load_model(store, model_cid)
        if manifest.weights not in cache:
            cache[manifest.weights] = metric(decode_tensors(weights))
        return cache[manifest.weights]

    aggregators: dict[str, list[dict[str, Any]]] = {}
    with open_store(fleet["store"]) as store:
        initial = evaluate(store, fleet["base"])
        for aggregator_id, records in fleet["records"].items():
            points = [{"round": 0, "accuracy": initial["accuracy"], "loss": initial["loss"], "model": fleet["base"]}]
            for record in records:
                metrics = evaluate(store, record.next_base_cid)
                point: dict[str, Any] = {
                    "round": record.round + 1,
                    "accuracy": metrics["accuracy"],
                    "loss": metrics["loss"],
                    "model": record.next_base_cid,
                    "kind": record.extra.get("next_base_kind", "cluster"),
                    "participants": record.participants,
                    "round_s": round((record.closed_at or 0) - record.opened_at, 3),
                }
                if record.next_base_cid != record.cluster_cid:
                    extra = load_manifest(store, record.next_base_cid).extra
                    point["peers_used"] = len(extra.get("peer_rounds", {}))
                    point["peer_ages"] = sorted(record.round - r for r in extra.get("peer_rounds", {}).values())
                    point["refused"] = [f"{r['producer']}:{r['reason']}" for r in extra.get("refused_peers", [])]
                points.append(point)
            aggregators[aggregator_id] = points
    return aggregators


def rounds_to_target(curve: Sequence[float]) -> int | None:
    return next((k for k, accuracy in enumerate(curve) if accuracy >= TARGET_ACCURACY), None)


def summarize(setup: Setup, aggregators: dict[str, list[dict[str, Any]]], slow: Sequence[str] = ()) -> dict[str, Any]:
    """Mean and worst curves over the aggregators at their own round k; a slow aggregator (fewer
    rounds in the same time) is left out of them and reported on its own."""
    curves = {aid: [p["accuracy"] for p in points] for aid, points in aggregators.items()}
    paced = {aid: c for aid, c in curves.items() if aid not in slow} or curves
    length = min(len(c) for c in paced.values())
    mean = [sum(c[k] for c in paced.values()) / len(paced) for k in range(length)]
    worst = [min(c[k] for c in paced.values()) for k in range(length)]
    summary: dict[str, Any] = {
        "label": setup.label,
        "curves": {"mean": mean, "min": worst},
        "rounds_to_target": {
            "mean": rounds_to_target(mean),
            "all": rounds_to_target(worst),
            **{aid: rounds_to_target(c) for aid, c in curves.items()},
        },
        "final": {"mean": mean[-1], "min": worst[-1], **{aid: c[-1] for aid, c in curves.items()}},
    }
    refused = [r for points in aggregators.values() for p in points for r in p.get("refused", [])]
    if any("peers_used" in p for points in aggregators.values() for p in points):
        syntheses = [p for points in aggregators.values() for p in points if "peers_used" in p]
        summary["synthesis"] = {
            "syntheses": len(syntheses),
            "peers_used_mean": sum(p["peers_used"] for p in syntheses) / len(syntheses),
            "refusals": {reason: sum(r.endswith(":" + reason) for r in refused) for reason in sorted({r.split(":")[-1] for r in refused})},
            "peer_age_histogram": _histogram(a for p in syntheses for a in p["peer_ages"]),
        }
    return summary


def _histogram(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- report


def _ratio(numerator: int | None, denominator: int | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def report(results: dict[str, Any], params: Params) -> dict[str, Any]:
    summaries = results["summaries"]
    rows = []
    for key, summary in summaries.items():
        r2t = summary["rounds_to_target"]
        per = [f"{aid}={r2t[aid]}" for aid in sorted(r2t) if aid.startswith("agg-")]
        rows.append([summary["label"], _fmt(r2t["mean"]), _fmt(r2t["all"]), " ".join(per),
                     f"{summary['final']['mean']:.4f}", f"{results['fleets'][key]['wall_s']:.0f}"])
    print(f"\nrounds to {TARGET_ACCURACY:.0%} test accuracy (mean curve / every aggregator / each), final accuracy:")
    print_table(["setup", "mean", "all", "per aggregator", "final", "wall s"], rows)

    checkpoints = [k for k in CHECKPOINTS if k < params.rounds] + [params.rounds]
    rows = []
    for key, summary in summaries.items():
        series = [("mean", summary["curves"]["mean"])]
        if SETUPS[key].aggregators > 1:
            series.append(("min", summary["curves"]["min"]))
        for name, curve in series:
            rows.append([f"{key} {name}", *[f"{curve[k]:.4f}" if k < len(curve) else "-" for k in checkpoints]])
    print("\ntest accuracy of the aggregators' base models after k rounds:")
    print_table(["series", *[f"k={k}" for k in checkpoints]], rows)

    verdict: dict[str, Any] = {}
    if "a" in summaries:
        a = summaries["a"]["rounds_to_target"]["mean"]
        for key in ("b", "c"):
            if key in summaries:
                r2t = summaries[key]["rounds_to_target"]
                verdict[f"{key}_over_a_mean"] = _ratio(r2t["mean"], a)
                verdict[f"{key}_over_a_all"] = _ratio(r2t["all"], a)
        if "c" in summaries:
            ratio = verdict["c_over_a_mean"]
            verdict["c_target_met_mean"] = ratio is not None and ratio <= TARGET_RATIO
            ratio_all = verdict["c_over_a_all"]
            verdict["c_target_met_all"] = ratio_all is not None and ratio_all <= TARGET_RATIO
    # without (a) too: the tuned runs compare (c) with (d) alone
    if "c" in summaries and "d" in summaries:
        verdict["d_minus_c_final_mean"] = summaries["d"]["final"]["mean"] - summaries["c"]["final"]["mean"]
    if "b" in summaries and "c" in summaries:
        b, c = summaries["b"]["curves"]["mean"], summaries["c"]["curves"]["mean"]
        verdict["b_minus_c_final_mean"] = b[-1] - c[-1]
    if verdict:
        print("\nratios (rounds to target vs (a); None = not reached) and final-accuracy gaps:")
        for name, value in verdict.items():
            print(f"  {name:24s} {value if not isinstance(value, float) else round(value, 4)}")
    return verdict


def _fmt(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "black", "b": "tab:red", "c": "tab:blue", "d": "tab:green"}
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis in (full, zoom):
        for key, summary in results["summaries"].items():
            evaluated = results["evaluations"][key]
            if len(evaluated) > 1:
                for points in evaluated.values():
                    axis.plot([p["round"] for p in points], [p["accuracy"] for p in points],
                              color=colors[key], alpha=0.35, linewidth=0.9, linestyle="--")
            mean = summary["curves"]["mean"]
            axis.plot(range(len(mean)), mean, color=colors[key], linewidth=2,
                      label=summary["label"] + (" (mean; dashed: each)" if len(evaluated) > 1 else ""))
        axis.axhline(TARGET_ACCURACY, color="gray", linewidth=0.8, linestyle=":")
        axis.set_xlabel("rounds")
        axis.grid(alpha=0.3)
    full.set_ylabel("test accuracy (MNIST 10k)")
    full.set_ylim(0, 1)
    full.legend(loc="lower right", fontsize=8)
    zoom.set_ylim(0.90, 1.0)
    zoom.set_title("zoom: 0.90-1.00", fontsize=9)
    fig.suptitle(f"3 groups x 10 agents, Dirichlet {results['params']['group_alpha']} by class across aggregators",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def run_setups(keys: Sequence[str], params: Params, workdir: Path) -> dict[str, Any]:
    """Every setup in `keys` on the same slices: {"params", "fleets", "evaluations", "summaries"}."""
    from agent.trainer import trainer_target

    results: dict[str, Any] = {"params": asdict(params), "fleets": {}, "evaluations": {}, "summaries": {}}
    for key in keys:
        setup = SETUPS[key]
        print(f"{setup.label}: {params.rounds} rounds (alpha {params.group_alpha}/{params.alpha})", flush=True)
        if key == "d":
            central = run_centralized(params)
            results["fleets"][key] = {"wall_s": round(central["wall_s"], 1), "agents": 0,
                                      "samples": central["samples"],
                                      "batches_per_round": central["batches_per_round"]}
            results["evaluations"][key] = {"central": central["points"]}
            results["summaries"][key] = summarize(setup, results["evaluations"][key])
            continue
        fleet = run_fleet(setup, params, workdir, task=params.trainer)
        evaluate_started = time.monotonic()
        evaluations = evaluate_fleet(setup, fleet, metric=trainer_target(params.trainer).evaluate_global)
        results["fleets"][key] = {"wall_s": round(fleet["wall_s"], 1), "agents": fleet["agents"],
                                  "evaluate_s": round(time.monotonic() - evaluate_started, 1)}
        results["evaluations"][key] = evaluations
        results["summaries"][key] = summarize(setup, evaluations)
        print(f"  [{key}] trained in {fleet['wall_s']:.0f} s; rounds to {TARGET_ACCURACY:.0%}: "
              f"{results['summaries'][key]['rounds_to_target']}", flush=True)
        # the next setup makes its own store; this one's models are evaluated already
        shutil.rmtree(workdir / key, ignore_errors=True)
    return results


def plot_alphas(sweep: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per alpha: each setup's mean curve (solid) and worst aggregator (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "black", "b": "tab:red", "c": "tab:blue", "d": "tab:green"}
    fig, axes = plt.subplots(1, len(sweep), figsize=(5 * len(sweep), 4.5), sharey=True, squeeze=False)
    for axis, (alpha, results) in zip(axes[0], sweep.items(), strict=True):
        for key, summary in results["summaries"].items():
            mean, worst = summary["curves"]["mean"], summary["curves"]["min"]
            axis.plot(range(len(mean)), mean, color=colors[key], linewidth=2, label=summary["label"] + " (mean)")
            if SETUPS[key].aggregators > 1:
                axis.plot(range(len(worst)), worst, color=colors[key], linewidth=1, linestyle=":",
                          label=summary["label"] + " (worst aggregator)")
        axis.axhline(TARGET_ACCURACY, color="gray", linewidth=0.8, linestyle=":")
        axis.set_title(f"Dirichlet alpha = {alpha} (groups and agents)", fontsize=10)
        axis.set_xlabel("rounds")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (MNIST 10k)")
    axes[0][0].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_alphas(sweep: dict[str, dict[str, Any]]) -> None:
    rows = []
    for alpha, results in sweep.items():
        for key, summary in results["summaries"].items():
            r2t = summary["rounds_to_target"]
            rows.append([alpha, summary["label"], f"{summary['final']['mean']:.4f}", f"{summary['final']['min']:.4f}",
                         _fmt(r2t["mean"]), _fmt(r2t["all"]), f"{results['fleets'][key]['wall_s']:.0f}"])
    print("\nper alpha: final accuracy (mean / worst aggregator), rounds to 97% (mean curve / every aggregator):")
    print_table(["alpha", "setup", "final mean", "final worst", "r97 mean", "r97 all", "wall s"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 2 agents per group")
    parser.add_argument("--rounds", type=int, help="rounds per setup (default 35)")
    parser.add_argument("--setups", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--lr", type=float, help="agent learning rate (default 0.05)")
    parser.add_argument("--lr-decay", type=float, help="learning rate of round r: lr * lr_decay**r (default 1.0)")
    parser.add_argument("--epochs", type=int, help="local epochs per round, capped by --max-batches (default 1)")
    parser.add_argument("--max-batches", type=int, help="local batches per round (default 20)")
    parser.add_argument("--batch-size", type=int, help="local batch size (default 64)")
    parser.add_argument("--trainer", help="what agents train: a built-in task or this folder's 'module:Class' "
                        "(default mnist; _wide_cnn:WideMnistTask is McMahan et al.'s 1.66M-parameter CNN)")
    parser.add_argument("--max-samples", type=int, help="images per agent's slice, at most (default 1000; "
                        "30 agents x 2000 hold all of MNIST's 60k training images)")
    parser.add_argument("--alphas", help="comma-separated Dirichlet alphas, each used at both levels of the split "
                                         "(groups and agents); one run of --setups per alpha")
    parser.add_argument("--name", default="convergence",
                        help="output stem: NAME_results.json and NAME.png (default convergence)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default bench/)")
    args = parser.parse_args(argv)

    params = Params(rounds=3, agents_per_group=2, max_batches=3) if args.quick else Params()
    overrides = {k: v for k, v in {"rounds": args.rounds, "lr": args.lr, "lr_decay": args.lr_decay,
                                   "epochs": args.epochs, "max_batches": args.max_batches,
                                   "batch_size": args.batch_size, "max_samples": args.max_samples,
                                   "trainer": args.trainer}.items()
                 if v is not None}
    params = Params(**{**asdict(params), **overrides})
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    unknown = set(keys) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}")
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()] if args.alphas else []
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="convergence-quick-")) if args.quick else _common.REPO / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{args.name}_results.json", out_dir / f"{args.name}.png"
    command = " ".join(["python", "bench/convergence.py", *(argv if argv is not None else sys.argv[1:])])

    quiet_logs()
    workdir = Path(tempfile.mkdtemp(prefix="strata-convergence-"))
    saved_env = {k: os.environ.get(k) for k in ("HOME", "STRATA_STORE")}
    # nothing may fall back to the user's ~/.strata
    os.environ["HOME"] = str(workdir / "home")
    os.environ["STRATA_STORE"] = str(workdir / "home" / "store")
    started = time.monotonic()
    sweep: dict[str, dict[str, Any]] = {}
    try:
        if alphas:
            for alpha in alphas:
                alpha_params = Params(**{**asdict(params), "alpha": alpha, "group_alpha": alpha})
                sweep[str(alpha)] = run_setups(keys, alpha_params, workdir / f"alpha-{alpha}")
                sweep[str(alpha)]["verdict"] = report(sweep[str(alpha)], alpha_params)
                # the results so far, in case a later alpha does not finish
                json_path.write_text(json.dumps({"alphas": sweep, "command": command}, indent=1, sort_keys=True) + "\n")
        else:
            results = run_setups(keys, params, workdir)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(workdir, ignore_errors=True)
    if alphas:
        report_alphas(sweep)
        results = {"params": asdict(params), "alphas": sweep}
    else:
        results["verdict"] = report(results, params)
    results["total_s"] = round(time.monotonic() - started, 1)
    results["command"] = command
    json_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if alphas:
        plot_alphas(sweep, png_path)
    else:
        plot(results, png_path)
    print(f"\ntotal {results['total_s']:.0f} s; wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
