"""What the dashboard shows, read through the fleet's public clients and turned into JSON.

Everything comes from what the coordinator's index and the aggregators' journals
already know: the ring, leases and progress (FleetStatus), the agents and their
telemetry (ListAgents), the models and their lineage (ListModels, GetLineage).
Refusals by reason live only in each aggregator's journal, read (read-only, as
`strata history` does) when the dashboard is given the aggregators' state
directories. Weights come from a content store, as `strata model export` reads
them. Every method is blocking; the web layer runs them in a thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.journal import Journal
from coordinator.client import CoordinatorClient
from coordinator.index import AgentEntry, ModelRecord
from proto.errors import IntegrityError, InvalidInput, NotFound, StrataError
from storage.manifest import Manifest
from storage.models import load_model
from storage.store import ContentStore
from trust.errors import PermissionDenied
from trust.reads import DEVICE_UPDATE, is_device_update
from trust.signers import SignerError, Signers

__all__ = ["FleetReader", "ReaderSettings", "tensor_summary"]

# how many models one listing may return, and how many per kind the rounds view reads
MAX_LISTING = 500
ROUNDS_WINDOW = 1000
JOURNAL_FILE = "journal.sqlite"  # in an aggregator's state directory, as `strata history` reads it
# every manifest kind the index holds, the hub's (fork, proposal, merge) included
MODEL_KINDS = ("base", "cluster", "semi-global", "relay", "local", "fork", "proposal", "merge")


@dataclass(frozen=True, kw_only=True)
class ReaderSettings:
    coordinator: str
    timeout_s: float = 5.0
    channel_factory: Callable[[str], Any] | None = None
    state_dirs: dict[str, Path] = field(default_factory=dict)  # aggregator id -> state directory (journal)
    store: Callable[[], ContentStore] | None = None  # opens the store weights are read from
    may_read_device_updates: bool = False  # the dashboard's own role may read device updates (audit)
    signers: Signers | None = None  # the fleet CA (from --bundle): who signed each model, and whether it counts


def _record_json(record: ModelRecord) -> dict[str, Any]:
    return {
        "cid": record.cid,
        "kind": record.kind,
        "federation": record.federation,
        "round": record.round,
        "producer": record.producer,
        "num_samples": record.num_samples,
        "parents": list(record.parents),
        "base": record.base,
        "metrics": dict(record.metrics),
        "created_at": record.created_at,
        "weights": record.weights,
    }


def _agent_json(entry: AgentEntry) -> dict[str, Any]:
    return {
        "id": entry.agent_id,
        "name": entry.display_name,
        "home": entry.home,
        "reported_by": entry.reported_by,
        "last_seen": entry.last_seen,
        "capability": entry.capability,
        "telemetry": dict(entry.telemetry),
    }


def tensor_summary(manifest: Manifest) -> list[dict[str, Any]]:
    """Name, dtype, shape and element count of every tensor, as the (hash-checked) manifest lists them."""
    rows = []
    for name, info in sorted(manifest.to_json()["tensors"].items()):
        shape = [int(n) for n in info.get("shape", [])]
        count = 1
        for n in shape:
            count *= n
        rows.append({"name": name, "dtype": info.get("dtype", ""), "shape": shape, "elements": count})
    return rows


def _validate_cid(cid: str) -> str:
    # CIDs are base32/base58 text; anything else never reaches the fleet
    if not cid or len(cid) > 128 or not cid.isalnum():
        raise InvalidInput(f"not a CID: {cid[:80]!r}", reason="bad_cid")
    return cid


class FleetReader:
    """One coordinator connection, shared by every request (its channel is thread-safe)."""

    def __init__(self, settings: ReaderSettings) -> None:
        self.settings = settings
        dial = {"channel_factory": settings.channel_factory} if settings.channel_factory is not None else {}
        self._coordinator = CoordinatorClient(settings.coordinator, timeout_s=settings.timeout_s, **dial)

    def close(self) -> None:
        self._coordinator.close()

    # ------------------------------------------------------------ the hub

    def hub(self) -> dict[str, Any]:
        """Federations with their releases, forks and proposals: what `strata hub --json` prints."""
        from strata.hub_view import hub_view

        return hub_view(self._coordinator)

    # ------------------------------------------------------------ fleet

    def ring(self) -> dict[str, Any]:
        """The ring and every aggregator's lease, round, agents and latest models."""
        fleet = self._coordinator.fleet_status()
        now = time.time()
        members = {m.id: m for m in fleet.ring.members}
        statuses = {s.info.id: s for s in fleet.aggregators}
        aggregators = []
        for aggregator_id in sorted(set(members) | set(statuses)):
            status = statuses.get(aggregator_id)
            member = members.get(aggregator_id)
            aggregators.append(
                {
                    "id": aggregator_id,
                    "address": member.address if member else status.info.address if status else "",
                    "weight": member.weight if member else 0,
                    "in_ring": member is not None,
                    "alive": bool(status and status.alive),
                    "lease_s": round(status.lease_expires_at - now, 1) if status and status.lease_expires_at else None,
                    "round": status.round if status else 0,
                    "agents": status.agent_count if status else 0,
                    "last_cluster": status.last_cluster_cid if status else "",
                    "last_semi_global": status.last_semi_global_cid if status else "",
                    "last_seen": status.last_seen if status else 0.0,
                }
            )
        arcs = self._arcs(fleet.ring) if len(fleet.ring) else []
        return {"version": fleet.ring.version, "aggregators": aggregators, "arcs": arcs, "relays": self.relays()}

    @staticmethod
    def _arcs(ring: Any) -> list[dict[str, Any]]:
        """Each member's share of the ring, by sampling where the ring places a spread of keys:
        the ring's own placement, so the arcs drawn are the ones agents land on."""
        samples = 360
        owners = [ring.owner(f"dashboard-arc-{i}").id for i in range(samples)]
        shares: dict[str, int] = {}
        for owner in owners:
            shares[owner] = shares.get(owner, 0) + 1
        return [{"id": owner, "share": count / samples} for owner, count in sorted(shares.items())]

    def relays(self) -> list[dict[str, Any]]:
        """Relays seen in the index (producers of relay updates) and the devices behind their latest update."""
        latest = self._coordinator.list_models(kind="relay", latest_per_aggregator=True, limit=MAX_LISTING)
        devices = {r.cid: r.producer for r in self._coordinator.list_models(kind="local", limit=MAX_LISTING)}
        return [
            {
                "id": record.producer,
                "round": record.round,
                "last_update": record.cid,
                # device updates stay in the relay's private store: the index knows their count, and
                # their producers only for those it was told about
                "updates": len(record.parents),
                "devices": sorted({devices[p] for p in record.parents if p in devices}),
            }
            for record in latest
        ]

    def agents(self) -> list[dict[str, Any]]:
        return sorted((_agent_json(a) for a in self._coordinator.list_agents()), key=lambda a: (a["home"], a["id"]))

    def version(self) -> dict[str, Any]:
        """What changes when the fleet moves on: the SSE loop pushes a snapshot when it does."""
        fleet = self._coordinator.fleet_status()
        # heartbeats and announcements travel separately: a round's models can reach the index
        # after the heartbeat that named them, so the index's newest models count too
        indexed = sorted(
            r.cid
            for kind in ("cluster", "semi-global")
            for r in self._coordinator.list_models(kind=kind, latest_per_aggregator=True, limit=MAX_LISTING)
        )
        return {
            "indexed": indexed,
            "ring": fleet.ring.version,
            "aggregators": sorted(
                (s.info.id, s.alive, s.round, s.agent_count, s.last_cluster_cid, s.last_semi_global_cid)
                for s in fleet.aggregators
            ),
        }

    # ------------------------------------------------------------ learning

    def rounds(self) -> dict[str, Any]:
        """Per aggregator and round: the cluster's and the semi-global's metrics (their training
        metrics, sample-weighted) and, once a later round used it as its base, the model as the
        agents evaluated it on their held-out data; the round's duration; and, from its journal,
        refusals by reason."""
        clusters = self._coordinator.list_models(kind="cluster", limit=ROUNDS_WINDOW)
        semi_globals = self._coordinator.list_models(kind="semi-global", limit=ROUNDS_WINDOW)
        rows: dict[tuple[str, int], dict[str, Any]] = {}

        def row(producer: str, round_: int) -> dict[str, Any]:
            return rows.setdefault(
                (producer, round_),
                {"aggregator": producer, "round": round_, "cluster": None, "semi_global": None, "base_evaluated": None,
                 "duration_s": None, "aggregation_s": None, "participants": None, "refusals": {}},
            )

        # what the agents measured on their held-out data, keyed by the model they measured: each
        # cluster manifest carries the evaluation of its round's base (the previous semi-global)
        evaluated: dict[str, dict[str, float]] = {}
        for record in clusters:
            entry = row(record.producer, record.round)
            entry["cluster"] = {"cid": record.cid, "metrics": dict(record.metrics), "num_samples": record.num_samples,
                                "created_at": record.created_at, "evaluated": None}
            entry["participants"] = len(record.parents)
            manifest = _manifest_json(record)
            base_metrics = (manifest.get("extra") or {}).get("base_metrics")
            if isinstance(base_metrics, dict):
                measured = {k: v for k, v in base_metrics.items() if k != "num_samples" and isinstance(v, int | float)}
                entry["base_evaluated"] = measured
                if isinstance(manifest.get("base"), str) and measured:
                    evaluated.setdefault(manifest["base"], measured)
        for record in semi_globals:
            row(record.producer, record.round)["semi_global"] = {
                "cid": record.cid, "metrics": dict(record.metrics), "created_at": record.created_at, "evaluated": None
            }
        for entry in rows.values():
            for key in ("cluster", "semi_global"):
                if entry[key] is not None:
                    entry[key]["evaluated"] = evaluated.get(entry[key]["cid"])
        # a round lasts from the previous round's cluster to this one's
        by_aggregator: dict[str, list[dict[str, Any]]] = {}
        for (producer, _), entry in sorted(rows.items()):
            by_aggregator.setdefault(producer, []).append(entry)
        for entries in by_aggregator.values():
            previous = None
            for entry in entries:
                created = entry["cluster"]["created_at"] if entry["cluster"] else None
                if previous is not None and created is not None:
                    entry["duration_s"] = round(created - previous, 3)
                previous = created if created is not None else previous
        refusals = self._journal_refusals(by_aggregator)
        return {"aggregators": by_aggregator, "refusals": refusals, "journals": sorted(self.settings.state_dirs)}

    def _journal_refusals(self, by_aggregator: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
        """Refusals by reason over each journal's life (the open round's included), and per round
        merged into each round's row with its aggregation time. Read-only: the aggregator may be
        writing (WAL)."""
        totals: dict[str, dict[str, int]] = {}
        for aggregator, state_dir in sorted(self.settings.state_dirs.items()):
            path = state_dir / JOURNAL_FILE
            if not path.is_file():
                continue
            with Journal(path, readonly=True) as journal:
                closed = {r.round: r for r in journal.history() if r.closed_at is not None}
                for entry in by_aggregator.get(aggregator, []):
                    record = closed.get(entry["round"])
                    entry["refusals"] = dict(record.refusals) if record else journal.refusal_counts(entry["round"])
                    entry["aggregation_s"] = record.aggregation_s if record else None
                totals[aggregator] = journal.refusal_counts()
        return totals

    # ------------------------------------------------------------ models

    def models(self, *, query: str = "", kind: str = "", aggregator: str = "", round_: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Indexed models, newest first; `query` keeps those whose CID contains it (among the newest
        MAX_LISTING), or is the whole CID of any indexed model."""
        if kind and kind not in MODEL_KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(MODEL_KINDS)}", reason="bad_kind")
        if round_ < 0 or not 0 < limit <= MAX_LISTING:
            raise InvalidInput(f"round must be >= 0 and limit in 1..{MAX_LISTING}", reason="bad_argument")
        if len(query) >= 46 and query.isalnum():
            # a whole CID: the index answers for it however old it is
            try:
                record = self._coordinator.lineage(query, 1, with_manifests=False).model
            except NotFound:
                return []
            matches = (not kind or record.kind == kind) and (not aggregator or record.producer == aggregator)
            return [_record_json(record)] if matches and (not round_ or record.round == round_) else []
        records = self._coordinator.list_models(kind=kind, aggregator=aggregator, round=round_, limit=MAX_LISTING if query else limit)
        if query:
            records = [r for r in records if query.lower() in r.cid.lower()]
        return [_record_json(r) for r in records[:limit]]

    def model(self, cid: str) -> dict[str, Any]:
        """A model's record, manifest, signature status and children; its tensors when a store is at hand."""
        lineage = self._coordinator.lineage(_validate_cid(cid), 1, with_manifests=True)
        record = lineage.model
        result = _record_json(record)
        result["children"] = [_record_json(c) for c in lineage.children]
        result["device_update"] = is_device_update(record.kind)
        manifest: Manifest | None = None
        try:
            manifest = Manifest.from_bytes(record.manifest)
            manifest.verify_signature()
            result["signature"] = {"status": "valid", "public_key": (manifest.signature or {}).get("public_key", ""),
                                   "certified": manifest.certificate is not None}
            if self.settings.signers is not None:
                # the signature verifies under the key it names; does the fleet CA stand behind that key?
                try:
                    signer = self.settings.signers.check(manifest)
                    result["signature"].update(status="certified", signer=signer.to_json(), fleet=self.settings.signers.fleet)
                except SignerError as exc:
                    result["signature"].update(status=exc.reason, message=str(exc), fleet=self.settings.signers.fleet)
        except IntegrityError as exc:
            result["signature"] = {"status": exc.reason, "message": exc.message}
        except StrataError as exc:
            result["signature"] = {"status": "unreadable", "message": exc.message}
        result["manifest"] = manifest.to_json() if manifest is not None else None
        result["tensors"] = tensor_summary(manifest) if manifest is not None else None
        return result

    def lineage(self, cid: str, depth: int = 0, *, bases: bool = False) -> dict[str, Any]:
        """A model's ancestry as a DAG: nodes (records) and edges child -> parent; with `bases`, also
        child -> the model it was trained from (edge kind "base": earlier rounds, across forks)."""
        if depth < 0 or depth > 64:
            raise InvalidInput("depth must be in 0..64", reason="bad_argument")
        lineage = self._coordinator.lineage(_validate_cid(cid), depth, with_manifests=False, follow_base=bases)
        nodes = {r.cid: _record_json(r) for r in [lineage.model, *lineage.ancestors]}
        edges = [{"from": c, "to": p, "kind": "parent"} for c, node in nodes.items() for p in node["parents"] if p in nodes]
        if bases:
            edges += [
                {"from": c, "to": node["base"], "kind": "base"}
                for c, node in nodes.items()
                if node["base"] in nodes and node["base"] not in node["parents"]
            ]
        return {
            "root": lineage.model.cid,
            "nodes": list(nodes.values()),
            "edges": edges,
            "missing": list(lineage.missing),
            "truncated": lineage.truncated,
        }

    def weights(self, cid: str) -> tuple[dict[str, Any], bytes]:
        """A model's record and safetensors bytes; device updates only for a dashboard whose role may read them."""
        if self.settings.store is None:
            raise NotFound("this dashboard was started without --store: it serves no weights", reason="no_store")
        lineage = self._coordinator.lineage(_validate_cid(cid), 1, with_manifests=False)
        record = lineage.model
        if is_device_update(record.kind) and not self.settings.may_read_device_updates:
            raise PermissionDenied(
                f"{cid} is a device update ({record.kind}); only a dashboard run with an audit bundle serves those",
                reason=DEVICE_UPDATE,
            )
        with self.settings.store() as store:
            _, blob = load_model(store, cid)
        return _record_json(record), blob


def _manifest_json(record: ModelRecord) -> dict[str, Any]:
    """The manifest as JSON (the coordinator validated it when indexing); {} if absent."""
    if not record.manifest:
        return {}
    try:
        manifest = json.loads(record.manifest)
    except ValueError:
        return {}
    return manifest if isinstance(manifest, dict) else {}
