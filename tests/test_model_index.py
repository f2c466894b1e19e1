"""The model index on a small index: batches with refusals, every listing against a brute-force
answer, lineage and children, query plans that never scan a table, and the schema 1 migration."""

from __future__ import annotations

import dataclasses
import itertools
import random
import sqlite3
from pathlib import Path

import pytest

from coordinator.index import MAX_BATCH, ModelIndex, ModelRecord, _listing, base_of
from proto.errors import InvalidInput
from storage.cid import cid_of
from storage.keys import KeyPair
from storage.manifest import KINDS, Manifest, rfc3339
from tests.test_coordinator import make_manifest


@pytest.fixture
def index() -> ModelIndex:
    idx = ModelIndex(None)
    yield idx
    idx.close()


def _created(seconds: float) -> str:
    return rfc3339(1_767_225_600 + seconds)


# ---------------------------------------------------------------- batches


def test_a_batch_refuses_bad_manifests_alone_and_answers_in_order(index: ModelIndex, keypair: KeyPair) -> None:
    good = [make_manifest(keypair, round=r, seed="batch") for r in range(3)]
    tampered = dataclasses.replace(good[0], num_samples=999_999)  # its signature no longer matches
    unsigned = dataclasses.replace(make_manifest(keypair, seed="unsigned"), signature=None)
    items = [
        (good[0].to_bytes(), {"n": "0"}),
        (b"{not json", None),
        (good[1].to_bytes(), None),
        (tampered.to_bytes(), None),
        (unsigned.to_bytes(), None),
        (good[2].to_bytes(), {}),
    ]
    results = index.record_many(items)
    assert [r.cid for r in results] == [good[0].cid, "", good[1].cid, "", "", good[2].cid]
    assert [r.reason for r in results] == ["", "invalid_manifest", "", "bad_signature", "unsigned", ""]
    assert all(r.message for r in results if r.refused) and not any(r.message for r in results if not r.refused)
    assert index.count() == 3 and index.get(good[0].cid).notes == {"n": "0"}


def test_a_resent_batch_only_merges_notes(index: ModelIndex, keypair: KeyPair) -> None:
    parent = make_manifest(keypair, kind="base", round=0, seed="resend")
    child = make_manifest(keypair, round=1, parents=(parent.cid,), seed="resend")
    index.record_many([(parent.to_bytes(), {"a": "1"}), (child.to_bytes(), None)])
    # the same bytes again, twice in one batch, with new notes
    results = index.record_many(
        [(parent.to_bytes(), {"b": "2"}), (child.to_bytes(), None), (parent.to_bytes(), {"a": "3"})]
    )
    assert [r.cid for r in results] == [parent.cid, child.cid, parent.cid] and index.count() == 2
    assert index.get(parent.cid).notes == {"a": "3", "b": "2"}
    assert [r.cid for r in index.children(parent.cid)] == [child.cid]
    # a duplicate inside the first batch that indexes it
    fresh = make_manifest(keypair, round=2, seed="twice")
    assert [r.cid for r in index.record_many([(fresh.to_bytes(), {"x": "1"}), (fresh.to_bytes(), {"y": "2"})])] == [
        fresh.cid,
        fresh.cid,
    ]
    assert index.get(fresh.cid).notes == {"x": "1", "y": "2"} and index.count() == 3


def test_a_batch_over_the_limit_is_refused_whole(index: ModelIndex) -> None:
    with pytest.raises(InvalidInput) as refused:
        index.record_many([(b"{}", None)] * (MAX_BATCH + 1))
    assert refused.value.reason == "batch_too_large"
    assert index.record_many([]) == [] and index.count() == 0


# ---------------------------------------------------------------- listings


