"""`strata fleet watch`: a live terminal view of the fleet, for operators without a browser.

One frame is what the coordinator knows (FleetStatus and the model index): the ring and
each member's share of it, each aggregator's lease, round and agent count, and the
latest cluster and semi-global models with the accuracy the agents reported for them.
`snapshot` reads a frame, `render` draws it with rich; the command redraws it every
`--interval` seconds until Ctrl-C, or prints one frame with `--once`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from coordinator.client import CoordinatorClient
from coordinator.index import ModelRecord
from coordinator.messages import FleetStatus
from coordinator.ring import Ring

__all__ = ["AggregatorRow", "Frame", "ring_shares", "render", "snapshot"]

# keys hashed onto the ring to measure each member's share of it: the share of agent ids it
# would own; 4096 keys put the estimate within about a point
SHARE_SAMPLES = 4096
RING_BAR_WIDTH = 60
_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


@dataclass(frozen=True)
class AggregatorRow:
    id: str
    address: str
    alive: bool
    lease_s: float | None  # seconds until the lease expires (negative: expired); None: never leased
    round: int
    agents: int
    share: float  # of the ring, 0 when not a member
    cluster: str = ""
    semi_global: str = ""
    cluster_accuracy: float | None = None
    semi_global_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Frame:
    coordinator: str
    taken_at: float
    ring_version: int
    aggregators: list[AggregatorRow] = field(default_factory=list)
    error: str = ""  # the coordinator did not answer: the last frame's data is gone, this says why

    def to_json(self) -> dict[str, Any]:
        return {
            "coordinator": self.coordinator,
            "taken_at": self.taken_at,
            "ring_version": self.ring_version,
            "aggregators": [row.to_json() for row in self.aggregators],
            "error": self.error,
        }


def ring_shares(ring: Ring, samples: int = SHARE_SAMPLES) -> dict[str, float]:
    """Each member's share of the ring: the fraction of `samples` agent ids it owns."""
    if not len(ring):
        return {}
    owners = ring.assignments(f"agent-{i}" for i in range(samples)).values()
    return {member.id: sum(owner == member.id for owner in owners) / samples for member in ring.members}


def _latest_by_producer(records: Sequence[ModelRecord]) -> dict[str, ModelRecord]:
    latest: dict[str, ModelRecord] = {}
    for record in records:
        if record.producer not in latest or record.round > latest[record.producer].round:
            latest[record.producer] = record
    return latest


def frame_from(
    coordinator: str, fleet: FleetStatus, clusters: Sequence[ModelRecord], semi_globals: Sequence[ModelRecord], now: float
) -> Frame:
    shares = ring_shares(fleet.ring)
    cluster_of, semi_of = _latest_by_producer(clusters), _latest_by_producer(semi_globals)
    rows = []
    for status in sorted(fleet.aggregators, key=lambda s: s.info.id):
        cluster, semi = cluster_of.get(status.info.id), semi_of.get(status.info.id)
        rows.append(
            AggregatorRow(
                id=status.info.id,
                address=status.info.address,
                alive=status.alive,
                lease_s=status.lease_expires_at - now if status.lease_expires_at else None,
                round=status.round,
                agents=status.agent_count,
                share=shares.get(status.info.id, 0.0),
                cluster=status.last_cluster_cid or (cluster.cid if cluster else ""),
                semi_global=status.last_semi_global_cid or (semi.cid if semi else ""),
                cluster_accuracy=cluster.metrics.get("accuracy") if cluster else None,
                semi_global_accuracy=semi.metrics.get("accuracy") if semi else None,
            )
        )
    return Frame(coordinator=coordinator, taken_at=now, ring_version=fleet.ring.version, aggregators=rows)


def snapshot(client: CoordinatorClient, coordinator: str, clock: Callable[[], float] = time.time) -> Frame:
    """One frame from the coordinator: FleetStatus and the latest cluster and semi-global models."""
    fleet = client.fleet_status()
    clusters = client.list_models(kind="cluster", latest_per_aggregator=True)
    semi_globals = client.list_models(kind="semi-global", latest_per_aggregator=True)
    return frame_from(coordinator, fleet, clusters, semi_globals, clock())


def _ring_bar(rows: Sequence[AggregatorRow]) -> Text:
    """The ring unrolled: one coloured arc per member, as wide as its share."""
    members = [row for row in rows if row.share > 0]
    bar = Text()
    for i, row in enumerate(members):
        width = max(1, round(row.share * RING_BAR_WIDTH))
        bar.append("█" * width, style=_COLOURS[i % len(_COLOURS)])
    if not members:
        bar.append("(no members)", style="dim")
    legend = Text()
    for i, row in enumerate(members):
        legend.append("  ■ ", style=_COLOURS[i % len(_COLOURS)])
        legend.append(f"{row.id} {row.share:.0%}")
    return Text.assemble("ring ", bar, "\n", legend)


def _short(cid: str) -> str:
    return f"{cid[:10]}…{cid[-4:]}" if len(cid) > 16 else cid or "-"


def _accuracy(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def render(frame: Frame) -> RenderableType:
    when = time.strftime("%H:%M:%S", time.gmtime(frame.taken_at))
    title = Text.assemble(
        ("Strata fleet", "bold"), f"  coordinator {frame.coordinator}  ring version {frame.ring_version}  {when} UTC"
    )
    if frame.error:
        return Group(title, Text(f"coordinator unreachable: {frame.error}", style="bold red"))
    table = Table(expand=False, header_style="bold")
    for column in ("aggregator", "address", "lease", "ring", "round", "agents", "cluster", "acc", "semi-global", "acc"):
        table.add_column(column, justify="right" if column in ("round", "agents", "ring", "acc", "lease") else "left")
    for row in frame.aggregators:
        lease = "-" if row.lease_s is None else f"{row.lease_s:+.1f}s"
        table.add_row(
            Text(row.id, style="green" if row.alive else "red"),
            row.address,
            Text(lease, style="" if row.alive else "red"),
            f"{row.share:.0%}",
            str(row.round),
            str(row.agents),
            _short(row.cluster),
            _accuracy(row.cluster_accuracy),
            _short(row.semi_global),
            _accuracy(row.semi_global_accuracy),
        )
    alive = sum(row.alive for row in frame.aggregators)
    footer = Text(
        f"{alive}/{len(frame.aggregators)} aggregators alive, {sum(r.agents for r in frame.aggregators)} agents; "
        "acc: accuracy the agents reported (sample-weighted)",
        style="dim",
    )
    return Group(title, _ring_bar(frame.aggregators), table, footer)
