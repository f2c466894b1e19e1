"""Walking a model's ancestry through manifest `parents`, checking every link on the way.

Each node is fetched through the store, which re-hashes it, then parsed and its
signature checked; with `verify_weights` its weights blob is fetched and
checked too. A bad node never stops the walk: it becomes a `Problem` naming the
node, how it was reached and why, and the walk goes on with whatever is left.
The `parents` edges say what a model was made of. A model's `base` says what it
was trained from: the previous round's model, or a federation's start (a task's
initial weights, a fork, a merge). `follow_base` walks those edges too, so a
lineage reaches back through earlier rounds and, across a fork, into the source
federation's rounds; without it `base` is informational.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from proto.errors import IntegrityError, InvalidInput, NotFound
from storage.cid import validate_cid
from storage.codec import CodecError, summarize
from storage.manifest import Manifest
from storage.store import ContentStore

__all__ = ["PROBLEM_REASONS", "LineageGraph", "Problem", "verify", "walk"]

PROBLEM_REASONS = (
    "missing",
    "hash_mismatch",
    "bad_signature",
    "unsigned",
    "invalid_manifest",
    "cycle",
    "weights_missing",
    "weights_mismatch",
)


@dataclass
class Problem:
    """Something wrong with one node of a lineage."""

    cid: str
    where: str  # "root", or "parent of <child cid>" / "base of <child cid>" for the first child that led here
    reason: str  # one of PROBLEM_REASONS
    message: str


@dataclass
class LineageGraph:
    """What a walk found. Nodes are the manifests that could be read; edges run child -> parent
    and may point at CIDs that are not nodes (missing or unreadable ones)."""

    root: str
    nodes: dict[str, Manifest] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    depth_reached: dict[str, int] = field(default_factory=dict)  # shortest distance from root
    truncated: list[str] = field(default_factory=list)  # nodes whose parents the depth limit cut
    bases: dict[str, str] = field(default_factory=dict)  # child -> the base walked (follow_base only)

    @property
    def ok(self) -> bool:
        return not self.problems


def walk(
    store: ContentStore,
    model_cid: str,
    *,
    depth: int | None = None,
    verify_weights: bool = False,
    follow_base: bool = False,
    on_node: Callable[[int, int], None] | None = None,
) -> LineageGraph:
    """Breadth-first over `parents` (and, with `follow_base`, each model's `base`) from
    `model_cid`, at most `depth` edges deep (None: all).

    `on_node(done, found)` is called after each model is read: how many were read, and how
    many the walk has found so far (a progress bar's total grows as the lineage unfolds).

    Raises only for a malformed `model_cid` or a store that fails for reasons other than a
    missing or corrupt object (e.g. Unavailable); everything else is recorded as a Problem.
    """
    validate_cid(model_cid)
    if depth is not None and depth < 0:
        raise InvalidInput("depth must be >= 0 or None", reason="bad_depth")
    graph = LineageGraph(root=model_cid, depth_reached={model_cid: 0})
    where = {model_cid: "root"}
    queue = deque([model_cid])
    done = 0
    while queue:
        cid = queue.popleft()
        try:
            manifest = _read_node(store, cid, where[cid], graph)
            if manifest is None:
                continue
            graph.nodes[cid] = manifest
            _check_signature(manifest, cid, where[cid], graph)
            if verify_weights:
                _check_weights(store, manifest, cid, where[cid], graph)
            level = graph.depth_reached[cid]
            base = manifest.base if follow_base and manifest.base not in (None, *manifest.parents) else None
            if depth is not None and level >= depth:
                if manifest.parents or base:
                    graph.truncated.append(cid)
                continue
            if base:
                graph.bases[cid] = base
            for parent, relation in [*((p, "parent") for p in manifest.parents), *([(base, "base")] if base else [])]:
                graph.edges.append((cid, parent))
                if parent not in graph.depth_reached:
                    graph.depth_reached[parent] = level + 1
                    where[parent] = f"{relation} of {cid}"
                    queue.append(parent)
        finally:
            done += 1
            if on_node is not None:
                on_node(done, len(where))
    _report_cycles(graph)
    return graph


def verify(store: ContentStore, model_cid: str, *, on_node: Callable[[int, int], None] | None = None) -> LineageGraph:
    """The whole lineage, weights included: `walk(..., depth=None, verify_weights=True)`."""
    return walk(store, model_cid, depth=None, verify_weights=True, on_node=on_node)


def _read_node(store: ContentStore, cid: str, where: str, graph: LineageGraph) -> Manifest | None:
    try:
        return Manifest.from_bytes(store.get(cid))
    except NotFound as exc:
        graph.problems.append(Problem(cid, where, "missing", str(exc)))
    except IntegrityError as exc:
        graph.problems.append(Problem(cid, where, "hash_mismatch", str(exc)))
    except InvalidInput as exc:  # ManifestError, or bytes that are not JSON at all
        graph.problems.append(Problem(cid, where, "invalid_manifest", str(exc)))
    return None


def _check_signature(manifest: Manifest, cid: str, where: str, graph: LineageGraph) -> None:
    try:
        manifest.verify_signature()
    except IntegrityError as exc:
        graph.problems.append(Problem(cid, where, exc.reason, str(exc)))


def _check_weights(
    store: ContentStore, manifest: Manifest, cid: str, where: str, graph: LineageGraph
) -> None:
    try:
        weights = store.get(manifest.weights)
        if summarize(weights) != manifest.tensors:
            raise IntegrityError(
                f"weights {manifest.weights} do not hold the tensors the manifest lists",
                reason="weights_mismatch",
            )
    except NotFound:
        graph.problems.append(
            Problem(cid, where, "weights_missing", f"weights {manifest.weights} not in store")
        )
    except (IntegrityError, CodecError) as exc:
        graph.problems.append(Problem(cid, where, "weights_mismatch", str(exc)))


def _report_cycles(graph: LineageGraph) -> None:
    """Report every edge that closes a cycle (a parent that is also a descendant).

    Honest CIDs cannot form a cycle, since a manifest would have to contain its own hash;
    finding one means a store served bytes under a CID they do not hash to.
    """
    children_to_parents: dict[str, list[str]] = {}
    for child, parent in graph.edges:
        children_to_parents.setdefault(child, []).append(parent)
    on_path: set[str] = set()
    done: set[str] = set()
    # Iterative DFS: each stack entry is (node, iterator over its parents).
    stack = [(graph.root, iter(children_to_parents.get(graph.root, ())))]
    on_path.add(graph.root)
    while stack:
        node, parents = stack[-1]
        parent = next(parents, None)
        if parent is None:
            stack.pop()
            on_path.discard(node)
            done.add(node)
        elif parent in on_path:
            graph.problems.append(
                Problem(
                    parent,
                    f"parent of {node}",
                    "cycle",
                    f"{parent} is listed as a parent of its own descendant {node}",
                )
            )
        elif parent not in done:
            on_path.add(parent)
            stack.append((parent, iter(children_to_parents.get(parent, ()))))
