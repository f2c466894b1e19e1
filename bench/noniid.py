"""Non-IID algorithms: FedAvg vs FedProx vs SCAFFOLD at Dirichlet alpha = 0.1 on MNIST (CNN).

Run alone: `python bench/noniid.py` (`--quick` for a smoke run, `--rounds N`, `--max-batches N`, `--lr-decay D`).

The fleet is bench/convergence.py's, with its real code path (in-process `AggregatorDaemon`s
on 127.0.0.1, 30 real `AgentDaemon`s training task "mnist" over gRPC), at a harsher skew:
MNIST split two-level (agent.tasks.partition) with Dirichlet(0.1) by class across the 3
groups (one per aggregator) and Dirichlet(0.1) across the 10 agents of each group. Each
algorithm runs in two fleet shapes:

- cluster only: 3 aggregators x 10 agents, synthesis off (each aggregator's next base is
  its own cluster model);
- semi-global: the same, synthesis on (peers = all).

Algorithms (the federation's round config, nothing else changes):
- fedavg: plain local SGD (momentum 0.9);
- fedprox: prox_mu = PROX_MU;
- scaffold: scaffold = true (each cluster keeps its own server variate c; the semi-global
  model names its own cluster's c).

Every aggregator's base after each round is evaluated on the 10k MNIST test split; the
table reports rounds to 97% (mean curve over aggregators / every aggregator) and the final
accuracy (mean, worst). Writes bench/noniid_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _common
import convergence
from _common import print_table, quiet_logs
from convergence import Params, Setup

ALPHA = 0.1
PROX_MU = "0.1"
# test images each base is scored on: the first 2,000 of MNIST's 10k test split (±1 point at 97%);
# scoring all 10k for 3 aggregators x every round x 6 runs cost more CPU than the training
EVAL_SAMPLES = 2000
ALGORITHMS: dict[str, dict[str, str]] = {
    "fedavg": {},
    "fedprox": {"prox_mu": PROX_MU},
    "scaffold": {"scaffold": "true"},
}
SHAPES: dict[str, bool] = {"cluster": False, "semi-global": True}


def run(params: Params, algorithms: Sequence[str], shapes: Sequence[str], workdir: Path, out: Path) -> dict[str, Any]:
    """Every (shape, algorithm) run, shape by shape; the results so far are written to `out` after each."""
    results: dict[str, Any] = {"params": asdict(params), "alpha": ALPHA, "prox_mu": float(PROX_MU), "runs": {}}
    for shape in shapes:
        for algorithm in algorithms:
            key = f"{algorithm}-{shape}"
            setup = Setup(key=key, label=f"{algorithm}, {shape}", aggregators=params.groups, synthesis=SHAPES[shape])
            print(f"{setup.label}: {params.rounds} rounds", flush=True)
            try:
                fleet = convergence.run_fleet(setup, params, workdir, round_config=ALGORITHMS[algorithm])
            except RuntimeError as exc:
                # a fleet whose updates diverge is refused (norm_bound) and its rounds wait forever
                print(f"  [{key}] stalled: {exc}", flush=True)
                results["runs"][key] = {"algorithm": algorithm, "shape": shape, "stalled": str(exc)}
                shutil.rmtree(workdir / key, ignore_errors=True)
                out.write_text(json.dumps(results, indent=1, sort_keys=True))
                continue
            evaluated = evaluate_fleet(fleet)
            summary = convergence.summarize(setup, evaluated)
            refusals: dict[str, int] = {}
            for records in fleet["records"].values():
                for record in records:
                    for reason, count in (record.refusals or {}).items():
                        refusals[reason] = refusals.get(reason, 0) + count
            results["runs"][key] = {
                "algorithm": algorithm,
                "shape": shape,
                "wall_s": round(fleet["wall_s"], 1),
                "refusals": refusals,
                "summary": summary,
                "evaluations": evaluated,
            }
            print(f"  [{key}] {fleet['wall_s']:.0f} s; rounds to 97%: {summary['rounds_to_target']['mean']}; "
                  f"final mean {summary['final']['mean']:.4f} min {summary['final']['min']:.4f}; refusals {refusals}", flush=True)
            shutil.rmtree(workdir / key, ignore_errors=True)
            out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def evaluate_fleet(fleet: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Test accuracy (on EVAL_SAMPLES test images) of every aggregator's base after each round."""
    import numpy as np

    from agent.tasks import MnistTask
    from storage.codec import decode_tensors
    from storage.models import load_model
    from storage.open import open_store

    test_x, test_y = MnistTask.test_set()
    images, labels = test_x[:EVAL_SAMPLES], np.asarray(test_y[:EVAL_SAMPLES])
    cache: dict[str, float] = {}

    def accuracy(store: Any, model_cid: str) -> float:
        manifest, weights = load_model(store, model_cid)
        if manifest.weights not in cache:
            predicted = MnistTask.predict(decode_tensors(weights), images)
            cache[manifest.weights] = float(np.mean(predicted == labels))
        return cache[manifest.weights]

    aggregators: dict[str, list[dict[str, Any]]] = {}
    with open_store(fleet["store"]) as store:
        initial = accuracy(store, fleet["base"])
        for aggregator_id, records in fleet["records"].items():
            points = [{"round": 0, "accuracy": initial}]
            for record in records:
                points.append({"round": record.round + 1, "accuracy": accuracy(store, record.next_base_cid),
                               "kind": record.extra.get("next_base_kind", "cluster"),
                               "participants": record.participants})
            aggregators[aggregator_id] = points
    return aggregators


