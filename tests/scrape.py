"""Read a daemon's Prometheus endpoint as Prometheus would: over HTTP, through
prometheus_client's own text-format parser.

    metrics = scrape(port)
    metrics.value("strata_aggregator_updates_accepted_total")
    metrics.value("strata_aggregator_updates_refused_total", reason="not_finite")
    metrics.labelled("strata_aggregator_updates_refused_total", "reason")  # {reason: value}
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Metrics:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]  # family name -> counter | gauge | ...

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            known = sorted({n for n, _ in self.samples})
            raise KeyError(f"no sample {name}{labels or ''}; the endpoint has {known}")
        return self.samples[key]

    def labelled(self, name: str, label: str) -> dict[str, float]:
        """Every sample of `name`, keyed by the value of its one label."""
        return {dict(labels)[label]: v for (n, labels), v in self.samples.items() if n == name and labels}


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> Metrics:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Metrics(samples, types)


def wait_for_metric(
    port: int, check: Callable[[Metrics], bool], what: str, timeout: float = 30.0
) -> Metrics:
    """Scrape until `check` holds; the bound only turns a hang into a failure."""
    give_up = time.monotonic() + timeout
    while True:
        metrics = scrape(port)
        if check(metrics):
            return metrics
        if time.monotonic() > give_up:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last scrape: {metrics.samples}")
        time.sleep(0.1)