def _reference(
    records: list[ModelRecord],
    *,
    kind: str | None,
    aggregator: str | None,
    federation: str | None,
    round: int | None,
    latest_per_aggregator: bool,
    limit: int | None,
) -> list[str]:
    """What `list` must answer, computed the slow way."""
    chosen = [
        r
        for r in records
        if (kind is None or r.kind == kind)
        and (aggregator is None or r.producer == aggregator)
        and (federation is None or r.federation == federation)
        and (round is None or r.round == round)
    ]
    chosen.sort(key=lambda r: (-r.round, -r.created_at, r.cid))
    if latest_per_aggregator:
        newest: dict[str, ModelRecord] = {}
        for r in chosen:
            newest.setdefault(r.producer, r)
        chosen = [r for r in chosen if newest[r.producer] is r]
    return [r.cid for r in (chosen[:limit] if limit else chosen)]


def test_every_listing_matches_a_brute_force_answer(index: ModelIndex, keypair: KeyPair) -> None:
    rng = random.Random(7)
    producers = ["agg-a", "agg-b", "agg-c", "agent-1"]
    manifests = [
        make_manifest(
            keypair,
            kind=rng.choice(["cluster", "semi-global", "local", "base"]),
            producer=rng.choice(producers),
            round=rng.randrange(4),
            federation=rng.choice(["digits", "mnist"]),
            seed=str(n),
            # a few share a round and a creation time, so the CID must break the tie
            created_at=_created(rng.randrange(3)),
        )
        for n in range(80)
    ]
    assert not any(r.refused for r in index.record_many((m.to_bytes(), None) for m in manifests))
    records = index.list()
    assert len(records) == 80
    for kind, aggregator, federation, round, latest, limit in itertools.product(
        [None, "cluster", "semi-global", "fork"],
        [None, "agg-a", "agent-1", "nobody"],
        [None, "mnist"],
        [None, 0, 2],
        [False, True],
        [None, 1, 5],
    ):
        query = dict(
            kind=kind,
            aggregator=aggregator,
            federation=federation,
            round=round,
            latest_per_aggregator=latest,
            limit=limit,
        )
        assert [r.cid for r in index.list(**query)] == _reference(records, **query), query


def test_latest_per_aggregator_is_each_producers_newest(index: ModelIndex, keypair: KeyPair) -> None:
    models = {
        (producer, kind, r): make_manifest(keypair, kind=kind, producer=producer, round=r, created_at=_created(r))
        for producer in ("agg-a", "agg-b")
        for kind in ("cluster", "semi-global")
        for r in (1, 2, 3)
    }
    late = make_manifest(keypair, producer="agg-c", round=1)
    index.record_many([(m.to_bytes(), None) for m in [*models.values(), late]])
    latest = index.list(kind="cluster", latest_per_aggregator=True)
    # round 3 of agg-a and agg-b share their creation time: the CID breaks the tie
    newest = sorted([models[("agg-a", "cluster", 3)].cid, models[("agg-b", "cluster", 3)].cid])
    assert [r.cid for r in latest] == [*newest, late.cid]
    [b2] = index.list(kind="semi-global", aggregator="agg-b", round=2, latest_per_aggregator=True)
    assert b2.cid == models[("agg-b", "semi-global", 2)].cid
    assert index.list(kind="fork", latest_per_aggregator=True) == []


# ---------------------------------------------------------------- lineage and children


def test_lineage_to_depth_3_and_children(index: ModelIndex, keypair: KeyPair) -> None:
    unknown = cid_of(b"never announced")
    local = [make_manifest(keypair, kind="local", producer=f"agent-{n}", round=1, seed=str(n)) for n in range(3)]
    peer = make_manifest(keypair, producer="agg-b", round=1, parents=(unknown,))
    cluster = make_manifest(keypair, round=1, parents=tuple(m.cid for m in local))
    semi = make_manifest(keypair, kind="semi-global", round=1, parents=(cluster.cid, peer.cid))
    fork = make_manifest(keypair, kind="fork", round=0, federation="mnist", parents=(semi.cid,))
    later = make_manifest(keypair, round=2, parents=(semi.cid,), created_at=_created(60))
    index.record_many((m.to_bytes(), None) for m in [later, fork, semi, cluster, peer, *local])

    lineage = index.lineage(semi.cid, depth=3)
    assert [r.cid for r in lineage.ancestors] == [cluster.cid, peer.cid, *(m.cid for m in local)]
    assert lineage.missing == [unknown]
    assert [r.cid for r in lineage.children] == [fork.cid, later.cid]  # oldest first: round 0, then 2
    assert [r.cid for r in index.lineage(later.cid, depth=1).ancestors] == [semi.cid]
    assert [r.cid for r in index.children(local[1].cid)] == [cluster.cid]
    assert [r.cid for r in index.children(unknown)] == [peer.cid]  # the edge waits for its parent
    assert [r.cid for r in index.children(peer.cid)] == [semi.cid]
    assert [r.cid for r in index.parents(semi.cid)] == [cluster.cid, peer.cid]


