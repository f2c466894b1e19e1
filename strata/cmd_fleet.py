"""`strata fleet status`, `strata ring show`, `strata models list`: the operator's view through the coordinator."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from coordinator.client import CoordinatorClient
from coordinator.index import ModelRecord
from proto.errors import InvalidInput, StrataError
from proto.wire import DEFAULT_TIMEOUT_S
from strata import render
from strata.cli_common import (
    EXIT_OK,
    add_actions,
    add_coordinator_options,
    channel_factory_for,
    print_json,
)


def register(commands: argparse._SubParsersAction) -> None:
    fleet = add_actions(commands, "fleet", "the fleet as the coordinator sees it")
    status = fleet.add_parser("status", help="aggregators, leases, rounds, agent counts, last cluster and semi-global CIDs")
    add_coordinator_options(status, cmd_fleet_status)
    watch = fleet.add_parser("watch", help="a live terminal view: the ring, rounds, agents, latest models and accuracy")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default: 2)")
    watch.add_argument("--once", action="store_true", help="print one frame and exit")
    add_coordinator_options(watch, cmd_fleet_watch)

    ring = add_actions(commands, "ring", "the consistent-hash ring")
    show = ring.add_parser("show", help="members and version; with --agent, where that agent lives")
    show.add_argument("--agent", action="append", default=[], metavar="ID", help="an agent id to place (repeatable)")
    show.add_argument("--federation", default="", help="only the aggregators serving this federation: its ring (default: all)")
    add_coordinator_options(show, cmd_ring_show)

    models = add_actions(commands, "models", "the coordinator's model index")
    listing = models.add_parser("list", help="models by kind, aggregator, round or federation")
    listing.add_argument("--kind", default="", help="local | relay | cluster | semi-global | base")
    listing.add_argument("--aggregator", default="", help="producer id")
    listing.add_argument("--federation", default="")
    listing.add_argument("--round", type=int, default=0, help="only this round (0: any)")
    listing.add_argument("--latest", action="store_true", help="only the latest per aggregator")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    add_coordinator_options(listing, cmd_models_list)


def _ago(timestamp: float) -> str:
    if not timestamp:
        return "-"
    delta = timestamp - time.time()
    return f"{delta:+.1f}s"


def cmd_fleet_status(args: argparse.Namespace) -> int:
    with CoordinatorClient(args.coordinator, timeout_s=args.timeout, channel_factory=channel_factory_for(args)) as coordinator:
        fleet = coordinator.fleet_status()
    rows = [
        {
            "aggregator": s.info.id,
            "address": s.info.address,
            "alive": s.alive,
            "lease": _ago(s.lease_expires_at),
            "round": s.round,
            "agents": s.agent_count,
            "last_cluster": s.last_cluster_cid or "-",
            "last_semi_global": s.last_semi_global_cid or "-",
        }
        for s in fleet.aggregators
    ]
    # an aggregator serving several federations reports each one's round and models
    per_federation = [
        {
            "aggregator": s.info.id,
            "federation": f.federation,
            "round": f.round,
            "agents": f.agent_count,
            "last_cluster": f.last_cluster_cid or "-",
            "last_semi_global": f.last_semi_global_cid or "-",
        }
        for s in fleet.aggregators
        for f in s.federations
    ]
    if args.json:
        print_json({"ring_version": fleet.ring.version, "aggregators": rows, "federations": per_federation})
    else:
        print(f"ring version {fleet.ring.version}, {len(fleet.ring)} member(s)")
        print(render.table(rows, ["aggregator", "address", "alive", "lease", "round", "agents", "last_cluster", "last_semi_global"]))
        if per_federation:
            print("\nper federation (aggregators serving several):")
            print(render.table(per_federation, ["aggregator", "federation", "round", "agents", "last_cluster", "last_semi_global"]))
    return EXIT_OK


def cmd_fleet_watch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from strata.watch import Frame, render, snapshot

    if not args.interval > 0:
        raise InvalidInput("--interval must be > 0", reason="bad_argument")
    console = Console()
    with CoordinatorClient(args.coordinator, timeout_s=args.timeout, channel_factory=channel_factory_for(args)) as coordinator:
        if args.once:  # one frame; an unreachable coordinator is an error, as for `fleet status`
            frame = snapshot(coordinator, args.coordinator)
            if args.json:
                print_json(frame.to_json())
            else:
                console.print(render(frame))
            return EXIT_OK

        def next_frame() -> Frame:
            # live, an outage is something to watch, not a reason to exit: say so and keep polling
            try:
                return snapshot(coordinator, args.coordinator)
            except StrataError as exc:
                return Frame(coordinator=args.coordinator, taken_at=time.time(), ring_version=0, error=str(exc))

        try:
            with Live(render(next_frame()), console=console, auto_refresh=False, screen=False) as live:
                while True:
                    time.sleep(args.interval)
                    live.update(render(next_frame()), refresh=True)
        except KeyboardInterrupt:  # Ctrl-C is how a watch ends
            return EXIT_OK


def cmd_ring_show(args: argparse.Namespace) -> int:
    with CoordinatorClient(args.coordinator, timeout_s=args.timeout, channel_factory=channel_factory_for(args)) as coordinator:
        ring = coordinator.ring(args.federation)
    placements = {agent: ring.owner(agent).id for agent in args.agent} if len(ring) else {}
    if args.json:
        print_json(
            {
                "version": ring.version,
                "members": [{"id": m.id, "address": m.address, "weight": m.weight} for m in ring.members],
                "agents": placements,
            }
        )
    else:
        print(f"ring version {ring.version}")
        print(render.table([{"id": m.id, "address": m.address, "weight": m.weight} for m in ring.members], ["id", "address", "weight"]))
        for agent, home in placements.items():
            print(f"agent {agent} lives on {home}")
    return EXIT_OK


def _record_json(record: ModelRecord) -> dict[str, Any]:
    return {
        "model": record.cid,
        "kind": record.kind,
        "federation": record.federation,
        "round": record.round,
        "producer": record.producer,
        "num_samples": record.num_samples,
        "parents": len(record.parents),
        "metrics": dict(record.metrics),
        "weights": record.weights,
    }


def cmd_models_list(args: argparse.Namespace) -> int:
    if args.round < 0 or args.limit <= 0:
        raise InvalidInput("--round must be >= 0 and --limit > 0", reason="bad_argument")
    with CoordinatorClient(args.coordinator, timeout_s=args.timeout, channel_factory=channel_factory_for(args)) as coordinator:
        records = coordinator.list_models(
            kind=args.kind,
            aggregator=args.aggregator,
            federation=args.federation,
            round=args.round,
            latest_per_aggregator=args.latest,
            limit=args.limit,
        )
    rows = [_record_json(r) for r in records]
    if args.json:
        print_json({"models": rows})
    else:
        print(render.table(rows, ["model", "kind", "round", "producer", "num_samples", "parents"]))
    return EXIT_OK


def lineage_from_index(
    address: str,
    model_cid: str,
    depth: int | None,
    *,
    follow_base: bool = False,
    channel_factory: Callable[[str], Any] | None = None,
) -> render.LineageView:
    """A lineage view built from the coordinator's index rather than the store."""
    dial = {"channel_factory": channel_factory} if channel_factory is not None else {}
    with CoordinatorClient(address, timeout_s=DEFAULT_TIMEOUT_S, **dial) as coordinator:
        lineage = coordinator.lineage(model_cid, depth or 0, with_manifests=False, follow_base=follow_base)
    nodes = {}
    for record in [lineage.model, *lineage.ancestors]:
        nodes[record.cid] = render.LineageNode(
            cid=record.cid,
            kind=record.kind,
            producer=record.producer,
            round=record.round,
            num_samples=record.num_samples,
            metrics=dict(record.metrics),
            parents=tuple(record.parents),
            base=record.base,
        )
    deepest = {cid for cid, node in nodes.items() if any(p not in nodes for p in node.links)}
    truncated = [cid for cid in deepest if depth is not None or lineage.truncated]
    problems = [
        {"cid": cid, "where": "index", "reason": "missing", "message": "named as a parent but not in the index"}
        for cid in lineage.missing
    ]
    cut_by = "the coordinator's limit (walk on from a deeper model, or add --depth)" if lineage.truncated else "--depth"
    return render.LineageView(
        root=model_cid, nodes=nodes, problems=problems, truncated=truncated, source="coordinator", cut_by=cut_by
    )
