"""Sample counts are claims: robust rescaling of a round's claims against each other.

An absolute cap (`round.max_num_samples`) stops overflow-sized claims, but a claim of
1,000 × a device's real data passes it and owns every weighted rule (FedAvg, Multi-Krum's
average, the geometric median's weights, clipped FedAvg). So at aggregation time, once a
round's (or a relay window's) claims are all known, each claim is credited with at most
`ratio` × the round's median claim per contributor.

The ratio bounds what lying buys: a share s of devices claiming as much as they may takes at most
s·c / (s·c + 1 − s) of the weight. The price is that an honest device with more than c × the
median data counts as c × the median. The default c = 10 leaves honest quantity skew alone
(Dirichlet α = 0.1 over 10 digits clients: 14 to 287 samples, at most 7 × the low median) and
turns a claim of 10⁹ into 10 × the median, but 20 % of devices at 10 × still hold 71 % of the
weight; c = 3 (43 % at s = 0.2, below half) is for fleets whose honest data sizes are within
1 : 3 of each other (bench/README.md, "Sample claims rescaled").

The median is the *low* median (the ⌈K/2⌉-th smallest): with K = 2, one honest and one
inflated claim, the mean of the two middle values would follow the inflated one; the low
median cannot be moved by fewer than half of the claims. A relay's update stands for several
devices, so its claim is compared per contributor: it counts as `contributors` claims of
claim / contributors each, and its cap is `contributors` × ratio × the median.

Pure functions: no I/O, inputs never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class CreditedClaims:
    """Each claim's credited count (in the claims' order), and what the rescaling did."""

    credited: tuple[int, ...]
    ratio: float
    median: float  # per contributor; 0 when the rescaling is off or there is no claim
    capped: tuple[int, ...] = field(default=())  # the indices of the claims that were lowered

    def record(self, labels: Sequence[str], claims: Sequence[int]) -> dict[str, object]:
        """The manifest's record: the rule, and each lowered claim as claimed and as credited."""
        return {
            "ratio": self.ratio,
            "median_per_contributor": self.median,
            "claims": {labels[i]: {"claimed": int(claims[i]), "credited": self.credited[i]} for i in self.capped},
        }


def low_median(values: Sequence[float]) -> float:
    """The ⌈K/2⌉-th smallest value (fewer than half of the values cannot raise it); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


def credit_claims(claims: Sequence[int], *, ratio: float, contributors: Sequence[int] | None = None) -> CreditedClaims:
    """Each claim capped at contributorsᵢ × ratio × the low median of the per-contributor claims.

    `ratio` 0 turns the rescaling off. A cap is never below 1 sample per contributor."""
    if ratio < 0 or not math.isfinite(ratio):
        raise ValueError(f"claim ratio must be finite and >= 0, got {ratio!r}")
    counts = [max(1, int(n)) for n in (contributors if contributors is not None else [1] * len(claims))]
    if len(counts) != len(claims):
        raise ValueError("as many contributor counts as claims are needed")
    if ratio == 0 or not claims:
        return CreditedClaims(credited=tuple(int(c) for c in claims), ratio=ratio, median=0.0)
    median = low_median([claim / n for claim, n in zip(claims, counts, strict=True)])
    credited, capped = [], []
    for i, (claim, n) in enumerate(zip(claims, counts, strict=True)):
        cap = max(n, math.floor(n * ratio * median))
        credited.append(min(int(claim), cap))
        if credited[-1] < claim:
            capped.append(i)
    return CreditedClaims(credited=tuple(credited), ratio=ratio, median=median, capped=tuple(capped))