def report(results: dict[str, Any]) -> None:
    rows = []
    for run in results["runs"].values():
        if "stalled" in run:
            rows.append([run["algorithm"], run["shape"], "stalled", "", "", "", ""])
            continue
        summary = run["summary"]
        r2t = summary["rounds_to_target"]
        rows.append([run["algorithm"], run["shape"], convergence._fmt(r2t["mean"]), convergence._fmt(r2t["all"]),
                     f"{summary['final']['mean']:.4f}", f"{summary['final']['min']:.4f}", f"{run['wall_s']:.0f}"])
    print(f"\nDirichlet alpha = {results['alpha']}, 3 aggregators x 10 agents, {results['params']['rounds']} rounds:")
    print_table(["algorithm", "fleet", "rounds to 97% (mean)", "(every agg.)", "final mean", "final worst", "wall s"],
                rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 2 agents per group, 2 batches")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run (default 10)")
    parser.add_argument("--max-batches", type=int, default=5, help="local batches per round (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    parser.add_argument("--lr", type=float, default=0.05, help="agents' learning rate (SGD, momentum 0.9; default 0.05)")
    parser.add_argument("--lr-decay", type=float, default=1.0, help="learning rate of round r: lr * lr_decay**r (default 1.0)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--shapes", default="semi-global,cluster")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/noniid_results.json)")
    args = parser.parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    shapes = [s for s in args.shapes.split(",") if s]
    if set(algorithms) - set(ALGORITHMS) or set(shapes) - set(SHAPES):
        parser.error(f"algorithms in {list(ALGORITHMS)}, shapes in {list(SHAPES)}")
    common = {"alpha": ALPHA, "group_alpha": ALPHA}
    if args.quick:
        params = Params(rounds=2, agents_per_group=2, max_batches=2, **common)
    else:
        # a stalled fleet (every update refused) is given up after 90 s without a round
        params = Params(rounds=args.rounds, max_batches=args.max_batches, batch_size=args.batch_size, lr=args.lr,
                        lr_decay=args.lr_decay,
                        round_timeout_s=90.0, **common)
    out = args.out or (Path(tempfile.mkdtemp(prefix="noniid-quick-")) / "noniid_results.json" if args.quick
                       else _common.REPO / "bench" / "noniid_results.json")

    quiet_logs()
    workdir = Path(tempfile.mkdtemp(prefix="strata-noniid-"))
    saved_env = {k: os.environ.get(k) for k in ("HOME", "STRATA_STORE")}
    # nothing may fall back to the user's ~/.strata
    os.environ["HOME"] = str(workdir / "home")
    os.environ["STRATA_STORE"] = str(workdir / "home" / "store")
    started = time.monotonic()
    try:
        results = run(params, algorithms, shapes, workdir, out)
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(workdir, ignore_errors=True)
    results["total_wall_s"] = round(time.monotonic() - started, 1)
    report(results)
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"\nwrote {out} ({results['total_wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
