"""CID throughput: storage.cid.cid_of against one raw hashlib.sha256 pass over the same bytes.

Run alone: `python bench/cid_throughput.py`. For each buffer size it prints the best
of 3 runs, in MB/s (10**6 bytes per second), and the ratio cid_of / sha256. The
target is a ratio of at least 0.9: a CID should cost little more than hashing.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.cid import cid_of  # noqa: E402

SIZES_MIB = (64, 256)
REPEATS = 3
TARGET_RATIO = 0.9


def best_seconds(run: Callable[[], object], repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    print(f"{'size':>8}  {'sha256 MB/s':>12}  {'cid_of MB/s':>12}  {'ratio':>6}")
    worst_ratio = float("inf")
    for mib in SIZES_MIB:
        data = os.urandom(mib << 20)
        sha_s = best_seconds(lambda data=data: hashlib.sha256(data).digest())
        cid_s = best_seconds(lambda data=data: cid_of(data))
        sha_mbps = len(data) / sha_s / 1e6
        cid_mbps = len(data) / cid_s / 1e6
        ratio = cid_mbps / sha_mbps
        worst_ratio = min(worst_ratio, ratio)
        print(f"{mib:>5} MiB  {sha_mbps:>12.0f}  {cid_mbps:>12.0f}  {ratio:>6.3f}")
        del data
    verdict = "meets" if worst_ratio >= TARGET_RATIO else "MISSES"
    print(f"worst ratio {worst_ratio:.3f} {verdict} the target of {TARGET_RATIO}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
