"""The model index: every announced manifest, who produced it, and its lineage; plus the agent directory.

This is the operator's mapping table between models and aggregators: which
cluster and semi-global models each aggregator produced, round by round, and
what each was made from. A manifest is parsed, validated and signature-checked
before it is recorded under its CID; recording is idempotent. The raw manifest
bytes are kept, so anyone can re-verify the CID and the signature.

The agent directory is what aggregators last reported about their agents.

One SQLite file through `storage.durable` (WAL, synchronous=FULL, one
transaction per write, a versioned schema); imports no gRPC.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from proto.errors import InvalidInput, NotFound
from storage.cid import validate_cid
from storage.durable import MAX_INTEGER, DurableSqlite
from storage.manifest import Manifest

__all__ = ["AgentEntry", "Lineage", "ModelIndex", "ModelRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    cid TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    federation TEXT NOT NULL,
    round INTEGER NOT NULL,
    producer TEXT NOT NULL,
    producer_role TEXT NOT NULL,
    parents TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    created_at REAL NOT NULL,
    weights TEXT NOT NULL,
    manifest BLOB NOT NULL,
    notes TEXT NOT NULL,
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS models_by_producer ON models (producer, round);
CREATE INDEX IF NOT EXISTS models_by_kind ON models (kind, federation, round);
CREATE TABLE IF NOT EXISTS edges (
    child TEXT NOT NULL,
    parent TEXT NOT NULL,
    PRIMARY KEY (child, parent)
);
CREATE INDEX IF NOT EXISTS edges_by_parent ON edges (parent);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    home TEXT NOT NULL,
    reported_by TEXT NOT NULL,
    last_seen REAL NOT NULL,
    telemetry TEXT NOT NULL,
    capability TEXT NOT NULL,
    display_name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS agents_by_reporter ON agents (reported_by);
"""

# a report replaces its reporter's entry; another aggregator's newer report of the same agent wins
_UPSERT_AGENT = (
    "INSERT INTO agents (agent_id, home, reported_by, last_seen, telemetry, capability, display_name)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id) DO UPDATE SET"
    " home = excluded.home, reported_by = excluded.reported_by, last_seen = excluded.last_seen,"
    " telemetry = excluded.telemetry, capability = excluded.capability, display_name = excluded.display_name"
    " WHERE excluded.last_seen >= agents.last_seen OR agents.reported_by = excluded.reported_by"
)
_COLUMNS = "cid, kind, federation, round, producer, producer_role, parents, num_samples, metrics, created_at, weights, manifest, notes"
DEFAULT_LINEAGE_DEPTH = 16
# Notes are a few labelled findings beside a manifest (e.g. refused_peers). SQLite's json_patch merges
# them in time quadratic in their keys (100k keys: ~16 s holding the index), so they are bounded first.
MAX_NOTES = 64
MAX_NOTE_KEY_CHARS = 128
MAX_NOTE_VALUE_CHARS = 64 << 10
# the longest agent id, home, display name or network name kept in the agent directory
MAX_AGENT_NAME_CHARS = 256


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    cid: str
    kind: str
    federation: str
    round: int
    producer: str
    producer_role: str
    parents: tuple[str, ...]
    num_samples: int
    metrics: dict[str, float]
    created_at: float  # unix seconds, from the manifest's RFC 3339 created_at
    weights: str
    manifest: bytes = field(repr=False)
    notes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Lineage:
    model: ModelRecord
    ancestors: list[ModelRecord]  # breadth first, up to the requested depth
    children: list[ModelRecord]  # direct children only
    missing: list[str]  # CIDs named as parents but not in the index


@dataclass(frozen=True, kw_only=True)
class AgentEntry:
    agent_id: str
    home: str = ""  # empty: the reporting aggregator
    last_seen: float = 0.0
    telemetry: dict[str, Any] = field(default_factory=dict)
    capability: str = "train"
    display_name: str = ""
    reported_by: str = ""


def _check_notes(notes: Mapping[str, str]) -> None:
    if len(notes) > MAX_NOTES:
        raise InvalidInput(f"{len(notes)} notes; the limit is {MAX_NOTES}", reason="bad_notes")
    for key, value in notes.items():
        if len(key) > MAX_NOTE_KEY_CHARS or len(value) > MAX_NOTE_VALUE_CHARS:
            raise InvalidInput(
                f"note {key[:40]!r} is {len(key)} + {len(value)} characters; the limits are "
                f"{MAX_NOTE_KEY_CHARS} for a key and {MAX_NOTE_VALUE_CHARS} for a value",
                reason="bad_notes",
            )


def _unix_seconds(rfc3339: str) -> float:
    # Manifest validation already accepted the format; fromisoformat takes at most 6 fraction digits.
    text = rfc3339[:-1] if rfc3339.endswith("Z") else rfc3339
    head, dot, fraction = text.partition(".")
    text = f"{head}.{fraction[:6]}" if dot else head
    return datetime.fromisoformat(text + "+00:00").timestamp()


