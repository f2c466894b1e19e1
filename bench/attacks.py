"""Poisoning attacks against each aggregation rule: final accuracy and rounds to a target, on MNIST non-IID.

    python bench/attacks.py [--quick] [--strategies fedavg,median,...] [--attacks sign_flip,...]
                            [--shares 0,0.1,0.2,0.3] [--aggregators 3] [--devices-per 10] [--rounds 20]
                            [--strategy-params '{"trimmed_mean": {"beta": 0.2}}'] [--claim-ratio 10] [--json FILE]

`--aggregators` clusters of `--devices-per` devices (MNIST, Dirichlet 0.5) train a softmax-regression
model (bench/_fl.py). In each cluster a share of the devices is hostile and sends what
`agent.sim.attacks` makes of its honest update (the same transforms `strata simulate --attack`
uses; "a little is enough" here sees every honest update of its cluster, the strongest form).
Each aggregator screens updates with the intake's norm bound (‖Δ‖ ≤ `--norm-bound` × max(‖base‖, 1),
the `round.max_relative_norm` default), aggregates with the rule under test
(`aggregator.rules.make_strategy`: every registered rule by default, so rules added to the
registry join the table without a change here), and the semi-global model applies the same rule
to the cluster models, weighted by their claimed samples. `malicious_aggregator`: one aggregator
publishes its cluster model's delta flipped and ×10 (`poison_model`) instead of its honest one.
Sample counts are claims: before a cluster aggregates, every device's claim is credited with at
most `--claim-ratio` × the round's low median claim (`intake.claims.credit_claims`, what
`round.max_claim_ratio` does in the daemon; 0: off), and the merge credits cluster models at most
`SAMPLE_RATIO_LIMIT` (10) × their median, as synthesis does.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import _fl
import numpy as np

from agent.sim.attacks import (
    ATTACKS,
    alie_z,
    gaussian_update,
    inflate_samples,
    little_is_enough,
    poison_model,
    scale_update,
    sign_flip,
)
from aggregator.rules import make_strategy, strategy_names
from aggregator.synthesis import SAMPLE_RATIO_LIMIT
from intake.claims import credit_claims
from privacy.mechanism import delta_norm

MALICIOUS_AGGREGATOR = "malicious_aggregator"
# the attack's strength where it has one: scale ×10 and ×100 are two rows
VARIANTS = {"scale": [10.0, 100.0], "gaussian": [1.0], "inflate_samples": [1000.0]}


def _hostile(base: Mapping[str, np.ndarray], honest: dict, attack: str, strength: float, num_samples: int,
             cluster_honest: list[dict], z: float, rng: np.random.Generator) -> tuple[dict, int]:
    if attack == "sign_flip":
        return sign_flip(base, honest), num_samples
    if attack == "scale":
        return scale_update(base, honest, strength), num_samples
    if attack == "gaussian":
        return gaussian_update(base, honest, strength, rng), num_samples
    if attack == "label_flip":
        return honest, num_samples
    if attack == "little_is_enough":
        return little_is_enough(base, cluster_honest, z), num_samples
    if attack == "inflate_samples":
        return sign_flip(base, honest), inflate_samples(num_samples, strength)
    raise ValueError(attack)


def _credit(items: list[tuple[dict, float]], claim_ratio: float) -> list[tuple[dict, float]]:
    credited = credit_claims([int(w) for _, w in items], ratio=claim_ratio).credited
    return [(weights, float(n)) for (weights, _), n in zip(items, credited, strict=True)]


def _aggregate(strategy: str, params: Mapping[str, Any], base: Mapping[str, np.ndarray], items: list[tuple[dict, float]]) -> dict:
    aggregation = make_strategy(strategy, params).start(base)
    for weights, weight in items:
        aggregation.add(weights, weight)
    return aggregation.result()


def run(data: _fl.Data, *, strategy: str, params: Mapping[str, Any], attack: str, strength: float, share: float,
        aggregators: int, devices_per: int, rounds: int, target: float, norm_bound: float, claim_ratio: float,
        seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    attack_rng = np.random.default_rng(seed + 1)
    clusters = [list(range(a * devices_per, (a + 1) * devices_per)) for a in range(aggregators)]
    per_cluster = 0 if attack == MALICIOUS_AGGREGATOR else round(share * devices_per)
    hostile = {d for members in clusters for d in members[:per_cluster]}  # shards are random: the first m are
    z = alie_z(devices_per, per_cluster)
    model = _fl.initial_weights()
    curve, refused = [], 0
    for _ in range(rounds):
        cluster_models: list[tuple[dict, float]] = []
        for a, members in enumerate(clusters):
            honest: dict[int, dict] = {}
            for device in members:
                idx = data.shards[device]
                flip = attack == "label_flip" and device in hostile
                honest[device] = _fl.train(model, data.train_x[idx], data.train_y[idx], rng=rng, flip_labels=flip)
            bound = norm_bound * max(math.sqrt(sum(float(np.vdot(v, v)) for v in model.values())), 1.0)
            items = []
            for device in members:
                update, claimed = honest[device], len(data.shards[device])
                if device in hostile:
                    update, claimed = _hostile(model, update, attack, strength, claimed, list(honest.values()), z, attack_rng)
                if norm_bound > 0 and delta_norm(model, update) > bound:
                    refused += 1  # the intake's norm_bound refusal
                    continue
                items.append((update, float(claimed)))
            items = _credit(items, claim_ratio)
            cluster = _aggregate(strategy, params, model, items)
            claimed_total = sum(w for _, w in items)
            if attack == MALICIOUS_AGGREGATOR and a == 0:
                cluster = poison_model(model, cluster, factor=10.0)
            cluster_models.append((cluster, claimed_total))
        # the merge credits peers' claims as synthesis does: at most SAMPLE_RATIO_LIMIT x the median
        model = _aggregate(strategy, params, model, _credit(cluster_models, SAMPLE_RATIO_LIMIT if claim_ratio else 0))
        curve.append(_fl.accuracy(model, data))
    reached = next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)
    return {
        "strategy": strategy,
        "attack": attack,
        "strength": strength,
        "attackers": share if attack != MALICIOUS_AGGREGATOR else f"1 of {aggregators} aggregators",
        "final_accuracy": curve[-1],
        "rounds_to_target": reached,
        "refused_updates": refused,
        "curve": curve,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, sign_flip only, 20%% attackers")
    parser.add_argument("--strategies", default="", help="comma-separated rule names (default: every registered rule)")
    parser.add_argument("--strategy-params", default="{}", help="JSON: rule name -> its parameters")
    parser.add_argument("--attacks", default=",".join([*ATTACKS, MALICIOUS_AGGREGATOR]))
    parser.add_argument("--shares", default="0.1,0.2,0.3", help="attacker shares (0%% is always run once per rule)")
    parser.add_argument("--aggregators", type=int, default=3)
    parser.add_argument("--devices-per", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.88, help="accuracy whose first round is reported")
    parser.add_argument("--norm-bound", type=float, default=10.0, help="the intake's max_relative_norm (0 disables)")
    parser.add_argument("--claim-ratio", type=float, default=10.0,
                        help="each claim credited with at most this x the median claim (round.max_claim_ratio; 0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(",") if s] or strategy_names()
    params: dict[str, dict[str, Any]] = json.loads(args.strategy_params)
    attacks = [a for a in args.attacks.split(",") if a]
    shares = [float(s) for s in args.shares.split(",") if s]
    if args.quick:
        args.rounds, attacks, shares = 3, ["sign_flip"], [0.2]
    unknown = [a for a in attacks if a not in (*ATTACKS, MALICIOUS_AGGREGATOR)]
    if unknown:
        parser.error(f"unknown attacks {unknown}")
    started = time.perf_counter()
    data = _fl.load(args.aggregators * args.devices_per, seed=args.seed)
    common = dict(aggregators=args.aggregators, devices_per=args.devices_per, rounds=args.rounds, target=args.target,
                  norm_bound=args.norm_bound, claim_ratio=args.claim_ratio, seed=args.seed)
    results = []

    def record(result: dict[str, Any]) -> None:
        results.append(result)
        if args.json:  # written after every run, so a long run interrupted keeps what it measured
            with open(args.json, "w") as out:
                json.dump({"args": vars(args), "results": results}, out, indent=1)
        print(f"{result['strategy']:<14} {result['attack']:<22} x{result['strength']:<6g} attackers={result['attackers']!s:<24} "
              f"acc={result['final_accuracy']:.4f} rounds_to_{args.target}={result['rounds_to_target']} "
              f"refused={result['refused_updates']}", flush=True)

    for strategy in strategies:
        rule_params = params.get(strategy, {})
        record(run(data, strategy=strategy, params=rule_params, attack="none", strength=0.0, share=0.0, **common))
        for attack in attacks:
            for strength in VARIANTS.get(attack, [0.0]):
                for share in [1.0] if attack == MALICIOUS_AGGREGATOR else shares:
                    record(run(data, strategy=strategy, params=rule_params, attack=attack, strength=strength, share=share,
                               **common))
    print()
    print(f"MNIST, {args.aggregators} aggregators x {args.devices_per} devices (Dirichlet 0.5), {args.rounds} rounds, "
          f"softmax regression, norm bound {args.norm_bound}, claim ratio {args.claim_ratio}")
    print(f"| rule | attack | attackers | final accuracy | vs no attack (same rule) | rounds to {args.target} | refused updates |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    clean = {r["strategy"]: r["final_accuracy"] for r in results if r["attack"] == "none"}
    for r in results:
        name = r["attack"] + (f" ×{r['strength']:g}" if r["attack"] in VARIANTS else "")
        share = r["attackers"] if isinstance(r["attackers"], str) else f"{r['attackers']:.0%}"
        print(f"| {r['strategy']} | {name} | {share} | {r['final_accuracy']:.4f} | "
              f"{r['final_accuracy'] - clean[r['strategy']]:+.4f} | {r['rounds_to_target'] or 'never'} | {r['refused_updates']} |")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
