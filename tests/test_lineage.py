"""Lineage walks over real manifests in a real LocalStore."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from proto.errors import InvalidInput
from storage.cid import cid_of
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.lineage import verify, walk
from storage.manifest import Manifest, Producer
from storage.models import save_model
from storage.store import LocalStore


def _weights(seed: int) -> bytes:
    return encode_tensors({"w": np.full((2, 2), seed, np.float32)})


@dataclass
class Tree:
    """base -> 4 locals -> 2 clusters (2 locals each) -> 1 semi-global."""

    base: Manifest
    locals_: list[Manifest]
    clusters: list[Manifest]
    semi: Manifest


def _save(store: LocalStore, kind: str, seed: int, key: KeyPair | None, **fields) -> Manifest:
    return save_model(
        store,
        weights=_weights(seed),
        kind=kind,
        federation="digits",
        round=fields.pop("round", 1),
        producer=fields.pop("producer", Producer(role="aggregator", id=f"agg-{seed}")),
        key=key,
        created_at="2026-11-24T01:02:03.456Z",
        **fields,
    )


@pytest.fixture
def tree(local_store: LocalStore) -> Tree:
    operator = KeyPair.generate()
    base = _save(local_store, "base", 0, operator, round=0)
    locals_ = [
        _save(
            local_store,
            "local",
            10 + i,
            KeyPair.generate(),
            parents=[base.cid],
            base=base.cid,
            producer=Producer(role="agent", id=f"agent-{i}"),
            num_samples=10 * (i + 1),
        )  # fmt: skip
        for i in range(4)
    ]
    clusters = [
        _save(
            local_store,
            "cluster",
            20 + i,
            KeyPair.generate(),
            base=base.cid,
            parents=[m.cid for m in locals_[2 * i : 2 * i + 2]],
        )  # fmt: skip
        for i in range(2)
    ]
    semi = _save(local_store, "semi-global", 30, KeyPair.generate(), base=base.cid,
                 parents=[c.cid for c in clusters])  # fmt: skip
    return Tree(base, locals_, clusters, semi)


def test_full_walk_of_a_healthy_tree(local_store: LocalStore, tree: Tree) -> None:
    graph = verify(local_store, tree.semi.cid)
    assert graph.ok, graph.problems
    assert graph.root == tree.semi.cid
    assert set(graph.nodes) == {
        m.cid for m in [tree.base, *tree.locals_, *tree.clusters, tree.semi]
    }
    assert graph.depth_reached[tree.semi.cid] == 0
    assert {graph.depth_reached[c.cid] for c in tree.clusters} == {1}
    assert {graph.depth_reached[m.cid] for m in tree.locals_} == {2}
    assert graph.depth_reached[tree.base.cid] == 3
    # Four locals share the base: a diamond, not a cycle, and each edge appears once.
    assert len(graph.edges) == 2 + 4 + 4 == len(set(graph.edges))
    assert (tree.clusters[0].cid, tree.locals_[1].cid) in graph.edges
    assert graph.truncated == []


@pytest.mark.parametrize(("depth", "expected_nodes"), [(0, 1), (1, 3), (2, 7), (3, 8), (10, 8)])
def test_depth_limit(local_store: LocalStore, tree: Tree, depth: int, expected_nodes: int) -> None:
    graph = walk(local_store, tree.semi.cid, depth=depth)
    assert graph.ok and len(graph.nodes) == expected_nodes
    assert max(graph.depth_reached.values()) == min(depth, 3)
    frontier = {cid for cid, level in graph.depth_reached.items() if level == depth and depth < 3}
    assert set(graph.truncated) == frontier


def test_missing_parent_is_reported_and_the_walk_goes_on(
    local_store: LocalStore, tree: Tree
) -> None:
    ghost = cid_of(b"a manifest that was never stored")
    cluster = _save(local_store, "cluster", 40, KeyPair.generate(),
                    parents=[ghost, tree.locals_[0].cid])  # fmt: skip
    graph = walk(local_store, cluster.cid)
    assert [(p.cid, p.where, p.reason) for p in graph.problems] == [
        (ghost, f"parent of {cluster.cid}", "missing")
    ]
    assert tree.locals_[0].cid in graph.nodes and tree.base.cid in graph.nodes
    assert (cluster.cid, ghost) in graph.edges and ghost not in graph.nodes


def test_missing_root_is_a_problem_not_an_exception(local_store: LocalStore) -> None:
    ghost = cid_of(b"nothing")
    graph = walk(local_store, ghost)
    assert not graph.ok and graph.problems[0].where == "root" and graph.nodes == {}
    with pytest.raises(InvalidInput):
        walk(local_store, "not-a-cid")


def test_bad_signature_deep_in_the_tree_is_located(local_store: LocalStore, tree: Tree) -> None:
    # An agent's signed update, altered after signing (more samples, for more weight).
    honest = tree.locals_[3]
    forged = dataclasses.replace(honest, num_samples=10_000)
    local_store.put(forged.to_bytes())
    unsigned = _save(local_store, "local", 50, None, parents=[tree.base.cid])
    cluster = _save(local_store, "cluster", 51, KeyPair.generate(),
                    parents=[tree.locals_[2].cid, forged.cid, unsigned.cid])  # fmt: skip
    semi = _save(local_store, "semi-global", 52, KeyPair.generate(),
                 parents=[tree.clusters[0].cid, cluster.cid])  # fmt: skip
    graph = walk(local_store, semi.cid)
    found = {(p.cid, p.reason): p.where for p in graph.problems}
    assert found == {
        (forged.cid, "bad_signature"): f"parent of {cluster.cid}",
        (unsigned.cid, "unsigned"): f"parent of {cluster.cid}",
    }
    # A badly signed node is still hash-verified, so its parents are still walked.
    assert tree.base.cid in graph.nodes and forged.cid in graph.nodes


def test_corrupt_and_foreign_objects(local_store: LocalStore, tree: Tree) -> None:
    corrupt = tree.locals_[1]
    path = local_store.path_of(corrupt.cid)
    path.write_bytes(path.read_bytes().replace(b'"num_samples":20', b'"num_samples":99'))
    not_a_manifest = local_store.put(b'{"hello": "world"}')
    cluster = _save(local_store, "cluster", 60, KeyPair.generate(),
                    parents=[corrupt.cid, not_a_manifest])  # fmt: skip
    graph = walk(local_store, cluster.cid)
    assert {(p.cid, p.reason) for p in graph.problems} == {
        (corrupt.cid, "hash_mismatch"),
        (not_a_manifest, "invalid_manifest"),
    }
    assert all(p.where == f"parent of {cluster.cid}" for p in graph.problems)


def test_weights_are_checked_only_when_asked(local_store: LocalStore, tree: Tree) -> None:
    gone, damaged = tree.locals_[0], tree.clusters[1]
    local_store.delete(gone.weights)
    weights_path = local_store.path_of(damaged.weights)
    data = bytearray(weights_path.read_bytes())
    data[-1] ^= 0x01
    weights_path.write_bytes(bytes(data))
    assert walk(local_store, tree.semi.cid).ok
    graph = verify(local_store, tree.semi.cid)
    assert {(p.cid, p.reason) for p in graph.problems} == {
        (gone.cid, "weights_missing"),
        (damaged.cid, "weights_mismatch"),
    }
    where = {p.cid: p.where for p in graph.problems}
    assert where[damaged.cid] == f"parent of {tree.semi.cid}"


class _LyingStore(LocalStore):
    """Serves some objects under CIDs they do not hash to, skipping verification.

    Honest CIDs cannot form a cycle (a manifest would have to contain its own hash),
    so a cycle can only be built with a store that lies; this is that store.
    """

    def __init__(self, root, aliases: dict[str, str]) -> None:
        super().__init__(root)
        self.aliases = aliases

    def get(self, cid: str) -> bytes:
        if cid in self.aliases:
            return self._read(self.aliases[cid])
        return super().get(cid)


def test_cycles_are_detected(local_store: LocalStore) -> None:
    fake = cid_of(b"the slot the liar fills")
    top = _save(local_store, "cluster", 70, KeyPair.generate(), parents=[fake])
    # What the liar serves as `fake`: a manifest naming `top` as its parent.
    below = _save(local_store, "local", 71, KeyPair.generate(), parents=[top.cid])
    # A manifest that names itself as a parent: served under the CID it names.
    selfish_slot = cid_of(b"self")
    selfish = _save(local_store, "local", 72, KeyPair.generate(), parents=[selfish_slot])
    liar = _LyingStore(local_store.root, {fake: below.cid, selfish_slot: selfish.cid})
    graph = walk(liar, top.cid)
    assert [(p.cid, p.where, p.reason) for p in graph.problems] == [
        (top.cid, f"parent of {fake}", "cycle")
    ]
    assert set(graph.nodes) == {top.cid, fake}
    graph = walk(liar, selfish_slot)
    assert [(p.cid, p.reason) for p in graph.problems] == [(selfish_slot, "cycle")]


def test_follow_base_walks_back_through_rounds_and_across_a_fork(local_store: LocalStore, tree: Tree) -> None:
    """digits: base -> round 1 (tree) -> round 2 trained from its semi-global; a fork of round 2's
    model starts another federation, whose round-1 cluster names only its device update as a parent."""
    operator = KeyPair.generate()
    update_2 = _save(local_store, "local", 40, operator, round=2, base=tree.semi.cid,
                     producer=Producer(role="agent", id="agent-0"))  # fmt: skip
    cluster_2 = _save(local_store, "cluster", 41, operator, round=2, base=tree.semi.cid, parents=[update_2.cid])
    fork = _save(local_store, "fork", 42, operator, round=0, parents=[cluster_2.cid])
    fork_update = _save(local_store, "local", 43, operator, base=fork.cid, producer=Producer(role="agent", id="a"))
    fork_cluster = _save(local_store, "cluster", 44, operator, base=fork.cid, parents=[fork_update.cid])

    assert set(walk(local_store, fork_cluster.cid).nodes) == {fork_cluster.cid, fork_update.cid}
    graph = walk(local_store, fork_cluster.cid, follow_base=True)
    assert graph.ok
    # into the source federation's rounds: round 2, round 1's semi-global, clusters and updates, digits' base
    expected = {fork_cluster.cid, fork_update.cid, fork.cid, cluster_2.cid, update_2.cid, tree.semi.cid, tree.base.cid}
    assert expected | {m.cid for m in tree.clusters + tree.locals_} == set(graph.nodes)
    # the cluster and its update share a base: two edges, one node
    assert graph.bases[fork_cluster.cid] == graph.bases[fork_update.cid] == fork.cid
    assert graph.bases[cluster_2.cid] == tree.semi.cid
    assert (fork_cluster.cid, fork.cid) in graph.edges
    # a base that is also a parent is an ordinary parent edge, not a second one
    assert tree.locals_[0].cid not in graph.bases
    assert graph.depth_reached[tree.base.cid] == 4  # cluster -base-> fork -> cluster_2 -base-> semi -base-> base
    shallow = walk(local_store, fork_cluster.cid, depth=1, follow_base=True)
    assert set(shallow.nodes) == {fork_cluster.cid, fork_update.cid, fork.cid}
    assert set(shallow.truncated) == {fork_update.cid, fork.cid}
