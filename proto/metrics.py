"""Prometheus metrics endpoints for the daemons.

Each daemon owns a `CollectorRegistry` (several daemons can live in one test
process) and registers collectors that read its state at scrape time, so core
code needs no metric hooks. `serve_metrics` binds an HTTP endpoint; port 0 picks
a free port, and the handle reports the one bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["MetricSpec", "MetricsEndpoint", "StateCollector", "counter", "gauge", "serve_metrics"]

MetricKind = Literal["counter", "gauge", "info"]
_SUFFIX = {"counter": "_total", "gauge": "", "info": "_info"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric a daemon exports: the single definition its collector and the README's
    metrics catalogue (`python -m strata.readme`) both read, so the two cannot drift.

    `name` is the family name; the exposed sample adds `_total` (counter) or `_info` (info).
    A counter or gauge has at most one label; an info metric's labels are its fields.
    """

    name: str
    kind: MetricKind
    documentation: str
    labels: tuple[str, ...] = ()

    @property
    def sample_name(self) -> str:
        return self.name + _SUFFIX[self.kind]

    def __call__(self, value: float | None = None, *, by: Mapping[str, float] | None = None) -> Metric:
        """The family with one unlabelled `value`, or one sample per `by` key (the label's value)."""
        assert self.kind != "info", "use .info() for an info metric"
        make = counter if self.kind == "counter" else gauge
        if self.labels:
            assert len(self.labels) == 1 and by is not None, f"{self.name} takes one label, {self.labels}"
            return make(self.name, self.documentation, labels=dict(by), label=self.labels[0])
        return make(self.name, self.documentation, value)

    def info(self, fields: Mapping[str, str]) -> Metric:
        assert self.kind == "info" and set(fields) == set(self.labels), f"{self.name} takes {self.labels}"
        return InfoMetricFamily(self.name, self.documentation, value={k: fields[k] for k in self.labels})


def gauge(name: str, documentation: str, value: float | None = None, *, labels: dict[str, float] | None = None, label: str = "") -> GaugeMetricFamily:
    if labels is not None:
        family = GaugeMetricFamily(name, documentation, labels=[label])
        for key, item in labels.items():
            family.add_metric([key], item)
        return family
    return GaugeMetricFamily(name, documentation, value=value or 0.0)


def counter(name: str, documentation: str, value: float | None = None, *, labels: dict[str, float] | None = None, label: str = "") -> CounterMetricFamily:
    if labels is not None:
        family = CounterMetricFamily(name, documentation, labels=[label])
        for key, item in labels.items():
            family.add_metric([key], item)
        return family
    return CounterMetricFamily(name, documentation, value=value or 0.0)


class StateCollector(Collector):
    """A collector that asks a function for its metric families at every scrape."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        yield from self._read()


@dataclass
class MetricsEndpoint:
    port: int
    _server: Any
    _thread: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)


def serve_metrics(read: Callable[[], Iterable[Metric]], *, host: str, port: int) -> MetricsEndpoint:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(read))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(port=server.server_port, _server=server, _thread=thread)