def test_children_of_a_parent_indexed_after_them(index: ModelIndex, keypair: KeyPair) -> None:
    parent = make_manifest(keypair, kind="base", round=0, seed="late parent")
    child = make_manifest(keypair, round=1, parents=(parent.cid,))
    index.record(child.to_bytes())
    assert index.lineage(child.cid).missing == [parent.cid]
    index.record(parent.to_bytes())
    assert [r.cid for r in index.children(parent.cid)] == [child.cid]
    assert [r.cid for r in index.lineage(child.cid).ancestors] == [parent.cid]


# ---------------------------------------------------------------- plans


def _plan(index: ModelIndex, query: str, args: tuple) -> list[str]:
    return [row[3] for row in index._read(f"EXPLAIN QUERY PLAN {query}", args)]


@pytest.mark.parametrize(
    "shape",
    [
        dict(kinds=["cluster"], producer=None, federation=None, round=None, latest=True, limit=None),
        dict(kinds=list(KINDS), producer=None, federation="digits", round=None, latest=True, limit=None),
        dict(kinds=["semi-global"], producer="agg-a", federation=None, round=3, latest=True, limit=1),
        dict(kinds=["cluster"], producer=None, federation=None, round=None, latest=False, limit=50),
        dict(kinds=["local"], producer=None, federation=None, round=7, latest=False, limit=50),
        dict(kinds=list(KINDS), producer="agg-a", federation=None, round=None, latest=False, limit=50),
    ],
)
def test_listings_only_search_indexes(index: ModelIndex, shape: dict) -> None:
    plan = _plan(index, *_listing(**shape))
    assert any("USING" in step and "INDEX" in step for step in plan), plan
    # no step reads the models table (or an index) from end to end
    assert not [step for step in plan if step.startswith("SCAN") and ("models" in step or " m" in step)], plan


def test_lookups_and_children_search_indexes(index: ModelIndex) -> None:
    fetch = _plan(index, "SELECT cid FROM models WHERE cid IN (SELECT value FROM json_each(?))", ('["x"]',))
    assert "SEARCH models USING COVERING INDEX models_by_cid (cid=?)" in fetch
    children = _plan(
        index, "SELECT m.cid FROM edges e JOIN models m ON m.id = e.child WHERE e.parent = ?", ("x",)
    )
    assert children == ["SEARCH e USING PRIMARY KEY (parent=?)", "SEARCH m USING INTEGER PRIMARY KEY (rowid=?)"]


# ---------------------------------------------------------------- schema 1


_SCHEMA_1 = """
CREATE TABLE models (cid TEXT PRIMARY KEY, kind TEXT NOT NULL, federation TEXT NOT NULL, round INTEGER NOT NULL,
    producer TEXT NOT NULL, producer_role TEXT NOT NULL, parents TEXT NOT NULL, num_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL, created_at REAL NOT NULL, weights TEXT NOT NULL, manifest BLOB NOT NULL,
    notes TEXT NOT NULL, indexed_at REAL NOT NULL);
CREATE INDEX models_by_producer ON models (producer, round);
CREATE INDEX models_by_kind ON models (kind, federation, round);
CREATE TABLE edges (child TEXT NOT NULL, parent TEXT NOT NULL, PRIMARY KEY (child, parent));
CREATE INDEX edges_by_parent ON edges (parent);
CREATE TABLE agents (agent_id TEXT PRIMARY KEY, home TEXT NOT NULL, reported_by TEXT NOT NULL,
    last_seen REAL NOT NULL, telemetry TEXT NOT NULL, capability TEXT NOT NULL, display_name TEXT NOT NULL);
CREATE INDEX agents_by_reporter ON agents (reported_by);
PRAGMA user_version = 1;
"""


