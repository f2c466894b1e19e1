"""The demo's final summary (the --json object) and the text that ends a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.lineage import LineageGraph, walk
from storage.open import open_store
from storage.store import LayeredStore
from strata.demo.fleet import Fleet
from strata.demo.follow import RoundResult


@dataclass(frozen=True, kw_only=True)
class Observed:
    """What was read from the live fleet before it stopped: the coordinator's index and the relay's counters."""

    indexed: set[str] | None  # the final lineage's models the coordinator's index holds; None: no coordinator
    relay: dict[str, Any]  # the relay's counters, {"error": ...} if they could not be read, {} without a relay


def summarize(fleet: Fleet, results: list[RoundResult], final: RoundResult, observed: Observed) -> dict[str, Any]:
    graph = _final_lineage(fleet, final.model)
    nodes = graph.nodes
    relay_updates = [cid for cid, m in nodes.items() if m.kind == "relay"]
    behind_relay = {parent for cid in relay_updates for parent in nodes[cid].parents}
    fleet_models = [cid for cid in nodes if cid not in behind_relay]  # what the aggregators saw
    kinds: dict[str, int] = {}
    for cid in fleet_models:
        kinds[nodes[cid].kind] = kinds.get(nodes[cid].kind, 0) + 1
    relays_in_lineage = sorted(
        {
            nodes[parent].producer.id
            for cid, manifest in nodes.items()
            if manifest.kind == "cluster"
            for parent in manifest.parents
            if parent in nodes and nodes[parent].kind == "relay"
        }
    )
    return {
        "relay_update": relay_updates[0] if relay_updates else None,
        "relay": observed.relay | {"in_final_lineage": relays_in_lineage} if observed.relay else {},
        "rounds": [r.to_json() for r in results],
        "final_model": final.model,
        "final_accuracy": final.accuracy,
        "final_aggregator": final.aggregator,
        "lineage": {
            "kinds": kinds,
            "clusters_from": sorted({nodes[p].producer.id for p in nodes[final.model].parents if p in nodes}),
            "ok": graph.ok,
            "device_updates_behind_relay": sum(1 for cid in behind_relay if cid in nodes),
            "indexed": None if observed.indexed is None else len(observed.indexed.intersection(fleet_models)),
        },
    }


def _final_lineage(fleet: Fleet, model: str) -> LineageGraph:
    """The final model's whole lineage, down through the relay's private store to its device updates
    (what `strata verify <model> --store <store> --store <relay store>` reads)."""
    urls = [fleet.store_url] + ([str(fleet.relay.store)] if fleet.relay is not None else [])
    with LayeredStore([open_store(url) for url in urls]) as stores:
        return walk(stores, model)


def summary_text(fleet: Fleet, final: RoundResult, summary: dict[str, Any]) -> str:
    model, lineage, relay = summary["final_model"], summary["lineage"], summary["relay"]
    behind = lineage["device_updates_behind_relay"]
    indexed = lineage["indexed"]
    lines = [
        f"\nfinal model   {model}  ({final.aggregator}, round {final.round}, {final.kind})",
        f"accuracy      {summary['final_accuracy']:.3f} on the held-out test split no agent trained on",
        f"lineage       {', '.join(f'{n} {k}' for k, n in lineage['kinds'].items())}"
        + (f" (+{behind} device updates in the relay's store)" if behind else "")
        + f"; cluster models from {', '.join(lineage['clusters_from'])}; verified={lineage['ok']}"
        + (f"; the coordinator's index holds {indexed} of them" if indexed is not None else ""),
    ]
    if summary.get("centralized"):
        lines.insert(2, f"centralized   {summary['centralized']['accuracy'][-1]:.3f} for the same model trained on the union "
                        "of the agents' data for as many epochs")
    if relay:
        lines.append(
            f"relay         saved {relay.get('bytes_saved')} upstream bytes (devices downloaded "
            f"{relay.get('bytes_served')}, fetched upstream {relay.get('bytes_fetched')}); "
            f"relay updates in the final lineage: {', '.join(relay.get('in_final_lineage', [])) or 'none'}"
        )
    lines += [
        f"took          {summary['seconds']} s",
        "",
        f"see it all:   strata lineage {model} --depth 2",
        "              strata history",
    ]
    if summary.get("relay_update") and fleet.relay is not None:
        lines.append(
            f"              strata verify {model} --store {fleet.store_url} --store {fleet.relay.store}"
            "   # down to the relay's device updates"
        )
    if fleet.options.tls:
        lines.append(f"              strata verify {model} --ca {fleet.ca_dir / 'ca.pem'}   # every signer against the fleet CA")
    return "\n".join(lines) + "\n"
