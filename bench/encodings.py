"""Bytes per update and rounds-to-accuracy for each update encoding (issue 17, section 2).

The digits task (the built-in `DigitsTask`: 8x8 digits, MLP 64-128-10) over a small non-IID
fleet (Dirichlet alpha 0.5), in one process: every device trains with the task's own trainer,
encodes its update with `storage.encodings.encode_update` (top-k keeps each device's residual
across rounds, as an agent's state dir does), the aggregator side decodes with `decode_update`
and folds with `aggregator.strategies` FedAvg. Only the transport (gRPC, the store) is left out:
tests/test_encodings_e2e.py runs the same codec through real aggregators.

Each encoding starts from the same seeded model with the same partition and device seeds, so
the float32 run is the same-run baseline the others are compared with. A top-k run without
error feedback shows what the residual buys.

    python bench/encodings.py [--quick] [--devices N] [--rounds R] [--encodings float32,int8,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common
import numpy as np

from agent.tasks.digits import DigitsTask
from aggregator.rules import make_strategy
from storage.encodings import decode_update, encode_update, parse_encoding

DEFAULT_ENCODINGS = "float32,fp16,bf16,int8,topk:0.1,topk:0.1-noef,topk:0.01"
TARGETS = (0.90, 0.95)
# two local epochs at a modest, constant rate: digits then takes tens of rounds, so an encoding that slows learning shows
ROUND_CONFIG = {"epochs": "2", "batch_size": "16", "lr": "0.05", "lr_decay": "1.0"}


def run(encoding_text: str, *, devices: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    feedback = not encoding_text.endswith("-noef")
    encoding = parse_encoding(encoding_text.removesuffix("-noef"))
    tasks = [
        DigitsTask(partition={"scheme": "dirichlet", "alpha": 0.5, "index": i, "count": devices}, seed=seed * 1000 + i)
        for i in range(devices)
    ]
    weights = DigitsTask.seeded_weights(seed)
    residuals: list[dict[str, np.ndarray]] = [{} for _ in tasks]
    strategy = make_strategy("fedavg")
    curve, sizes = [], []
    started = time.perf_counter()
    for round_number in range(rounds):
        aggregation = strategy.start(weights)
        for index, task in enumerate(tasks):
            trained, samples, _ = task.train(weights, {**ROUND_CONFIG, "round": round_number})
            blob, left = encode_update(trained, weights, encoding, residual=residuals[index] if feedback else None)
            residuals[index] = left
            sizes.append(len(blob))
            aggregation.add(decode_update(blob, weights, encoding, expected=sorted(trained)), float(samples))
        weights = aggregation.result()
        curve.append(DigitsTask.evaluate_global(weights)["accuracy"])
    return {
        "encoding": encoding_text,
        "seed": seed,
        "bytes_per_update": int(np.mean(sizes)),
        "accuracy": curve,
        "rounds_to": {f"{t:.2f}": next((r + 1 for r, a in enumerate(curve) if a >= t), None) for t in TARGETS},
        "seconds": round(time.perf_counter() - started, 1),
    }


def combine(runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """One encoding over seeds: median rounds to each target (a seed that never got there counts as
    rounds + 1, so the median stays honest), mean final accuracy, uplink bytes per device to 95%."""
    medians = {}
    for target in TARGETS:
        reached = [r["rounds_to"][f"{target:.2f}"] or rounds + 1 for r in runs]
        value = float(np.median(reached))
        medians[f"{target:.2f}"] = None if value > rounds else value
    size = runs[0]["bytes_per_update"]
    to_last = medians[f"{TARGETS[-1]:.2f}"]
    return {
        "encoding": runs[0]["encoding"],
        "bytes_per_update": size,
        "rounds_to": medians,
        "uplink_kib_to_last_target": None if to_last is None else round(to_last * size / 1024, 1),
        "final_accuracy": float(np.mean([r["accuracy"][-1] for r in runs])),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 devices, 2 rounds")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3, help="runs per encoding (seeds 0..N-1): medians are reported")
    parser.add_argument("--encodings", default=DEFAULT_ENCODINGS)
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    devices, rounds, seeds = (3, 2, 1) if args.quick else (args.devices, args.rounds, args.seeds)
    _common.quiet_logs()
    raw = {text: [run(text, devices=devices, rounds=rounds, seed=s) for s in range(seeds)] for text in args.encodings.split(",")}
    results = [combine(runs, rounds) for runs in raw.values()]
    baseline = next((r for r in results if r["encoding"] == "float32"), results[0])
    rows = []
    for result in results:
        rows.append([
            result["encoding"],
            result["bytes_per_update"],
            f"{result['bytes_per_update'] / baseline['bytes_per_update']:.3f}",
            *(result["rounds_to"][f"{t:.2f}"] or f">{rounds}" for t in TARGETS),
            result["uplink_kib_to_last_target"] or "-",
            f"{result['final_accuracy']:.4f}",
            f"{result['final_accuracy'] - baseline['final_accuracy']:+.4f}",
            result["seconds"],
        ])  # fmt: skip
    print(
        f"digits, {devices} devices (Dirichlet 0.5), {rounds} rounds, median of {seeds} seeds, "
        f"round config {ROUND_CONFIG}"
    )
    _common.print_table(
        ["encoding", "bytes/update", "vs float32", *(f"rounds to {t:.0%}" for t in TARGETS),
         f"KiB/device to {TARGETS[-1]:.0%}", "final acc", "vs float32", "s"],
        rows,
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"devices": devices, "rounds": rounds, "seeds": seeds, "summary": results, "runs": raw}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
