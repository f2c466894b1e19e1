"""Convergence at fleet scale: semi-global synthesis when an aggregator cannot fetch every peer.

Run alone: `python bench/convergence_fleet.py` (`--quick` for a smoke run, `--rounds N`,
`--setups a,r1,r2`).

With every peer fresh, synthesis is single-server FedAvg by construction (bench/convergence.py,
(c) = (a)). Here each aggregator blends its cluster model with only K peers per round
(`synthesis.peers: random:K`, O(1) fetches instead of O(N)), and one aggregator is 3x slower:
  (a)  1 aggregator x 30 agents: the single-server reference;
  (r1) 10 aggregators x 3 agents, synthesis.peers random:1, the last aggregator 3x slower;
  (r2) the same with random:2;
  (e1), (e2) the same with exp:1, exp:2 (peers at distances 1, 2, 4, 8 along the members,
       rotating each round: aggregator.synthesis.exponential_peers);
  (all) the same with every peer, for reference.
MNIST's 60k training images are split two-level (agent.tasks.partition): Dirichlet(0.5) by
class across 10 groups (one per aggregator), then Dirichlet(0.5) across a group's 3 agents;
the same 30 slices in every setup. Everything else is bench/convergence.py's code path: real
AggregatorDaemons on 127.0.0.1 with a static peer ring, 30 real AgentDaemons over gRPC, and
each aggregator's base model after every round evaluated on the 10k test split. The slow
aggregator's agents (bench/_paced.py) sleep twice their training time after training; the run
ends when the other nine have closed `rounds` rounds.

Reported per setup: rounds to 97% (mean and worst over the nine paced aggregators, each at its
own round k; the slow one on its own), measured every round on a fixed random 2,000 of the 10k
test images (--eval-images; the same images for every setup), final accuracy on all 10k, and per round the disagreement between aggregators'
semi-global models: mean pairwise L2 distance of the flattened weights, and the accuracy
spread (max - min). Target: (r2) <= 1.5x the rounds of (a).
Writes bench/convergence_fleet_results.json (--quick: a temporary directory unless --out-dir).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _common
from _common import print_table, quiet_logs
from convergence import Params, Setup, evaluate_fleet, rounds_to_target, run_fleet, summarize

TARGET_RATIO = 1.5
SLOWDOWN = 3.0
SETUPS: dict[str, Setup] = {
    "a": Setup(key="a", label="(a) 1 aggregator x 30 agents", aggregators=1, synthesis=False),
    "r1": Setup(key="r1", label="(r1) 10 x 3, random:1, one 3x slower", aggregators=10, synthesis=True,
                peers="random:1", slowdown=SLOWDOWN),
    "r2": Setup(key="r2", label="(r2) 10 x 3, random:2, one 3x slower", aggregators=10, synthesis=True,
                peers="random:2", slowdown=SLOWDOWN),
    "e1": Setup(key="e1", label="(e1) 10 x 3, exp:1, one 3x slower", aggregators=10, synthesis=True,
                peers="exp:1", slowdown=SLOWDOWN),
    "e2": Setup(key="e2", label="(e2) 10 x 3, exp:2, one 3x slower", aggregators=10, synthesis=True,
                peers="exp:2", slowdown=SLOWDOWN),
    "all": Setup(key="all", label="(all) 10 x 3, all peers, one 3x slower", aggregators=10, synthesis=True,
                 peers="all", slowdown=SLOWDOWN),
}
CHECKPOINTS = (5, 10, 15, 20, 25, 30)


def subset_accuracy(size: int, seed: int = 0) -> Any:
    """Accuracy on a fixed random `size`-image subset of the 10k test split (every setup is measured on
    the same images): 300 full evaluations per fleet would cost more CPU than the fleet's training."""
    import numpy as np

    from agent.tasks import MnistTask

    images, labels = MnistTask.test_set()
    chosen = np.random.default_rng(seed).choice(labels.shape[0], size=min(size, labels.shape[0]), replace=False)
    images, labels = images[chosen], labels[chosen]

    def metric(weights: Any) -> dict[str, float]:
        return {"accuracy": float((MnistTask.predict(weights, images) == labels).mean()), "loss": float("nan")}

    return metric


