"""Streaming FedAvg: input throughput and peak memory, against a plain numpy loop.

Run alone: `python bench/fedavg_streaming.py` (`--quick` for a smoke run).

For K updates of a P-parameter float32 model, it measures
  (a) strata: `FedAvg().start(base)`, `.add(update, weight)` K times, `.result()`;
  (b) numpy:  `acc += w * x` per tensor over the same updates, then `acc / sum(w)`.
Throughput is update bytes folded (K x 4P) per second of fold time, best of N, in
GB/s (10**9 B/s). Each (implementation, K, P) runs in a fresh subprocess, so its
peak RSS (ru_maxrss) is its own. Updates are generated on the fly into one reused
buffer (generation is not timed), never held all at once: memory should track the
model, not K.

Targets: >= 5 GB/s on K=50 x P=10M; peak RSS <= 2 x model + 300 MB for every K.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common
from _common import model_layout, peak_rss_mb, print_table, run_worker

TARGET_GBPS = 5.0
TARGET_GBPS_CONFIG = (50, 10_000_000)
RSS_SLACK_MB = 300.0
def _worker(impl: str, updates: int, params: int, repeats: int, torch_threads: int) -> dict:
    import numpy as np

    if impl == "strata":
        import torch

        from aggregator.strategies import FedAvg

        if torch_threads:
            torch.set_num_threads(torch_threads)
        threads = torch.get_num_threads()
    else:
        threads = 1
    floor_mb = peak_rss_mb()

    rng = np.random.default_rng(1234)
    layout = model_layout(params)
    base = {name: rng.standard_normal(size, dtype=np.float32) for name, size in layout.items()}
    buffer = np.empty(params, dtype=np.float32)
    update: dict[str, np.ndarray] = {}
    offset = 0
    for name, size in layout.items():
        update[name] = buffer[offset : offset + size]
        offset += size
    weights = rng.integers(100, 1000, size=updates).astype(float)

    best = float("inf")
    for _ in range(repeats):
        fold_s = 0.0
        if impl == "strata":
            aggregation = FedAvg().start(base)
        else:
            sums = {name: np.zeros(size, dtype=np.float32) for name, size in layout.items()}
        for k in range(updates):
            # a fresh update each time (the base plus noise), so no fold reads cached data
            rng.standard_normal(params, dtype=np.float32, out=buffer)
            started = time.perf_counter()
            if impl == "strata":
                aggregation.add(update, weights[k])
            else:
                for name, x in update.items():
                    sums[name] += weights[k] * x
            fold_s += time.perf_counter() - started
        started = time.perf_counter()
        if impl == "strata":
            result = aggregation.result()
        else:
            total = weights.sum()
            result = {name: (acc / total).astype(np.float32, copy=False) for name, acc in sums.items()}
        fold_s += time.perf_counter() - started
        assert sum(a.size for a in result.values()) == params
        best = min(best, fold_s)
        del result
        if impl == "strata":
            del aggregation
        else:
            del sums
    return {
        "impl": impl,
        "updates": updates,
        "params": params,
        "fold_s": best,
        "gbps": updates * params * 4 / best / 1e9,
        "peak_rss_mb": peak_rss_mb(),
        "floor_rss_mb": floor_mb,
        "threads": threads,
    }


def check_agrees() -> None:
    """The kernel under test must compute FedAvg, or its speed means nothing."""
    import numpy as np

    from aggregator.strategies import FedAvg, weighted_average

    rng = np.random.default_rng(7)
    base = {"w": rng.standard_normal(1000, dtype=np.float32)}
    updates = [{"w": rng.standard_normal(1000, dtype=np.float32)} for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    aggregation = FedAvg().start(base)
    for update, weight in zip(updates, weights, strict=True):
        aggregation.add(update, weight)
    expected = weighted_average([u["w"] for u in updates], weights)
    if not np.allclose(aggregation.result()["w"], expected, rtol=1e-5, atol=1e-6):
        raise SystemExit("FedAvg result disagrees with weighted_average: not benchmarking a wrong kernel")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration, for a smoke run")
    parser.add_argument("--repeats", type=int, default=0, help="runs per configuration (best is kept)")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch intra-op threads for strata (0: torch's default)"
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, k, p, repeats, threads = args.worker
        print(json.dumps(_worker(impl, int(k), int(p), int(repeats), int(threads))))
        return 0

    check_agrees()
    if args.quick:
        configs, repeats = [(10, 1_000_000)], args.repeats or 2
    else:
        configs, repeats = [(k, p) for p in (1_000_000, 10_000_000) for k in (10, 50)], args.repeats or 5
    script = Path(__file__).resolve()
    rows, results = [], {}
    for k, p in configs:
        for impl in ("strata", "numpy"):
            results[impl, k, p] = run_worker(script, [impl, str(k), str(p), str(repeats), str(args.torch_threads)])
        ours, theirs = results["strata", k, p], results["numpy", k, p]
        model_mb = p * 4 / _common.MIB
        limit_mb = 2 * model_mb + RSS_SLACK_MB
        rows.append(
            [
                k,
                f"{p / 1e6:g}M",
                f"{ours['gbps']:.2f}",
                f"{theirs['gbps']:.2f}",
                f"{ours['gbps'] / theirs['gbps']:.2f}",
                f"{ours['peak_rss_mb']:.0f} ({ours['peak_rss_mb'] - ours['floor_rss_mb']:+.0f})",
                f"{theirs['peak_rss_mb']:.0f} ({theirs['peak_rss_mb'] - theirs['floor_rss_mb']:+.0f})",
                f"{limit_mb:.0f}",
                "ok" if ours["peak_rss_mb"] <= limit_mb else "OVER",
            ]
        )
    threads = results["strata", *configs[0]]["threads"]
    print(f"best of {repeats}; torch threads in the strata worker: {threads}; MiB = 2**20 bytes")
    print_table(
        [
            "K",
            "params",
            "strata GB/s",
            "numpy GB/s",
            "ratio",
            "strata peak MiB (+over imports)",
            "numpy peak MiB (+over imports)",
            "RSS limit MiB",
            "RSS",
        ],
        rows,
    )
    verdicts = []
    if ("strata", *TARGET_GBPS_CONFIG) in results:
        gbps = results[("strata", *TARGET_GBPS_CONFIG)]["gbps"]
        verdicts.append(
            f"throughput on {TARGET_GBPS_CONFIG[0]}x{TARGET_GBPS_CONFIG[1] // 1_000_000}M: {gbps:.2f} GB/s "
            f"{'meets' if gbps >= TARGET_GBPS else 'MISSES'} the target of {TARGET_GBPS} GB/s"
        )
    over = [row for row in rows if row[-1] != "ok"]
    verdicts.append(
        "peak RSS within 2 x model + 300 MB for every configuration"
        if not over
        else f"peak RSS OVER 2 x model + 300 MB in {len(over)} configuration(s)"
    )
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
