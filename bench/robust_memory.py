"""Robust rules over K stored updates: throughput and peak memory, against streaming FedAvg.

Run alone: `python bench/robust_memory.py` (`--quick` for a smoke run; `--updates K --params P`).

Setup writes K float32 updates of P parameters (the 8-tensor layout of bench/_common.py) into a
LocalStore in a temporary directory, one at a time. Then, for each strategy, a fresh subprocess
(so its peak RSS, VmHWM, is its own):
  - starts the rule's aggregation over the base with the store;
  - for each update, reads its blob and hands it to `add` with its CID, as the round does
    after intake (the read is not timed: at a real aggregator the bytes arrived over the network);
  - times `add` x K + `result()`. FedAvg folds as it goes; the robust rules keep only the CID
    and in `result` re-hash each blob, then read the updates back slice by slice.
Throughput: update bytes (K x 4P) per second of that time, GB/s (10**9 B/s), and per CPU-second
(all threads; steadier than wall time when the machine is shared). Peak RSS is shown
with its floor (after imports, the base and one update read) so the growth is visible.

Target (issue 11): memory O(K x slice + model), not O(K x model): peak RSS well under K x model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import model_layout, peak_rss_mb, print_table, run_worker

STRATEGIES: list[tuple[str, dict]] = [
    ("fedavg", {}),
    ("median", {}),
    ("trimmed_mean", {"beta": 0.1}),
    ("krum", {"f": 5}),
    ("multi_krum", {"f": 5}),
    ("geomed", {"iterations": 10}),
    ("clipped_fedavg", {"tau": 2.0}),
    ("bulyan", {"f": 5}),
]


def _base(params: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(1234)
    return {name: rng.standard_normal(size, dtype=np.float32) for name, size in model_layout(params).items()}


def _setup(root: str, updates: int, params: int) -> dict:
    import numpy as np

    from storage.codec import encode_tensors
    from storage.store import LocalStore

    store = LocalStore(root)
    base = _base(params)
    rng = np.random.default_rng(99)
    cids = []
    for _ in range(updates):
        update = {name: array + rng.standard_normal(array.size, dtype=np.float32) * 0.01 for name, array in base.items()}
        cids.append(store.put(encode_tensors(update)))
        del update
    return {"cids": cids}


def _worker(root: str, name: str, params_json: str, params: int, cids_json: str) -> dict:
    from aggregator.rules import make_strategy
    from storage.codec import decode_tensors
    from storage.store import LocalStore

    store = LocalStore(root)
    cids = json.loads(cids_json)
    base = _base(params)
    strategy = make_strategy(name, json.loads(params_json))
    warm = decode_tensors(store.get(cids[0]), writable=False)  # imports and first-read costs out of the floor
    del warm
    floor_mb = peak_rss_mb()
    aggregation = strategy.start(base, store=store)
    timed = cpu = 0.0
    for k, cid in enumerate(cids):
        tensors = decode_tensors(store.get(cid), writable=False)
        started, started_cpu = time.perf_counter(), time.process_time()
        aggregation.add(tensors, 100.0 + k, weights_cid=cid)
        timed += time.perf_counter() - started
        cpu += time.process_time() - started_cpu
        del tensors
    started, started_cpu = time.perf_counter(), time.process_time()
    result = aggregation.result()
    timed += time.perf_counter() - started
    cpu += time.process_time() - started_cpu
    assert sum(a.size for a in result.values()) == params
    return {
        "name": name,
        "seconds": timed,
        "gbps": len(cids) * params * 4 / timed / 1e9,
        # CPU seconds of all the process's threads: steadier than wall time on a shared machine
        "cpu_seconds": cpu,
        "gb_per_cpu_s": len(cids) * params * 4 / cpu / 1e9,
        "peak_rss_mb": peak_rss_mb(),
        "floor_rss_mb": floor_mb,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 updates x 1M, for a smoke run")
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--only", default="", help="comma-separated strategies (default: all)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--setup", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        root, k, p = args.setup
        print(json.dumps(_setup(root, int(k), int(p))))
        return 0
    if args.worker:
        root, name, params_json, p, cids_json = args.worker
        print(json.dumps(_worker(root, name, params_json, int(p), cids_json)))
        return 0

    k, p = (10, 1_000_000) if args.quick else (args.updates, args.params)
    chosen = [s for s in STRATEGIES if not args.only or s[0] in args.only.split(",") or s[0] == "fedavg"]
    script = Path(__file__).resolve()
    root = tempfile.mkdtemp(prefix="strata-robust-bench-")
    try:
        started = time.perf_counter()
        cids = _run_setup(script, root, k, p)
        print(f"setup: {k} updates x {p / 1e6:g}M params ({k * p * 4 / 1e9:.1f} GB) stored in {time.perf_counter() - started:.0f} s")
        results = {}
        for name, params in chosen:
            results[name] = run_worker(script, [root, name, json.dumps(params), str(p), json.dumps(cids)], timeout_s=3600)
            print(f"  {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)  # progress on a slow machine
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = results["fedavg"]
    model_mb = p * 4 / _common.MIB
    rows = []
    for name, params in chosen:
        r = results[name]
        growth = r["peak_rss_mb"] - r["floor_rss_mb"]
        rows.append(
            [
                name + (f" {params}" if params else ""),
                f"{r['seconds']:.1f}",
                f"{r['gbps']:.2f}",
                f"{r['gbps'] / baseline['gbps']:.3f}",
                f"{r['cpu_seconds']:.1f}",
                f"{r['gb_per_cpu_s']:.2f}",
                f"{r['gb_per_cpu_s'] / baseline['gb_per_cpu_s']:.3f}",
                f"{r['peak_rss_mb']:.0f} ({growth:+.0f})",
                f"{growth / model_mb:.2f}",
            ]
        )
    print(f"K = {k} updates x {p / 1e6:g}M float32 params; one model = {model_mb:.0f} MiB; all updates = {k * model_mb:.0f} MiB")
    print_table(
        ["strategy", "wall s", "GB/s", "vs fedavg", "CPU s", "GB/CPU-s", "vs fedavg", "peak RSS MiB (+over floor)", "growth / model"],
        rows,
    )
    worst = max(results[name]["peak_rss_mb"] - results[name]["floor_rss_mb"] for name, _ in chosen)
    verdict = "bounded" if worst < 0.25 * k * model_mb else "NOT bounded"
    print(f"largest growth {worst:.0f} MiB vs K x model {k * model_mb:.0f} MiB: memory {verdict}")
    return 0


def _run_setup(script: Path, root: str, k: int, p: int) -> list[str]:
    import subprocess

    completed = subprocess.run(
        [sys.executable, str(script), "--setup", root, str(k), str(p)],
        capture_output=True, text=True, timeout=3600, cwd=_common.REPO, check=False,
    )  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(f"setup failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])["cids"]


if __name__ == "__main__":
    sys.exit(main())
