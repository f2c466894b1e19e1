"""FedBuff: synchronous rounds vs buffered asynchronous aggregation, with stragglers (issue 17 §1).

Run alone: `python bench/fedbuff.py` (`--quick` for a smoke run; `--setups buffered,sync_q1`;
`--budget-s` for the wall time each fleet trains).

MNIST non-IID as in bench/convergence.py, smaller: 3 aggregators x 5 agents; a class-skewed
Dirichlet(0.5) across the 3 groups (one per aggregator), then Dirichlet(0.5) across a group's 5
agents. 20% of the devices (one per aggregator) are stragglers, 10x slower: each of their updates
takes 10x the time its own training took (the training, then 9x that as a sleep, so a straggler
does not eat the CPU the others share). Everything is the real code path: in-process
`AggregatorDaemon`s on 127.0.0.1 with a static peer ring, 15 real `AgentDaemon`s (task mnist) in
threads, over gRPC. Each setup trains for the same wall-time budget from the same initial base:

  sync_q1   sync rounds, quorum 1.0 (every round waits for every device: FedAvg's barrier);
  sync_q08  sync rounds, quorum 0.8 (Strata's default: a round closes on 4 of 5, so it does not wait
            for the straggler; its late updates are refused as stale past max_staleness 2, the default);
  buffered  round.mode buffered, buffer_size 3, max_staleness 20 (polynomial discount, exponent 0.5),
            semi-global synthesis every 2 steps (decay in seconds, half-life 10 s, max_age 60 s).

After the run, every aggregator's base at each checkpoint (every `checkpoint_s` of wall time) is
evaluated on a fixed 2,000-image subset of MNIST's test split (the whole 10k costs ~8 s per model
on the shared cores). Time-to-target is the first checkpoint where the mean accuracy of the three
aggregators' bases reaches the target; updates-to-target counts the updates the fleet had accepted
by then. Writes bench/fedbuff_results.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import print_table, quiet_logs

# 97% (the target) needs ~10x the updates this shared machine trains in the budget: see the README
TARGET_ACCURACY = 0.90
THRESHOLDS = (0.80, 0.85, 0.90)
FEDERATION = "mnist"
SETUP_LABELS = {
    "sync_q1": "sync, quorum 1.0 (waits for every device)",
    "sync_q08": "sync, quorum 0.8 (Strata's default)",
    "buffered": "buffered (FedBuff), K = 3",
}


@dataclass(frozen=True, kw_only=True)
class Params:
    groups: int = 3
    agents_per_group: int = 5
    slow_factor: float = 10.0
    alpha: float = 0.5
    group_alpha: float = 0.5
    partition_seed: int = 0
    max_samples: int = 1000
    max_batches: int = 10
    batch_size: int = 64
    lr: float = 0.05
    holdout: float = 0.05
    buffer_size: int = 3
    budget_s: float = 420.0
    checkpoint_s: float = 30.0
    eval_images: int = 2000


@dataclass(frozen=True, kw_only=True)
class _Setup:
    key: str  # what convergence._place_agents names agents after


class Straggler:
    """A trainer `factor` times slower than the one it wraps: it trains, then sleeps (factor - 1) x that."""

    def __init__(self, inner: Any, factor: float) -> None:
        self._inner = inner
        self._factor = factor

    def train(self, weights: Any, round_config: Any) -> Any:
        started = time.perf_counter()
        result = self._inner.train(weights, round_config)
        time.sleep((self._factor - 1) * (time.perf_counter() - started))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _round_settings(key: str, params: Params, per_aggregator: int) -> Any:
    from aggregator.config import RoundSettings

    long = 3600.0
    if key == "sync_q1":
        return RoundSettings(quorum=1.0, min_updates=per_aggregator, deadline_s=long, agent_timeout_s=long)
    if key == "sync_q08":
        return RoundSettings(quorum=0.8, min_updates=1, deadline_s=long, agent_timeout_s=long)
    return RoundSettings(
        mode="buffered", buffer_size=params.buffer_size, max_staleness=20, deadline_s=long, agent_timeout_s=long
    )


def _synthesis_settings(key: str) -> Any:
    from aggregator.config import SynthesisSettings

    if key == "buffered":
        return SynthesisSettings(
            decay_unit="seconds", decay_params={"half_life": 10.0}, max_age=60.0, every_steps=2, peers="all"
        )
    return SynthesisSettings(peers="all")  # convergence (c)'s: rounds, half-life 2, peer_wait_s 3


def run_fleet(key: str, params: Params, workdir: Path) -> dict[str, Any]:
    """Train one setup for params.budget_s; return its journals' records (times relative to the start)."""
    from convergence import _place_agents, _task_options

    from agent.config import AgentConfig
    from agent.daemon import AgentDaemon
    from agent.trainer import load_trainer
    from aggregator.config import AggregatorConfig
    from aggregator.daemon import AggregatorDaemon
    from coordinator.ring import Member
    from intake.config import ServingSettings
    from storage.keys import KeyPair
    from storage.open import open_store
    from strata.supervise import free_port
    from strata.wiring import task_base_model

    home = workdir / key
    store_path = home / "store"
    with open_store(str(store_path)) as store:
        base_cid = task_base_model(store, KeyPair.generate(), task="mnist", federation=FEDERATION)
    members = [Member(id=f"agg-{'abc'[i]}", address=f"127.0.0.1:{free_port()}") for i in range(params.groups)]
    daemons = []
    for member in members:
        config = AggregatorConfig(
            id=member.id,
            listen=member.address,
            federation=FEDERATION,
            initial_model=base_cid,
            state_dir=str(home / "aggregators" / member.id),
            store=str(store_path),
            round=_round_settings(key, params, params.agents_per_group),
            synthesis=_synthesis_settings(key),
            peers=[f"{m.id}={m.address}" for m in members],
            serving=ServingSettings(heartbeat_interval_s=2.0),
        )
        daemons.append(AggregatorDaemon(config).start())

    stop = threading.Event()
    agents: list[tuple[AgentDaemon, bool]] = []
    for agent_id, group, index, member in _place_agents(members, _Setup(key=key), params):
        slow = index == 0  # the first agent of each group: 1 in 5
        trainer = load_trainer("mnist", _task_options(group, index, params))
        config = AgentConfig(
            id=agent_id, seeds=[member.address], federation=FEDERATION, task="mnist",
            state_dir=str(home / "agents" / agent_id), backoff_max_s=2.0,
        )  # fmt: skip
        agents.append((AgentDaemon(config, Straggler(trainer, params.slow_factor) if slow else trainer, stop=stop), slow))
    threads = [threading.Thread(target=a.run, name=a.config.id, daemon=True) for a, _ in agents]
    started_wall = time.time()
    for thread in threads:
        thread.start()
    try:
        while time.time() - started_wall < params.budget_s:
            time.sleep(min(15.0, params.budget_s - (time.time() - started_wall)))
            steps = [d.rounds.current.round for d in daemons]
            print(f"  [{key}] rounds/steps {steps}  {time.time() - started_wall:6.1f} s", flush=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        records = {d.id: d.rounds.closed_rounds() for d in daemons}
        updates = [u for d in daemons for u in d.journal.iter_all_updates()]
        refusals = {d.id: d.journal.refusal_counts() for d in daemons}
        for daemon in daemons:
            daemon.stop()
    stragglers = {a.config.id for a, slow in agents if slow}
    return {
        "base": base_cid,
        "store": str(store_path),
        "started": started_wall,
        "rounds": {
            aid: [{"closed_s": r.closed_at - started_wall, "next_base": r.next_base_cid, "participants": r.participants,
                   "synthesis": r.extra.get("synthesis", True), "kind": r.extra.get("next_base_kind")}
                  for r in recs if r.closed_at is not None]
            for aid, recs in records.items()
        },  # fmt: skip
        "updates": sorted(
            ({"at_s": u.accepted_at - started_wall, "staleness": u.staleness, "straggler": u.agent_id in stragglers}
             for u in updates),
            key=lambda u: u["at_s"],
        ),  # fmt: skip
        "refusals": refusals,
        "submitted": {a.config.id: a.rounds_done for a, _ in agents},
    }


def _subset_evaluator(images: int) -> Any:
    import numpy as np

    from agent.tasks import MnistTask
    from agent.tasks._torch import _evaluate

    data = MnistTask._dataset()
    indices = np.arange(min(images, data.test_y.shape[0]))

    def evaluate(weights: Any) -> float:
        model = MnistTask._build_model()
        MnistTask._load(model, weights)
        return _evaluate(model, MnistTask._to_input, data.test_x, data.test_y, indices)["accuracy"]

    return evaluate


def evaluate_fleet(fleet: dict[str, Any], params: Params) -> list[dict[str, Any]]:
    """Mean accuracy of the aggregators' bases, and updates accepted, at every checkpoint."""
    from storage.codec import decode_tensors
    from storage.models import load_model
    from storage.open import open_store

    evaluate = _subset_evaluator(params.eval_images)
    cache: dict[str, float] = {}
    points = []
    with open_store(fleet["store"]) as store:

        def accuracy(model_cid: str) -> float:
            manifest, weights = load_model(store, model_cid)
            if manifest.weights not in cache:
                cache[manifest.weights] = evaluate(decode_tensors(weights))
            return cache[manifest.weights]

        steps = int(params.budget_s // params.checkpoint_s)
        for k in range(steps + 1):
            at = k * params.checkpoint_s
            per = {}
            for aid, rounds in fleet["rounds"].items():
                done = [r for r in rounds if r["closed_s"] <= at]
                per[aid] = accuracy(done[-1]["next_base"] if done else fleet["base"])
            points.append({
                "at_s": at,
                "mean": sum(per.values()) / len(per),
                "min": min(per.values()),
                "per_aggregator": per,
                "updates": sum(u["at_s"] <= at for u in fleet["updates"]),
                "rounds": sum(sum(r["closed_s"] <= at for r in rounds) for rounds in fleet["rounds"].values()),
            })  # fmt: skip
            print(f"    {at:6.0f} s  mean {points[-1]['mean']:.4f}  updates {points[-1]['updates']}", flush=True)
    return points


def summarize(key: str, fleet: dict[str, Any], points: list[dict[str, Any]], target: float) -> dict[str, Any]:
    reached = next((p for p in points if p["mean"] >= target), None)
    reached_all = next((p for p in points if p["min"] >= target), None)
    updates = fleet["updates"]
    by_threshold = {}
    for threshold in THRESHOLDS:
        point = next((p for p in points if p["mean"] >= threshold), None)
        by_threshold[f"{threshold:.2f}"] = {"s": point["at_s"], "updates": point["updates"]} if point else None
    return {
        "label": SETUP_LABELS[key],
        "thresholds": by_threshold,
        "time_to_target_s": reached["at_s"] if reached else None,
        "updates_to_target": reached["updates"] if reached else None,
        "rounds_to_target": reached["rounds"] if reached else None,
        "time_to_target_all_s": reached_all["at_s"] if reached_all else None,
        "final_mean": points[-1]["mean"],
        "updates_total": len(updates),
        "straggler_updates": sum(u["straggler"] for u in updates),
        "stale_updates": sum(u["staleness"] > 0 for u in updates),
        "mean_staleness": sum(u["staleness"] for u in updates) / len(updates) if updates else 0.0,
        "rounds_total": sum(len(r) for r in fleet["rounds"].values()),
        "refusals": {aid: dict(c) for aid, c in fleet["refusals"].items() if c},
    }


def threshold_table(results: dict[str, Any], thresholds: tuple[float, ...]) -> None:
    """Seconds and updates to each accuracy threshold per setup, and buffered's time ratio against each sync
    setup, from a results file's checkpoints (mean of the aggregators' bases)."""
    firsts: dict[str, dict[float, dict[str, Any] | None]] = {}
    for key, entry in results["setups"].items():
        firsts[key] = {t: next((p for p in entry["points"] if p["mean"] >= t), None) for t in thresholds}
    rows = []
    for key, by in firsts.items():
        cells = [f"{by[t]['at_s']:.0f} s / {by[t]['updates']}" if by[t] else "not reached" for t in thresholds]
        rows.append([SETUP_LABELS[key], *cells])
    print_table(["setup", *[f"{t:.0%}: s / updates" for t in thresholds]], rows)
    if "buffered" in firsts:
        budget = results["params"]["budget_s"]
        for key in firsts:
            if key == "buffered":
                continue
            ratios = []
            for t in thresholds:
                fast, slow = firsts["buffered"][t], firsts[key][t]
                if fast is None:
                    ratios.append("-")
                elif slow is None:
                    ratios.append(f"> {budget / fast['at_s']:.1f}x")
                else:
                    ratios.append(f"{slow['at_s'] / fast['at_s']:.1f}x")
            print(f"time-to-accuracy, {key} over buffered: " + ", ".join(f"{t:.0%} {r}" for t, r in zip(thresholds, ratios, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 s per setup")
    parser.add_argument("--setups", default="sync_q1,sync_q08,buffered")
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--target", type=float, default=TARGET_ACCURACY)
    parser.add_argument("--out", default=str(Path(__file__).with_name("fedbuff_results.json")))
    parser.add_argument("--workdir", default="")
    parser.add_argument("--report", default="", help="print the threshold table of a results file and exit")
    args = parser.parse_args()
    if args.report:
        threshold_table(json.loads(Path(args.report).read_text()), (0.70, 0.75, 0.80, 0.85, 0.90))
        return
    quiet_logs()
    params = Params()
    if args.quick:
        params = Params(budget_s=40.0, checkpoint_s=20.0, eval_images=500)
    if args.budget_s:
        params = Params(**{**asdict(params), "budget_s": args.budget_s})
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="strata-fedbuff-"))
    results: dict[str, Any] = {"params": asdict(params), "target": args.target, "setups": {}}
    wall = time.monotonic()
    for key in args.setups.split(","):
        print(f"[{key}] {SETUP_LABELS[key]}", flush=True)
        fleet = run_fleet(key, params, workdir)
        points = evaluate_fleet(fleet, params)
        summary = summarize(key, fleet, points, args.target)
        results["setups"][key] = {"summary": summary, "points": points, "submitted": fleet["submitted"]}
        print(json.dumps(summary), flush=True)
    results["bench_wall_s"] = round(time.monotonic() - wall, 1)
    rows = []
    for entry in results["setups"].values():
        s = entry["summary"]
        rows.append([
            s["label"], s["time_to_target_s"] if s["time_to_target_s"] is not None else "not reached",
            s["updates_to_target"] if s["updates_to_target"] is not None else "-",
            f"{s['final_mean']:.4f}", s["updates_total"], s["straggler_updates"], s["rounds_total"],
        ])  # fmt: skip
    print_table(["setup", f"s to {args.target:.0%}", "updates to it", "final", "updates", "straggler's", "rounds"], rows)
    if not args.quick or args.out != parser.get_default("out"):
        Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
