"""Everything `strata demo` reads from its running fleet, and only through public interfaces.

- rounds: the reader `strata history` uses, on each aggregator's state directory;
- the final model's place in the coordinator's model index: its lineage, through the
  typed coordinator client `strata lineage --coordinator` uses;
- the relay's counters: its Prometheus metrics endpoint.

Models themselves are read from the content stores by CID, like any operator would.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from coordinator.client import CoordinatorClient
from proto.errors import NotFound, StrataError, Unavailable
from proto.wire import create_channel
from strata.cmd_history import read_history
from trust.security import ChannelFactory

_INDEX_WAIT_S = 5.0  # aggregators announce models to the coordinator in the background
_SCRAPE_TIMEOUT_S = 5.0


def closed_rounds(state_dir: Path) -> list[dict[str, Any]]:
    """An aggregator's closed rounds so far, oldest first (none while it has no journal yet)."""
    try:
        return [row for row in read_history(state_dir) if row["closed"]]
    except NotFound:
        return []


def indexed_lineage(coordinator: str, model_cid: str, *, channel_factory: ChannelFactory = create_channel) -> set[str]:
    """The models of `model_cid`'s lineage that the coordinator's index holds (what
    `strata lineage --coordinator` shows), once it holds the model and all its parents, or
    whatever it holds after a short wait: aggregators announce models in the background."""
    deadline = time.monotonic() + _INDEX_WAIT_S
    with CoordinatorClient(coordinator, channel_factory=channel_factory) as index:
        while True:
            try:
                lineage = index.lineage(model_cid)
                held = {record.cid for record in [lineage.model, *lineage.ancestors]}
                complete = all(parent in held for parent in lineage.model.parents)
            except NotFound:
                held, complete = set(), False
            if complete or time.monotonic() > deadline:
                return held
            time.sleep(0.1)


def relay_counters(metrics_address: str) -> dict[str, Any]:
    """The relay's cache and window counters, scraped from its metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=_SCRAPE_TIMEOUT_S) as reply:
            text = reply.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"the relay's metrics at {metrics_address} did not answer: {exc}", reason="relay_metrics") from None
    values: dict[str, float] = {}
    windows: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "strata_relay_windows":
                windows[sample.labels["status"]] = int(sample.value)
            else:
                values[sample.name] = sample.value
    try:
        return {
            "bytes_saved": int(values["strata_relay_bytes_saved"]),
            "bytes_served": int(values["strata_relay_bytes_served_total"]),
            "bytes_fetched": int(values["strata_relay_bytes_fetched_upstream_total"]),
            "windows": windows,
        }
    except KeyError as exc:
        raise StrataError(f"the relay's metrics lack {exc}", reason="relay_metrics") from None