def _row_to_record(row: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        cid=row[0],
        kind=row[1],
        federation=row[2],
        round=row[3],
        producer=row[4],
        producer_role=row[5],
        parents=tuple(json.loads(row[6])),
        num_samples=row[7],
        metrics=json.loads(row[8]),
        created_at=row[9],
        weights=row[10],
        manifest=bytes(row[11]),
        notes=json.loads(row[12]),
    )


class ModelIndex(DurableSqlite):
    """Thread-safe; `path=None` keeps the index in memory."""

    SCHEMA = _SCHEMA
    SCHEMA_VERSION = 1

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        require_signature: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path)
        self._require_signature = require_signature
        self._clock = clock

    # ------------------------------------------------------------ models

    def record(self, manifest_bytes: bytes, notes: Mapping[str, str] | None = None) -> str:
        """Validate and index a manifest; returns its CID (the model ID).

        Raises ManifestError (an InvalidInput) for a malformed manifest and
        IntegrityError for a missing or bad signature. Recording the same bytes
        again changes nothing but merges `notes`.
        """
        manifest = Manifest.from_bytes(manifest_bytes)
        if manifest.signature is not None or self._require_signature:
            manifest.verify_signature()
        for name in ("round", "num_samples"):
            if getattr(manifest, name) > MAX_INTEGER:
                raise InvalidInput(f"manifest {name} {getattr(manifest, name)} is past 2^63-1", reason="invalid_manifest")
        notes = {str(k): str(v) for k, v in (notes or {}).items()}
        _check_notes(notes)
        cid = manifest.cid
        row = (
            cid,
            manifest.kind,
            manifest.federation,
            manifest.round,
            manifest.producer.id,
            manifest.producer.role,
            json.dumps(list(manifest.parents)),
            manifest.num_samples,
            json.dumps(manifest.metrics),
            _unix_seconds(manifest.created_at),
            manifest.weights,
            bytes(manifest.to_bytes()),
            json.dumps(notes),
            self._clock(),
        )
        # one transaction: a new model with its edges, or (for one indexed before) its notes merged in
        self._write(
            [
                (
                    f"INSERT INTO models ({_COLUMNS}, indexed_at) VALUES ({', '.join('?' * len(row))})"
                    " ON CONFLICT (cid) DO UPDATE SET notes = json_patch(models.notes, excluded.notes)"
                    " WHERE excluded.notes != '{}'",
                    row,
                ),
                *[("INSERT OR IGNORE INTO edges (child, parent) VALUES (?, ?)", (cid, p)) for p in manifest.parents],
            ]
        )
        return cid

    def get(self, cid: str) -> ModelRecord:
        """The record of `cid`; NotFound(reason="unknown_model") if it was never announced."""
        validate_cid(cid)
        found = self._fetch([cid])
        if cid not in found:
            raise NotFound(f"model {cid} is not in the index", reason="unknown_model")
        return found[cid]

    def _fetch(self, cids: Iterable[str]) -> dict[str, ModelRecord]:
        cids = list(dict.fromkeys(cids))
        if not cids:
            return {}
        marks = ",".join("?" * len(cids))
        rows = self._read(f"SELECT {_COLUMNS} FROM models WHERE cid IN ({marks})", tuple(cids))
        return {row[0]: _row_to_record(row) for row in rows}

    def list(
        self,
        *,
        kind: str | None = None,
        aggregator: str | None = None,
        federation: str | None = None,
        round: int | None = None,
        latest_per_aggregator: bool = False,
        limit: int | None = None,
    ) -> list[ModelRecord]:
        """Models matching every given filter, newest first (round, then creation time).

        `aggregator` matches the producer id. With `latest_per_aggregator`, only
        each producer's newest matching model is kept (combine with `kind` to get,
        say, every aggregator's latest cluster model).
        """
        if limit is not None and limit < 0:
            raise InvalidInput(f"limit must be >= 0, got {limit}", reason="bad_query")
        if round is not None and not 0 <= round <= MAX_INTEGER:
            raise InvalidInput(f"round must be in 0..2^63-1, got {round}", reason="bad_query")
        where, args = [], []
        for column, value in (
            ("kind", kind),
            ("producer", aggregator),
            ("federation", federation),
            ("round", round),
        ):
            if value is not None and value != "":
                where.append(f"{column} = ?")
                args.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "round DESC, created_at DESC, cid"
        if latest_per_aggregator:
            query = (
                f"SELECT {_COLUMNS} FROM (SELECT *, ROW_NUMBER() OVER "
                f"(PARTITION BY producer ORDER BY {order}) AS rank FROM models {clause}) "
                f"WHERE rank = 1 ORDER BY {order}"
            )
        else:
            query = f"SELECT {_COLUMNS} FROM models {clause} ORDER BY {order}"
        if limit:
            query += " LIMIT ?"
            args.append(limit)
        return [_row_to_record(row) for row in self._read(query, tuple(args))]

    def parents(self, cid: str) -> list[ModelRecord]:
        """The indexed parents of `cid`, in the manifest's order (unindexed ones are left out)."""
        record = self.get(cid)
        found = self._fetch(record.parents)
        return [found[p] for p in record.parents if p in found]

    def children(self, cid: str) -> list[ModelRecord]:
        """Indexed models that name `cid` as a parent, oldest first."""
        validate_cid(cid)
        rows = self._read(
            f"SELECT {', '.join('m.' + c.strip() for c in _COLUMNS.split(','))} FROM edges e "
            "JOIN models m ON m.cid = e.child WHERE e.parent = ? ORDER BY m.round, m.created_at, m.cid",
            (cid,),
        )
        return [_row_to_record(row) for row in rows]

    def lineage(self, cid: str, depth: int = DEFAULT_LINEAGE_DEPTH) -> Lineage:
        """`cid`'s record, its ancestors up to `depth` generations (breadth first, each once),
        its direct children, and the parents named along the way that the index lacks."""
        if depth < 0:
            raise InvalidInput(f"depth must be >= 0, got {depth}", reason="bad_query")
        model = self.get(cid)
        ancestors: list[ModelRecord] = []
        missing: list[str] = []
        seen = {cid}
        frontier = deque([model])
        for _ in range(depth):
            wanted = [p for record in frontier for p in record.parents if p not in seen]
            wanted = list(dict.fromkeys(wanted))
            if not wanted:
                break
            seen.update(wanted)
            found = self._fetch(wanted)
            missing.extend(p for p in wanted if p not in found)
            frontier = deque(found[p] for p in wanted if p in found)
            ancestors.extend(frontier)
        return Lineage(
            model=model, ancestors=ancestors, children=self.children(cid), missing=missing
        )

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM models")[0][0])

    # ------------------------------------------------------------ agent directory

    def report_agents(self, aggregator_id: str, agents: Iterable[AgentEntry]) -> int:
        """Replace what `aggregator_id` last reported with `agents` (a full snapshot).

        An agent reported by two aggregators (it moved home) keeps the report with
        the later `last_seen`. Returns how many agents the directory now holds from this report.
        """
        if not aggregator_id:
            raise InvalidInput("aggregator_id must not be empty", reason="bad_aggregator")
        if len(aggregator_id) > MAX_AGENT_NAME_CHARS:
            raise InvalidInput(f"aggregator_id is {len(aggregator_id)} characters; the limit is {MAX_AGENT_NAME_CHARS}", reason="bad_aggregator")
        entries = list(agents)
        for entry in entries:
            if not entry.agent_id:
                raise InvalidInput("agent_id must not be empty", reason="bad_agent")
            # SQLite stores NaN as NULL (refused by NOT NULL), and an infinite time would outrank every later report
            if not math.isfinite(entry.last_seen):
                raise InvalidInput(f"agent {entry.agent_id[:80]!r}: last_seen must be finite", reason="bad_agent")
            names = {
                "agent_id": entry.agent_id,
                "home": entry.home,
                "display_name": entry.display_name,
                "capability": entry.capability,
                "network": str(entry.telemetry.get("network", "")),
            }
            for name, value in names.items():
                if len(value) > MAX_AGENT_NAME_CHARS:
                    raise InvalidInput(
                        f"agent {name} is {len(value)} characters; the limit is {MAX_AGENT_NAME_CHARS}", reason="bad_agent"
                    )
        forget = (
            "DELETE FROM agents WHERE reported_by = ? AND agent_id NOT IN (SELECT value FROM json_each(?))",
            (aggregator_id, json.dumps([e.agent_id for e in entries])),
        )
        rows = [
            (
                e.agent_id,
                e.home or aggregator_id,
                aggregator_id,
                float(e.last_seen),
                json.dumps(e.telemetry, sort_keys=True),
                e.capability,
                e.display_name,
            )
            for e in entries
        ]
        self._write([forget, *[(_UPSERT_AGENT, row) for row in rows]])
        return int(self._read("SELECT COUNT(*) FROM agents WHERE reported_by = ?", (aggregator_id,))[0][0])

    def list_agents(self, aggregator: str | None = None) -> list[AgentEntry]:
        """Every agent in the directory, or those whose home is `aggregator`, sorted by id."""
        query = "SELECT agent_id, home, last_seen, telemetry, capability, display_name, reported_by FROM agents"
        args: tuple = ()
        if aggregator:
            query += " WHERE home = ?"
            args = (aggregator,)
        rows = self._read(query + " ORDER BY agent_id", args)
        return [
            AgentEntry(
                agent_id=r[0],
                home=r[1],
                last_seen=r[2],
                telemetry=json.loads(r[3]),
                capability=r[4],
                display_name=r[5],
                reported_by=r[6],
            )
            for r in rows
        ]
