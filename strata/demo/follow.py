"""Following the demo's rounds: each closed round, evaluated on the held-out test split, one table row."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proto.errors import Unavailable
from storage.codec import decode_tensors
from storage.models import load_model
from storage.open import open_store
from storage.store import ContentStore
from strata.demo.fleet import Fleet
from strata.demo.observe import closed_rounds
from strata.demo.reference import Reference

Evaluate = Callable[[dict], Mapping[str, float]]

_HEADER = (
    f"\n{'round':>5}  {'aggregator':<10} {'agents':>6}  {'cluster acc':>11}  {'semi-global acc':>15}  {'loss':>6}  "
    f"{'centralized':>11}  model"
)


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """One aggregator's closed round: its next base (`model`, usually semi-global) and its cluster model."""

    round: int
    aggregator: str
    participants: int
    accuracy: float
    loss: float
    model: str
    kind: str
    cluster_accuracy: float
    centralized_accuracy: float | None  # the centralized reference after as many epochs; None past its rounds

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "aggregator": self.aggregator,
            "participants": self.participants,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "model": self.model,
            "cluster_accuracy": self.cluster_accuracy,
            "centralized_accuracy": self.centralized_accuracy,
        }


class Follower:
    def __init__(
        self,
        fleet: Fleet,
        *,
        evaluate: Evaluate,
        reference: Callable[[], Reference] | None,
        say: Callable[[str], None],
    ) -> None:
        self.fleet = fleet
        self.evaluate = evaluate
        self.reference = reference
        self.say = say
        self.results: list[RoundResult] = []
        self._seen: dict[str, int] = {}  # aggregator -> closed rounds reported

    def follow(self) -> None:
        """Report every closed round until each aggregator has closed `rounds` of them."""
        options = self.fleet.options
        deadline = time.monotonic() + options.timeout_s
        with open_store(self.fleet.store_url) as store:
            while not self.done():
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"the fleet did not finish {options.rounds} rounds within {options.timeout_s:.0f}s; "
                        f"see logs in {self.fleet.supervisor.log_dir}",
                        reason="demo_timeout",
                    )
                self.fleet.check_alive()
                time.sleep(0.5)
                self.poll(store)

    def done(self) -> bool:
        return all(self._seen.get(m.id, 0) >= self.fleet.options.rounds for m in self.fleet.aggregators)

    def poll(self, store: ContentStore) -> None:
        for aggregator, state_dir in self.fleet.state_dirs.items():
            # an aggregator may close a round past the last one the demo asked for (the relay's
            # update alone meets min_updates); the run reports exactly `rounds` per aggregator
            closed = closed_rounds(state_dir)[: self.fleet.options.rounds]
            for row in closed[self._seen.get(aggregator, 0) :]:
                self._report(store, aggregator, row)
            self._seen[aggregator] = len(closed)

    def final(self) -> RoundResult:
        """The best next base of the last round (of the latest round reported, if the last is missing)."""
        last = [r for r in self.results if r.round == self.fleet.options.rounds - 1] or self.results
        return max(last, key=lambda r: (r.round, r.accuracy))

    def _metrics_of(self, store: ContentStore, cid: str) -> Mapping[str, float]:
        _, weights = load_model(store, cid)
        return self.evaluate(decode_tensors(weights))

    def _report(self, store: ContentStore, aggregator: str, row: Mapping[str, Any]) -> None:
        cluster_cid, next_base = row["cluster"], row["next_base"]
        cluster = self._metrics_of(store, cluster_cid)
        semi = self._metrics_of(store, next_base) if next_base != cluster_cid else cluster
        centralized = self.reference().accuracy if self.reference is not None else []
        round_number = row["round"]
        result = RoundResult(
            round=row["round"],
            aggregator=aggregator,
            participants=row["participants"] or 0,
            accuracy=semi["accuracy"],
            loss=semi["loss"],
            model=next_base,
            kind=row["next_base_kind"] or "cluster",
            cluster_accuracy=cluster["accuracy"],
            centralized_accuracy=centralized[round_number] if round_number < len(centralized) else None,
        )
        if not self.results:
            self.say(_HEADER)
        self.results.append(result)
        central = "" if result.centralized_accuracy is None else f"{result.centralized_accuracy:.3f}"
        self.say(
            f"{result.round:>5}  {aggregator:<10} {result.participants:>6}  {result.cluster_accuracy:>11.3f}  "
            f"{result.accuracy:>15.3f}  {result.loss:>6.3f}  {central:>11}  {result.model}"
        )