def test_an_index_of_schema_1_is_migrated_in_place(tmp_path: Path, keypair: KeyPair) -> None:
    path = tmp_path / "index.db"
    base = make_manifest(keypair, kind="base", round=0)
    cluster = make_manifest(keypair, round=1, parents=(base.cid,))
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA_1)
        for at, m in enumerate((cluster, base)):  # the child was indexed first
            parsed = Manifest.from_bytes(m.to_bytes())
            db.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (m.cid, m.kind, m.federation, m.round, m.producer.id, m.producer.role, f'["{base.cid}"]'
                 if m is cluster else "[]", m.num_samples, '{"loss": 0.5}', 1767225600.0, m.weights,
                 parsed.to_bytes(), '{"by": "v1"}', float(at)),
            )  # fmt: skip
        db.execute("INSERT INTO edges VALUES (?, ?)", (cluster.cid, base.cid))
        db.execute("INSERT INTO agents VALUES ('x', 'agg-a', 'agg-a', 1.0, '{}', 'train', '')")
    db.close()
    with ModelIndex(path) as migrated:
        assert migrated.count() == 2 and migrated.get(cluster.cid).notes == {"by": "v1"}
        assert [r.cid for r in migrated.children(base.cid)] == [cluster.cid]
        assert [r.cid for r in migrated.lineage(cluster.cid).ancestors] == [base.cid]
        assert [a.agent_id for a in migrated.list_agents()] == ["x"]
        migrated.record(make_manifest(keypair, round=2, parents=(cluster.cid,)).to_bytes())
    with ModelIndex(path) as reopened:
        assert reopened.count() == 3 and len(reopened.children(cluster.cid)) == 1
        assert int(reopened._read("PRAGMA user_version")[0][0]) == ModelIndex.SCHEMA_VERSION == 2


def _trained_from(manifest: Manifest, base: str, key: KeyPair) -> Manifest:
    return dataclasses.replace(manifest, base=base, signature=None, certificate=None).signed(key)


def test_a_lineage_follows_bases_across_rounds_and_is_cut_at_its_limits(
    index: ModelIndex, keypair: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator import index as index_module
    from coordinator import messages

    previous = make_manifest(keypair, kind="base", round=0, seed="rounds")
    chain = [previous]
    for round_ in range(1, 5):
        updates = [
            _trained_from(make_manifest(keypair, kind="local", producer=f"agent-{n}", round=round_, seed=f"r{n}"),
                          previous.cid, keypair)
            for n in range(3)
        ]  # fmt: skip
        previous = _trained_from(
            make_manifest(keypair, round=round_, parents=tuple(u.cid for u in updates), seed="rounds"),
            previous.cid,
            keypair,
        )
        chain += [*updates, previous]
    index.record_many((m.to_bytes(), None) for m in chain)
    last = chain[-1].cid

    assert len(index.lineage(last, depth=100).ancestors) == 3  # made of: its round's updates
    whole = index.lineage(last, depth=100, follow_base=True)
    assert {r.cid for r in whole.ancestors} == {m.cid for m in chain[:-1]} and not whole.truncated
    assert base_of(index.get(last)) == chain[-5].cid  # the previous round's cluster model
    assert whole.model.base == chain[-5].cid and index.get(last).base == ""  # listings do not parse manifests

    monkeypatch.setattr(index_module, "MAX_LINEAGE_RECORDS", 5)
    cut = index.lineage(last, depth=100, follow_base=True)
    assert len(cut.ancestors) == 5 and cut.truncated

    monkeypatch.setattr(messages, "PAGE_BYTES", 600)
    reply = messages.lineage_to_pb(whole, with_manifests=False)
    assert 1 <= len(reply.ancestors) < len(whole.ancestors) and reply.truncated
    assert messages.lineage_from_pb(reply).truncated and reply.ancestors[0].base == whole.ancestors[0].base != ""
