"""The model index: every announced manifest, who produced it, and its lineage; plus the agent directory.

This is the operator's mapping table between models and aggregators: which
cluster and semi-global models each aggregator produced, round by round, and
what each was made from. A manifest is parsed, validated and signature-checked
before it is recorded under its CID; recording is idempotent. The raw manifest
bytes are kept, so anyone can re-verify the CID and the signature.
`record_many` takes a batch: each manifest is judged on its own, and the valid
ones are written in one transaction. Queries are shaped to read indexes only
(see the schema's comments and `_listing`), so their cost follows the size of
the answer, not the size of the index.

With TLS, an announcement counts only from the model's producer: an aggregator
announces what it made (its cluster and semi-global models), so the announcer's
identity must be the manifest's producer (PERMISSION_DENIED ``not_producer``), and
the manifest must be signed by the announcer's certified manifest key with its
certificate embedded, issued by the fleet CA, valid at ``created_at`` and not
revoked (PERMISSION_DENIED ``uncertified_signer``). Device updates are never
announced, not even ones an aggregator recorded on a device's behalf: they stay
in the store of the home that received them.

The index holds manifests (and so CIDs and lineage), never weights: nothing here
reads or serves a weights blob.

The agent directory is what aggregators last reported about their agents.

One SQLite file through `storage.durable` (WAL, synchronous=FULL, one
transaction per write, a versioned schema); imports no gRPC.
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from proto.errors import InvalidInput, NotFound, StrataError
from storage.cid import cid_of, validate_cid
from storage.durable import MAX_INTEGER, DurableSqlite, Statement
from storage.manifest import KINDS, Manifest
from trust.errors import PermissionDenied
from trust.identity import Certified
from trust.signers import SignerError, Signers

__all__ = ["MAX_BATCH", "AgentEntry", "IndexResult", "Lineage", "ModelIndex", "ModelRecord", "base_of"]

# Schema 2, sized for tens of millions of models:
# - `models` keeps the insertion order in its integer `id`; `cid` is unique through its own index.
#   `manifest` is the last column, so reading the others never touches a large manifest's overflow pages.
# - `parents` (JSON, the manifest's order) answers child -> parents with the row itself; `edges` answers
#   parent -> children through its primary key. A parent the index has not seen yet still has its edges.
# - `models_by_kind` serves listings of one kind newest first; `models_by_producer` serves one producer's
#   models of a kind newest first, and the walk over producers that `latest_per_aggregator` does.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    cid TEXT NOT NULL,
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
    notes TEXT NOT NULL,
    indexed_at REAL NOT NULL,
    manifest BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS models_by_cid ON models (cid);
CREATE INDEX IF NOT EXISTS models_by_kind ON models (kind, round DESC, created_at DESC);
CREATE INDEX IF NOT EXISTS models_by_producer ON models (kind, producer, round DESC, created_at DESC);
CREATE TABLE IF NOT EXISTS edges (
    parent TEXT NOT NULL,
    child INTEGER NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
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
# the columns a ModelRecord is read from, in `_row_to_record`'s order
_COLUMNS = "cid, kind, federation, round, producer, producer_role, parents, num_samples, metrics, created_at, weights, manifest, notes"
# the columns of the row `_validate` builds, in its order
_INSERT_COLUMNS = (
    "cid, kind, federation, round, producer, producer_role, parents, num_samples, metrics, created_at, weights,"
    " notes, indexed_at, manifest"
)
# A model indexed before keeps its row; new notes merge into its old ones.
_UPSERT_MODEL = (
    f"INSERT INTO models ({_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (cid) DO UPDATE SET notes = json_patch(models.notes, excluded.notes) WHERE excluded.notes != '{}'"
)
_MERGE_NOTES = "UPDATE models SET notes = json_patch(notes, ?) WHERE cid = ?"
_INSERT_EDGE = "INSERT OR IGNORE INTO edges (parent, child) SELECT ?, id FROM models WHERE cid = ?"
_NEWEST_FIRST = "round DESC, created_at DESC, cid"
# Schema 1 (one TEXT cid primary key, edges keyed by child CID) becomes schema 2 in one transaction.
_MIGRATE_FROM_1 = f"""
BEGIN IMMEDIATE;
DROP INDEX models_by_producer;
DROP INDEX models_by_kind;
DROP INDEX edges_by_parent;
ALTER TABLE models RENAME TO models_1;
ALTER TABLE edges RENAME TO edges_1;
{_SCHEMA}
INSERT INTO models ({_INSERT_COLUMNS}) SELECT {_INSERT_COLUMNS} FROM models_1 ORDER BY indexed_at, rowid;
INSERT OR IGNORE INTO edges (parent, child) SELECT e.parent, m.id FROM edges_1 e JOIN models m ON m.cid = e.child;
DROP TABLE models_1;
DROP TABLE edges_1;
PRAGMA user_version = 2;
COMMIT;
"""
DEFAULT_LINEAGE_DEPTH = 16
# the most ancestors one lineage walk gathers: with bases followed, a deep walk would otherwise read a
# federation's whole history (every round's device updates) for one request; no more than one reply
# carries (coordinator.messages.MAX_PAGE_ITEMS), so a longer walk would be work thrown away
MAX_LINEAGE_RECORDS = 10_000
# the most manifests one `record_many` call takes
MAX_BATCH = 1000

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
    # the model it was trained from, in the records of a lineage that followed bases (listings leave it
    # empty: reading it parses the manifest, most of a listing's cost); `base_of` reads it from the manifest
    base: str = ""


@dataclass(frozen=True, kw_only=True)
class Lineage:
    model: ModelRecord
    ancestors: list[ModelRecord]  # breadth first, up to the requested depth
    children: list[ModelRecord]  # direct children only
    missing: list[str]  # CIDs named as parents but not in the index
    truncated: bool = False  # the walk stopped at MAX_LINEAGE_RECORDS (or its reply at the message budget)


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


def base_of(record: ModelRecord) -> str:
    """The model `record` was trained from (its manifest's `base`; empty: none or no manifest held)."""
    if record.base or not record.manifest:
        return record.base
    return json.loads(record.manifest).get("base") or ""


def _notes_json(notes: Mapping[str, str] | None) -> str:
    return json.dumps({str(k): str(v) for k, v in (notes or {}).items()})


def _qualified(table: str) -> str:
    return ", ".join(f"{table}.{column.strip()}" for column in _COLUMNS.split(","))


def _listing(
    *,
    kinds: Sequence[str],
    producer: str | None,
    federation: str | None,
    round: int | None,
    latest: bool,
    limit: int | None,
) -> tuple[str, tuple[Any, ...]]:
    """The query `ModelIndex.list` runs, built so that every part of it reads an index in order.

    Listing: one index-ordered scan per kind (`models_by_producer` with a producer,
    else `models_by_kind`), each cut at `limit`, merged newest first.

    Latest per producer: for each kind, skip from one producer to the next through
    `models_by_producer` (one seek each, however many models a producer has), take
    each producer's newest matching model of that kind, then each producer's newest
    of those across kinds.
    """
    where, args = "", []
    for column, value in (("federation", federation), ("round", round)):
        if value is not None:
            where += f" AND m.{column} = ?"
            args.append(value)
    cut, limit_args = (" LIMIT ?", [limit]) if limit is not None else ("", [])
    newest_first = "m.round DESC, m.created_at DESC, m.cid"
    if not latest:
        own, own_args = (" AND m.producer = ?", [producer]) if producer is not None else ("", [])
        member = (
            f"SELECT * FROM (SELECT {_qualified('m')} FROM models m WHERE m.kind = ?{own}{where}"
            f" ORDER BY {newest_first}{cut})"
        )
        member_args = [[kind, *own_args, *args, *limit_args] for kind in kinds]
        if len(kinds) == 1:
            return member, tuple(member_args[0])
        query = " UNION ALL ".join([member] * len(kinds)) + f" ORDER BY {_NEWEST_FIRST}{cut}"
        return query, (*itertools.chain.from_iterable(member_args), *limit_args)
    if producer is not None:
        producers, producer_args = "producers(kind, producer) AS (SELECT kind, ? FROM kinds)", [producer]
    else:
        producers, producer_args = (
            "producers(kind, producer) AS ("
            "SELECT kind, (SELECT producer FROM models WHERE kind = kinds.kind ORDER BY producer LIMIT 1) FROM kinds"
            " UNION ALL SELECT kind, (SELECT producer FROM models WHERE kind = producers.kind"
            " AND producer > producers.producer ORDER BY producer LIMIT 1)"
            " FROM producers WHERE producer IS NOT NULL)"
        ), []
    query = (
        f"WITH RECURSIVE kinds(kind) AS (VALUES {', '.join('(?)' for _ in kinds)}), {producers},"
        " newest(id) AS (SELECT (SELECT m.id FROM models m WHERE m.kind = p.kind AND m.producer = p.producer"
        f"{where} ORDER BY {newest_first} LIMIT 1) FROM producers p WHERE p.producer IS NOT NULL),"
        f" ranked AS (SELECT {_qualified('m')}, ROW_NUMBER() OVER (PARTITION BY m.producer ORDER BY {newest_first})"
        " AS rank FROM newest n JOIN models m ON m.id = n.id)"
        f" SELECT {_COLUMNS} FROM ranked WHERE rank = 1 ORDER BY {_NEWEST_FIRST}{cut}"
    )
    return query, (*kinds, *producer_args, *args, *limit_args)


@dataclass(frozen=True, kw_only=True)
class IndexResult:
    """The index's answer for one manifest of a batch: its CID, or why it was refused for good."""

    cid: str = ""
    reason: str = ""  # empty: indexed (now or before)
    message: str = ""

    @property
    def refused(self) -> bool:
        return bool(self.reason)


@dataclass(frozen=True)
class _Validated:
    """A manifest that passed the schema and its signature: its row and its parents."""

    row: tuple[Any, ...]
    parents: tuple[str, ...]

    @property
    def cid(self) -> str:
        return self.row[0]


# device updates reach the index through the aggregator that accepted them, signed by their producers
_RELAYED_KINDS = ("local", "relay")


def _check_announcer(manifest: Manifest, announcer: Certified, signers: Signers | None) -> None:
    """With TLS: an aggregator announces its own models, and the device updates it accepted (each signed by
    its producer's certified key); anyone else announces only models it produced and signed itself."""
    producer, identity = manifest.producer, announcer.identity
    own = (producer.role, producer.id) == (identity.role.value, identity.id)
    recorder = manifest.extra.get("recorded_by")
    relayed = (
        manifest.kind in _RELAYED_KINDS and identity.role.value == "aggregator" and recorder in (None, identity.id)
    )
    if not own and not relayed:
        raise PermissionDenied(
            f"{identity} may announce only models it produced, not {manifest.kind} model {manifest.cid} "
            f"of {producer.role}/{producer.id}",
            reason="not_producer",
        )
    assert manifest.signature is not None  # verified above
    if own and manifest.signature["public_key"] != announcer.manifest_key:
        raise PermissionDenied(
            f"model {manifest.cid} is not signed by {identity}'s certified manifest key", reason="uncertified_signer"
        )
    if signers is None:
        return
    try:
        signer = signers.check(manifest)
    except SignerError as exc:
        raise PermissionDenied(f"model {manifest.cid}: its signer does not count ({exc.reason}): {exc}", reason="uncertified_signer") from None
    if own and signer.certified.identity != identity:
        raise PermissionDenied(
            f"model {manifest.cid} embeds the certificate of {signer.certified.identity}, not {identity}'s",
            reason="uncertified_signer",
        )


class ModelIndex(DurableSqlite):
    """Thread-safe; `path=None` keeps the index in memory."""

    SCHEMA = _SCHEMA
    SCHEMA_VERSION = 2

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

    def _check_version(self, *, fresh: bool) -> None:
        if not fresh and int(self._db.execute("PRAGMA user_version").fetchone()[0]) == 1:
            try:
                self._db.executescript(_MIGRATE_FROM_1)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        super()._check_version(fresh=fresh)

    # ------------------------------------------------------------ models

    def record(
        self,
        manifest_bytes: bytes,
        notes: Mapping[str, str] | None = None,
        *,
        announcer: Certified | None = None,
        signers: Signers | None = None,
    ) -> str:
        """Validate and index a manifest; returns its CID (the model ID).

        Raises ManifestError (an InvalidInput) for a malformed manifest and
        IntegrityError for a missing or bad signature; with `announcer` (the TLS
        caller) and `signers`, PermissionDenied unless the announcer produced and
        signed it with its certified key (see the module docstring). Recording the
        same bytes again changes nothing but merges `notes`.
        """
        manifest_bytes = bytes(manifest_bytes)
        validated = self._validate(manifest_bytes, notes, cid_of(manifest_bytes), announcer=announcer, signers=signers)
        self._write(self._statements([validated]))
        return validated.cid

    def record_many(
        self,
        items: Iterable[tuple[bytes, Mapping[str, str] | None]],
        *,
        announcer: Certified | None = None,
        signers: Signers | None = None,
    ) -> list[IndexResult]:
        """Validate each (manifest, notes) like `record` and index every valid one, all in one transaction.

        Returns one result per item, in order: the CID, or why that manifest was refused
        (a refusal never keeps the others out). Bytes already indexed are not validated
        again (their CID is their hash), so resending a batch costs little more than
        its lookups. At most MAX_BATCH items.
        """
        items = [(bytes(manifest), notes) for manifest, notes in items]
        if len(items) > MAX_BATCH:
            raise InvalidInput(f"at most {MAX_BATCH} manifests per batch, got {len(items)}", reason="batch_too_large")
        cids = [cid_of(manifest) for manifest, _ in items]
        known = self._known(cids)
        results: list[IndexResult] = []
        statements: list[Statement] = []
        for (manifest, notes), cid in zip(items, cids, strict=True):
            if cid in known:
                if notes:
                    statements.append((_MERGE_NOTES, (_notes_json(notes), cid)))
                results.append(IndexResult(cid=cid))
                continue
            try:
                validated = self._validate(manifest, notes, cid, announcer=announcer, signers=signers)
            except StrataError as err:
                results.append(IndexResult(reason=err.reason, message=err.message))
                continue
            statements.extend(self._statements([validated]))
            known.add(cid)  # the same bytes again later in this batch only merge their notes
            results.append(IndexResult(cid=cid))
        if statements:
            self._write(statements)
        return results

    def _known(self, cids: Sequence[str]) -> set[str]:
        rows = self._read("SELECT cid FROM models WHERE cid IN (SELECT value FROM json_each(?))", (json.dumps(cids),))
        return {row[0] for row in rows}

    def _validate(
        self,
        manifest_bytes: bytes,
        notes: Mapping[str, str] | None,
        cid: str,
        *,
        announcer: Certified | None = None,
        signers: Signers | None = None,
    ) -> _Validated:
        """`cid` is cid_of(manifest_bytes), which the caller already needed (hashing is not free)."""
        manifest = Manifest.from_bytes(manifest_bytes)
        if manifest.signature is not None or self._require_signature or announcer is not None:
            manifest.verify_signature()
        if announcer is not None:
            _check_announcer(manifest, announcer, signers)
        for name in ("round", "num_samples"):
            if getattr(manifest, name) > MAX_INTEGER:
                raise InvalidInput(f"manifest {name} {getattr(manifest, name)} is past 2^63-1", reason="invalid_manifest")
        _check_notes({str(k): str(v) for k, v in (notes or {}).items()})
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
            _notes_json(notes),
            self._clock(),
            bytes(manifest.to_bytes()),
        )
        return _Validated(row, manifest.parents)

    @staticmethod
    def _statements(models: Iterable[_Validated]) -> list[Statement]:
        """Each new model with its edges (a model indexed before: its notes merged in), in order."""
        statements: list[Statement] = []
        for model in models:
            statements.append((_UPSERT_MODEL, model.row))
            statements.extend((_INSERT_EDGE, (parent, model.cid)) for parent in model.parents)
        return statements

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
        rows = self._read(
            f"SELECT {_COLUMNS} FROM models WHERE cid IN (SELECT value FROM json_each(?))", (json.dumps(cids),)
        )
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
        query, args = _listing(
            kinds=[kind] if kind else list(KINDS),
            producer=aggregator or None,
            federation=federation or None,
            round=round,
            latest=latest_per_aggregator,
            limit=limit or None,
        )
        return [_row_to_record(row) for row in self._read(query, args)]

    def parents(self, cid: str) -> list[ModelRecord]:
        """The indexed parents of `cid`, in the manifest's order (unindexed ones are left out)."""
        record = self.get(cid)
        found = self._fetch(record.parents)
        return [found[p] for p in record.parents if p in found]

    def children(self, cid: str) -> list[ModelRecord]:
        """Indexed models that name `cid` as a parent, oldest first."""
        validate_cid(cid)
        rows = self._read(
            f"SELECT {_qualified('m')} FROM edges e JOIN models m ON m.id = e.child"
            " WHERE e.parent = ? ORDER BY m.round, m.created_at, m.cid",
            (cid,),
        )
        return [_row_to_record(row) for row in rows]

    def lineage(self, cid: str, depth: int = DEFAULT_LINEAGE_DEPTH, *, follow_base: bool = False) -> Lineage:
        """`cid`'s record, its ancestors up to `depth` generations (breadth first, each once),
        its direct children, and the parents named along the way that the index lacks.
        `follow_base` walks each model's base too (earlier rounds; across a fork, the source federation's)."""
        if depth < 0:
            raise InvalidInput(f"depth must be >= 0, got {depth}", reason="bad_query")
        model = self._with_base(self.get(cid)) if follow_base else self.get(cid)
        ancestors: list[ModelRecord] = []
        missing: list[str] = []
        seen = {cid}
        frontier = deque([model])
        truncated = False
        for _ in range(depth):
            wanted = [
                p
                for record in frontier
                for p in (*record.parents, *((record.base,) if follow_base and record.base else ()))
                if p not in seen
            ]
            wanted = list(dict.fromkeys(wanted))
            if not wanted:
                break
            room = MAX_LINEAGE_RECORDS - len(ancestors)
            truncated = len(wanted) > room
            wanted = wanted[:room]
            seen.update(wanted)
            found = self._fetch(wanted)
            missing.extend(p for p in wanted if p not in found)
            frontier = deque(self._with_base(found[p]) if follow_base else found[p] for p in wanted if p in found)
            ancestors.extend(frontier)
            if truncated:
                break
        return Lineage(
            model=model, ancestors=ancestors, children=self.children(cid), missing=missing, truncated=truncated
        )

    @staticmethod
    def _with_base(record: ModelRecord) -> ModelRecord:
        return replace(record, base=base_of(record))

    def count(self) -> int:
        # Models are never deleted, so the largest id is the count (COUNT(*) would read a whole index).
        return int(self._read("SELECT COALESCE(MAX(id), 0) FROM models")[0][0])

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
