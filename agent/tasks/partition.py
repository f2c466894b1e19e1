"""Deterministic, non-IID partitioning of a labelled training set across simulated clients.

Every client computes the *whole* assignment from the same (labels, scheme, alpha, count,
seed) and keeps its own slice, so clients never coordinate yet their slices are disjoint
and together cover the data.

Schemes:
- ``iid``: a random permutation cut into ``count`` near-equal parts.
- ``dirichlet``: for each class, its samples are split across clients by proportions drawn
  from Dirichlet(alpha). Small alpha (0.1) gives each client a few dominant classes; large
  alpha (100) approaches IID. Draws are repeated until every client holds at least
  ``min(10, n // count)`` samples; if that keeps failing, the largest clients top up the
  smallest ones, so no client is ever empty.
- ``shards``: sort by label, cut into ``count * shards_per_client`` equal shards, and deal
  each client ``shards_per_client`` random shards (McMahan et al.'s pathological split).

Two-level split (``groups``/``group``), for "3 aggregators x 10 agents" experiments: the
data is first split into ``groups`` parts by a class-skewed Dirichlet(``group_alpha``,
default ``alpha``) -- so each aggregator's population sees a different class mix -- and
then part ``group`` is split among its ``count`` clients with ``scheme``. The
``groups * count`` slices are disjoint and cover the data.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from proto.errors import InvalidInput

Scheme = Literal["dirichlet", "shards", "iid"]
SCHEMES: tuple[str, ...] = ("dirichlet", "shards", "iid")

_MAX_DIRICHLET_DRAWS = 100
_MIN_CLIENT_SAMPLES = 10

# Stream tags keep the random draws of each level independent of each other.
_TAG_FLAT = 0
_TAG_GROUPS = 1
_TAG_WITHIN_GROUP = 2


def partition_indices(
    labels: np.ndarray,
    *,
    scheme: Scheme = "dirichlet",
    alpha: float = 0.5,
    index: int,
    count: int,
    seed: int = 0,
    shards_per_client: int = 2,
    groups: int | None = None,
    group: int | None = None,
    group_alpha: float | None = None,
) -> np.ndarray:
    """Return the sorted indices (into ``labels``) held by client ``index`` of ``count``.

    With ``groups`` set, ``group`` selects which group's data is split among its
    ``count`` clients (see the module docstring).
    """
    labels = _check_labels(labels)
    _check_client(index, count)
    if groups is None:
        if group not in (None, 0):
            raise InvalidInput("partition: 'group' given without 'groups'", reason="bad_partition")
        owner = client_owners(
            labels, scheme=scheme, alpha=alpha, count=count, seed=seed,
            shards_per_client=shards_per_client, _tag=(_TAG_FLAT,),
        )
        return np.flatnonzero(owner == index)

    if group is None:
        raise InvalidInput("partition: 'groups' given without 'group'", reason="bad_partition")
    _check_client(group, groups, what="group")
    group_owner = client_owners(
        labels, scheme="dirichlet", alpha=alpha if group_alpha is None else group_alpha,
        count=groups, seed=seed, _tag=(_TAG_GROUPS,),
    )
    members = np.flatnonzero(group_owner == group)
    owner = client_owners(
        labels[members], scheme=scheme, alpha=alpha, count=count, seed=seed,
        shards_per_client=shards_per_client, _tag=(_TAG_WITHIN_GROUP, group),
    )
    return members[owner == index]


def client_owners(
    labels: np.ndarray,
    *,
    scheme: Scheme = "dirichlet",
    alpha: float = 0.5,
    count: int,
    seed: int = 0,
    shards_per_client: int = 2,
    _tag: tuple[int, ...] = (_TAG_FLAT,),
) -> np.ndarray:
    """Return, for every sample, the client (0..count-1) that holds it (single-level split)."""
    labels = _check_labels(labels)
    _check_client(0, count)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvalidInput(f"partition: seed must be a non-negative int, got {seed!r}", reason="bad_partition")
    n = labels.shape[0]
    if n < count:
        raise InvalidInput(f"partition: {n} samples cannot be split among {count} clients", reason="partition_too_small")
    rng = np.random.default_rng([int(seed), *_tag])
    if scheme == "iid":
        return _iid_owner(n, count, rng)
    if scheme == "shards":
        return _shards_owner(labels, count, int(shards_per_client), rng)
    if scheme == "dirichlet":
        if not alpha > 0 or not np.isfinite(alpha):
            raise InvalidInput(f"partition: alpha must be > 0, got {alpha!r}", reason="bad_partition")
        return _dirichlet_owner(labels, float(alpha), count, rng)
    raise InvalidInput(f"partition: unknown scheme {scheme!r}; expected one of {SCHEMES}", reason="bad_partition")


def _iid_owner(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.repeat(np.arange(count), _even_sizes(n, count))
    return owner


def _shards_owner(labels: np.ndarray, count: int, per_client: int, rng: np.random.Generator) -> np.ndarray:
    n = labels.shape[0]
    if per_client < 1:
        raise InvalidInput("partition: shards_per_client must be >= 1", reason="bad_partition")
    n_shards = count * per_client
    if n < n_shards:
        raise InvalidInput(f"partition: {n} samples cannot make {n_shards} shards", reason="partition_too_small")
    # Shuffle first so that ties within a class are broken randomly, then sort by label.
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shard_owner = np.empty(n_shards, dtype=np.int64)
    shard_owner[rng.permutation(n_shards)] = np.arange(n_shards) // per_client
    owner = np.empty(n, dtype=np.int64)
    owner[by_label] = np.repeat(shard_owner, _even_sizes(n, n_shards))
    return owner


def _dirichlet_owner(labels: np.ndarray, alpha: float, count: int, rng: np.random.Generator) -> np.ndarray:
    n = labels.shape[0]
    by_label = np.argsort(labels, kind="stable")
    classes, class_starts = np.unique(labels[by_label], return_index=True)
    class_bounds = np.append(class_starts, n)
    min_size = min(_MIN_CLIENT_SAMPLES, n // count)
    owner = np.empty(n, dtype=np.int64)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        for c in range(classes.shape[0]):
            members = rng.permutation(by_label[class_bounds[c]:class_bounds[c + 1]])
            proportions = rng.dirichlet(np.full(count, alpha))
            if not np.all(np.isfinite(proportions)):
                # Extremely small alpha can underflow; the limit is "one client gets the class".
                proportions = np.eye(count)[rng.integers(count)]
            cuts = np.floor(np.cumsum(proportions)[:-1] * members.shape[0]).astype(np.int64)
            sizes = np.diff(np.concatenate(([0], cuts, [members.shape[0]])))
            owner[members] = np.repeat(np.arange(count), sizes)
        if np.bincount(owner, minlength=count).min() >= min_size:
            return owner
    _top_up(owner, count, min_size)
    return owner


def _top_up(owner: np.ndarray, count: int, min_size: int) -> None:
    """Move samples from the largest clients to those below ``min_size`` (loop is over clients)."""
    sizes = np.bincount(owner, minlength=count)
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            moved = np.flatnonzero(owner == donor)[: min(min_size - sizes[client], sizes[donor] - min_size)]
            owner[moved] = client
            sizes[donor] -= moved.shape[0]
            sizes[client] += moved.shape[0]


def _even_sizes(n: int, parts: int) -> np.ndarray:
    return n // parts + (np.arange(parts) < n % parts).astype(np.int64)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(
            f"partition: labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}",
            reason="bad_partition",
        )
    return labels


def _check_client(index: int, count: int, *, what: str = "client") -> None:
    for name, value in (("index", index), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvalidInput(f"partition: {what} {name} must be an int, got {value!r}", reason="bad_partition")
    if count < 1 or not 0 <= index < count:
        raise InvalidInput(f"partition: {what} index {index} is not in [0, {count})", reason="bad_partition")
