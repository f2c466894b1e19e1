"""Accuracy against the privacy budget ε on MNIST: central DP through the aggregator's own code.

    python bench/dp.py [--quick] [--devices 1000] [--aggregators 3] [--rounds 30] [--epsilons 1,3,8,inf] [--local]

A fleet of `--devices` devices (MNIST non-IID, Dirichlet 0.5) is split over `--aggregators`
clusters. Every round each device trains its softmax-regression model for one local epoch
(bench/_fl.py); each aggregator aggregates its devices with central DP exactly as a running
aggregator does (`aggregator.privacy.PrivacyGuard` around FedAvg: clipped deltas, adaptive clip
norm, noise on the cluster sum); the semi-global model is the mean of the cluster models
(post-processing: no further privacy cost). For each target ε the noise multiplier is the one whose
`--rounds`-fold composition is (ε, δ)-DP under the RDP accountant, and the ledger's own ε after the
last round is printed next to it. ε = inf is plain FedAvg (the baseline of the same run).

`--local` adds device-level DP at the same ε (each device clips to a fixed norm and adds its own
noise): the price of not trusting the aggregator.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import _fl
import numpy as np

from aggregator.privacy import PrivacyGuard
from aggregator.rules import make_strategy
from privacy.accounting import PrivacyEvent, epsilon_of
from privacy.config import CentralDpSettings, PrivacySettings
from privacy.mechanism import delta_norm, privatize_update


def run(
    data: _fl.Data,
    *,
    aggregators: int,
    rounds: int,
    epsilon: float,
    delta: float,
    mode: str,
    local_clip: float,
    seed: int,
) -> dict[str, object]:
    devices = len(data.shards)
    clusters = [list(range(a, devices, aggregators)) for a in range(aggregators)]
    sigma = 0.0 if math.isinf(epsilon) else _fl.noise_for_epsilon(epsilon, rounds, delta)
    guards = []
    if mode == "central" and sigma > 0:
        for a in range(aggregators):
            settings = PrivacySettings(
                delta=delta, central=CentralDpSettings(clip=0.1, noise_multiplier=sigma, adaptive=True, seed=seed * 100 + a + 1)
            )
            guards.append(PrivacyGuard(settings, federation="mnist"))
    device_rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 7)
    model = _fl.initial_weights()
    curve, norms = [], []
    for round_ in range(rounds):
        cluster_models = []
        for a, members in enumerate(clusters):
            strategy = guards[a].wrap(make_strategy("fedavg")) if guards else make_strategy("fedavg")
            aggregation = strategy.start(model)
            for device in members:
                idx = data.shards[device]
                update = _fl.train(model, data.train_x[idx], data.train_y[idx], rng=device_rng)
                if round_ == 0:
                    norms.append(delta_norm(model, update))
                if mode == "local" and sigma > 0:
                    update, _ = privatize_update(model, update, clip=local_clip, noise_multiplier=sigma, rng=noise_rng)
                aggregation.add(update, float(len(idx)))
            cluster_models.append(aggregation.result())
            if guards:
                guards[a].spend(round_, [])
        # the semi-global model: the clusters' mean (weights that are public: one per cluster)
        model = {name: np.mean([m[name] for m in cluster_models], axis=0).astype(np.float32) for name in model}
        curve.append(_fl.accuracy(model, data))
    # what the aggregator's ledger says it spent; for local DP, a device in every round composes `rounds` releases
    if guards:
        ledger_epsilon: float | None = guards[0].central_epsilon
    elif mode == "local" and sigma > 0:
        ledger_epsilon = epsilon_of([PrivacyEvent(sigma, count=rounds)], delta)
    else:
        ledger_epsilon = None
    return {
        "epsilon": epsilon,
        "mode": mode if sigma > 0 else "none",
        "noise_multiplier": sigma,
        "ledger_epsilon": ledger_epsilon,
        "final_clip": guards[0].clip if guards else None,
        "median_delta_norm_round0": float(np.median(norms)),
        "final_accuracy": curve[-1],
        "best_accuracy": max(curve),
        "curve": curve,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 devices, 5 rounds")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--aggregators", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--local", action="store_true", help="also run device-level DP at each finite ε")
    parser.add_argument("--local-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.rounds = 200, 5
    epsilons = [float(e) for e in args.epsilons.split(",")]
    started = time.perf_counter()
    data = _fl.load(args.devices, seed=args.seed)
    results = []
    for epsilon in epsilons:
        modes = ["central"] + (["local"] if args.local and math.isfinite(epsilon) else [])
        for mode in modes:
            result = run(
                data,
                aggregators=args.aggregators,
                rounds=args.rounds,
                epsilon=epsilon,
                delta=args.delta,
                mode=mode,
                local_clip=args.local_clip,
                seed=args.seed,
            )
            results.append(result)
            print(
                f"ε={epsilon:<5g} {result['mode']:<8} σ={result['noise_multiplier']:.3f} "
                f"ledger ε={result['ledger_epsilon'] if result['ledger_epsilon'] is None else round(result['ledger_epsilon'], 3)} "
                f"final acc={result['final_accuracy']:.4f} best={result['best_accuracy']:.4f}",
                flush=True,
            )
    baseline = next((r["final_accuracy"] for r in results if r["mode"] == "none"), None)
    print()
    print(f"MNIST, {args.devices} devices (Dirichlet 0.5) over {args.aggregators} aggregators, {args.rounds} rounds, δ={args.delta}")
    print("| ε | DP | noise multiplier σ | ε by the ledger | final accuracy | best | vs no DP (same run) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['final_accuracy'] / baseline:.3f}" if baseline else "-"
        ledger = "-" if r["ledger_epsilon"] is None else f"{r['ledger_epsilon']:.3f}"
        print(
            f"| {r['epsilon']:g} | {r['mode']} | {r['noise_multiplier']:.3f} | {ledger} | "
            f"{r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {ratio} |"
        )
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