def final_accuracy(fleet: dict[str, Any], evaluations: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each aggregator's last model on the full 10k test split."""
    from agent.tasks import MnistTask
    from storage.codec import decode_tensors
    from storage.models import load_model
    from storage.open import open_store

    with open_store(fleet["store"]) as store:
        return {aid: MnistTask.evaluate_global(decode_tensors(load_model(store, points[-1]["model"])[1]))["accuracy"]
                for aid, points in evaluations.items()}


def disagreement(fleet: dict[str, Any], evaluations: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round k: mean pairwise L2 distance between the aggregators' base models after round k, and
    the spread of their test accuracies; over the paced aggregators, and over all that reached k."""
    import numpy as np

    from storage.codec import decode_tensors
    from storage.models import load_model
    from storage.open import open_store

    slow = set(fleet["slow"])
    rounds = max(len(points) for points in evaluations.values())
    series = []
    with open_store(fleet["store"]) as store:
        for k in range(1, rounds):
            present = {aid: points[k] for aid, points in evaluations.items() if len(points) > k}
            vectors = {}
            for aid, point in present.items():
                _, blob = load_model(store, point["model"])
                tensors = decode_tensors(blob)
                vectors[aid] = np.concatenate([tensors[n].reshape(-1).astype(np.float64) for n in sorted(tensors)])
            row: dict[str, Any] = {"round": k}
            for name, ids in (("paced", [a for a in present if a not in slow]), ("all", list(present))):
                pairs = list(itertools.combinations(sorted(ids), 2))
                accuracies = [present[a]["accuracy"] for a in ids]
                row[name] = {
                    "aggregators": len(ids),
                    "mean_pairwise_l2": (sum(float(np.linalg.norm(vectors[x] - vectors[y])) for x, y in pairs) / len(pairs))
                    if pairs else 0.0,
                    "accuracy_spread": (max(accuracies) - min(accuracies)) if accuracies else 0.0,
                }
            series.append(row)
    return series


def report(results: dict[str, Any], params: Params) -> dict[str, Any]:
    summaries = results["summaries"]
    rows = []
    for key, summary in summaries.items():
        r2t = summary["rounds_to_target"]
        fleet = results["fleets"][key]
        slow = fleet.get("slow", [])
        rows.append([
            summary["label"], _fmt(r2t["mean"]), _fmt(r2t["all"]),
            ", ".join(f"{aid}={_fmt(r2t[aid])} in {fleet['rounds_closed'][aid]}" for aid in slow) or "-",
            f"{summary['final']['mean']:.4f}", f"{summary['final']['min']:.4f}",
            f"{sum(fleet['final_10k'].values()) / len(fleet['final_10k']):.4f}", f"{fleet['wall_s']:.0f}",
        ])
    print("\nrounds to 97% (paced aggregators: mean curve / every one), slow aggregator, final accuracy, wall:")
    print_table(["setup", "mean", "all", "slow: rounds to 97% in rounds closed", "final mean", "final worst", "final mean (10k)", "wall s"], rows)

    checkpoints = [k for k in CHECKPOINTS if k < params.rounds] + [params.rounds]
    rows = []
    for key, series in results["disagreement"].items():
        by_round = {row["round"]: row for row in series}
        for scope in ("paced", "all"):
            rows.append([f"{key} L2 ({scope})", *[f"{by_round[k][scope]['mean_pairwise_l2']:.3f}" if k in by_round else "-"
                                                  for k in checkpoints]])
            rows.append([f"{key} acc spread ({scope})",
                         *[f"{by_round[k][scope]['accuracy_spread']:.4f}" if k in by_round else "-" for k in checkpoints]])
    if rows:
        print("\ndisagreement between aggregators' semi-global models after k rounds:")
        print_table(["series", *[f"k={k}" for k in checkpoints]], rows)

    verdict: dict[str, Any] = {}
    if "a" in summaries:
        a = summaries["a"]["rounds_to_target"]["mean"]
        for key in summaries:
            if key == "a":
                continue
            r2t = summaries[key]["rounds_to_target"]
            verdict[f"{key}_over_a_mean"] = None if r2t["mean"] is None or not a else r2t["mean"] / a
            verdict[f"{key}_over_a_all"] = None if r2t["all"] is None or not a else r2t["all"] / a
            ratio = verdict[f"{key}_over_a_mean"]
            verdict[f"{key}_target_met_mean"] = ratio is not None and ratio <= TARGET_RATIO
        print("\nratios (rounds to 97% vs (a); None = not reached):")
        for name, value in verdict.items():
            print(f"  {name:24s} {value if not isinstance(value, float) else round(value, 3)}")
    return verdict


def plot(results: dict[str, Any], path: Path) -> None:
    """Mean accuracy of the paced aggregators per round (left) and their mean pairwise L2 distance (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"a": "black", "r1": "tab:orange", "r2": "tab:red", "e1": "tab:cyan", "e2": "tab:blue", "all": "tab:green"}
    fig, (accuracy, spread) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, summary in results["summaries"].items():
        mean = summary["curves"]["mean"]
        accuracy.plot(range(len(mean)), mean, color=colors.get(key), linewidth=2, label=summary["label"])
        if key in results["disagreement"]:
            worst = summary["curves"]["min"]
            accuracy.plot(range(len(worst)), worst, color=colors.get(key), linewidth=0.9, linestyle="--")
            series = results["disagreement"][key]
            spread.plot([r["round"] for r in series], [r["paced"]["mean_pairwise_l2"] for r in series],
                        color=colors.get(key), linewidth=2, label=summary["label"])
    accuracy.axhline(0.97, color="gray", linewidth=0.8, linestyle=":")
    accuracy.set_ylim(0.85, 1.0)
    accuracy.set_xlabel("rounds")
    accuracy.set_ylabel(f"test accuracy ({results.get('eval_images', 10000)} MNIST test images)")
    accuracy.set_title("mean of the 9 paced aggregators (dashed: worst)", fontsize=9)
    accuracy.legend(loc="lower right", fontsize=8)
    spread.set_xlabel("rounds")
    spread.set_ylabel("mean pairwise L2 distance between semi-global models")
    spread.set_yscale("log")
    spread.legend(loc="upper right", fontsize=8)
    for axis in (accuracy, spread):
        axis.grid(alpha=0.3)
    fig.suptitle("10 aggregators x 3 agents, Dirichlet 0.5 by class across aggregators, one aggregator 3x slower",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 3 batches per agent")
    parser.add_argument("--rounds", type=int, help="rounds per setup (the paced aggregators'; default 30)")
    parser.add_argument("--setups", default="a,r1,r2", help=f"comma-separated subset of {','.join(SETUPS)}")
    parser.add_argument("--out-dir", type=Path, help="where the JSON goes (default bench/)")
    parser.add_argument("--eval-images", type=int, default=2000,
                        help="test images (a fixed random subset of the 10k) each round's models are evaluated on")
    parser.add_argument("--results-name", default="convergence_fleet_results.json", help="the JSON's file name")
    parser.add_argument("--from-json", type=Path, help="only print the report and draw the plot of a saved run")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        saved["verdict"] = report(saved, Params(**saved["params"]))
        plot(saved, args.from_json.with_suffix(".png"))
        args.from_json.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        return 0

    params = Params(rounds=30, groups=10, agents_per_group=3)
    if args.quick:
        params = Params(**{**asdict(params), "rounds": 3, "max_batches": 3})
    if args.rounds is not None:
        params = Params(**{**asdict(params), "rounds": args.rounds})
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    unknown = set(keys) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}")
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="convergence-fleet-quick-")) if args.quick else _common.REPO / "bench")
    out_dir.mkdir(parents=True, exist_ok=True)

    json_path = out_dir / args.results_name
    metric = subset_accuracy(args.eval_images)
    quiet_logs()
    workdir = Path(tempfile.mkdtemp(prefix="strata-convergence-fleet-"))
    saved_env = {k: os.environ.get(k) for k in ("HOME", "STRATA_STORE")}
    os.environ["HOME"] = str(workdir / "home")  # nothing may fall back to the user's ~/.strata
    os.environ["STRATA_STORE"] = str(workdir / "home" / "store")
    started = time.monotonic()
    results: dict[str, Any] = {"params": asdict(params), "slowdown": SLOWDOWN, "eval_images": args.eval_images, "fleets": {}, "evaluations": {},
                               "summaries": {}, "disagreement": {}}
    try:
        for key in keys:
            setup = SETUPS[key]
            print(f"{setup.label}: {params.rounds} rounds", flush=True)
            fleet = run_fleet(setup, params, workdir)
            evaluate_started = time.monotonic()
            evaluations = evaluate_fleet(setup, fleet, metric)
            results["evaluations"][key] = evaluations
            results["summaries"][key] = summarize(setup, evaluations, slow=fleet["slow"])
            if setup.aggregators > 1:
                results["disagreement"][key] = disagreement(fleet, evaluations)
            results["fleets"][key] = {
                "wall_s": round(fleet["wall_s"], 1), "agents": fleet["agents"], "slow": fleet["slow"],
                "rounds_closed": {aid: len(records) for aid, records in fleet["records"].items()},
                "evaluate_s": round(time.monotonic() - evaluate_started, 1),
                "final_10k": final_accuracy(fleet, evaluations),
            }
            print(f"  [{key}] trained in {fleet['wall_s']:.0f} s; rounds to 97%: "
                  f"{results['summaries'][key]['rounds_to_target']}", flush=True)
            for aid in fleet["slow"]:
                curve = [p["accuracy"] for p in evaluations[aid]]
                print(f"  [{key}] slow {aid}: {len(curve) - 1} rounds, to 97% in {rounds_to_target(curve)}", flush=True)
            # written after every setup: a long run cut short keeps what it measured
            _write(results, json_path, argv)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(workdir, ignore_errors=True)
    results["verdict"] = report(results, params)
    results["total_s"] = round(time.monotonic() - started, 1)
    _write(results, json_path, argv)
    plot(results, json_path.with_suffix(".png"))
    print(f"\ntotal {results['total_s']:.0f} s; wrote {json_path} and its .png")
    return 0


def _write(results: dict[str, Any], path: Path, argv: Sequence[str] | None) -> None:
    results["command"] = " ".join(["python", "bench/convergence_fleet.py", *(argv if argv is not None else sys.argv[1:])])
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
