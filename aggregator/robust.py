"""Robust aggregation rules that need every update at once, with memory bounded by a slice.

Rules (one implementation each; the numerics are the module-level kernels below):

- ``median``: coordinate-wise median (unweighted, as Flower's FedMedian). Median and trimmed
  mean sort a (K, slice) scratch stack in place with numpy, which keeps no index array.
- ``trimmed_mean`` (``beta``): drop the ⌊beta·K⌋ largest and smallest values of each
  coordinate, average the rest (unweighted, as Flower's FedTrimmedAvg).
- ``krum`` / ``multi_krum`` (``f``, ``m``): score each update by the summed squared distance
  to its K−f−2 nearest others, keep the m best (krum: m = 1) and average them by weight.
- ``geomed`` (``iterations``, ``nu``): the weighted geometric median by smoothed Weiszfeld
  (RFA, Pillutla et al.) with a fixed iteration budget.
- ``clipped_fedavg`` (``tau``): each update's change against the base is clipped to
  tau × the median change norm of the round, then averaged by weight.
- ``bulyan`` (``f``): El Mhamdi et al. 2018. Choose θ = K − 2f updates one at a time by Krum
  over those left, then per coordinate average the β = θ − 2f chosen values closest to their
  median (unweighted, as Flower's Bulyan). It needs K ≥ 4f + 3; with fewer updates it runs
  with the largest f that fits (recorded), down to f = 0, the plain mean.

Memory. An aggregation does not keep the updates: `add` records each update's CID and
weight, and `result` reads them back from the store, tensor by tensor and in slices of a
tensor, through a read-only memory map whose pages are dropped after each slice. Peak
memory is O(K × slice + model). Every blob is re-hashed against its CID before any of its
bytes count (the store's rule: every read re-checks the hash).

Distances. Krum and the geometric median need ‖xᵢ − xⱼ‖ and ‖z − xᵢ‖ for z a weighted
combination of the updates. Both follow from the K×K Gram matrix of the changes
dᵢ = xᵢ − base, accumulated in one streaming pass (each slice's block by BLAS in the model's
float type, the blocks summed in float64) (‖dᵢ − dⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ;
for z = Σ cⱼ dⱼ, ‖z − dᵢ‖² = cᵀGc − 2(Gc)ᵢ + Gᵢᵢ). So Weiszfeld iterates in K×K space, and a
second pass combines the updates with the final coefficients. A tensor an update did not
train counts as an unchanged one (dᵢ = 0) in the distances; in the combination, as in
FedAvg, each tensor is averaged over the updates that carry it.

Without a store (peer cluster models in synthesis, tests), the tensors handed to `add` are
kept in memory and read the same way.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregator.strategies import (
    Aggregation,
    AggregationError,
    Strategy,
    TensorDict,
    _accumulator_dtype,
    check_compatible,
    check_weight,
)
from proto.errors import InvalidInput
from storage.codec import decode_tensors
from storage.store import ContentStore, LocalStore

# one slice of K updates is at most about this many bytes of float64 (Gram pass) / float32
SLICE_BUDGET_BYTES = 64 << 20
_MIN_SLICE_ELEMENTS = 1 << 14

# ------------------------------------------------------------------ kernels (pure, no I/O)


def coordinate_median(stack: np.ndarray) -> np.ndarray:
    """Median over axis 0 of a (K, S) stack (the mean of the two middle values when K is even).
    Sorts `stack` in place: the caller's scratch buffer, never an input."""
    stack.sort(axis=0)
    k = stack.shape[0]
    return (stack[(k - 1) // 2] + stack[k // 2]) / 2


def trimmed_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """Mean over axis 0 of a (K, S) stack after dropping the ⌊beta·K⌋ smallest and largest values
    of each coordinate. Sorts `stack` in place (the caller's scratch buffer)."""
    stack.sort(axis=0)
    k = stack.shape[0]
    cut = trim_count(k, beta)
    return stack[cut : k - cut].mean(axis=0, dtype=np.float64)


def trim_count(k: int, beta: float) -> int:
    """How many values trimmed_mean drops at each end; always leaves at least one."""
    return min(int(math.floor(beta * k)), (k - 1) // 2)


def pairwise_squared_distances(gram: np.ndarray) -> np.ndarray:
    """‖dᵢ − dⱼ‖² from the Gram matrix of the dᵢ (clamped at 0 against rounding)."""
    diagonal = np.diag(gram)
    return np.maximum(diagonal[:, None] + diagonal[None, :] - 2 * gram, 0.0)


def krum_scores(distances: np.ndarray, f: int) -> np.ndarray:
    """Each update's summed squared distance to its K − f − 2 nearest others (at least one)."""
    k = distances.shape[0]
    if k == 1:
        return np.zeros(1)
    closest = max(1, k - f - 2)
    others = distances + np.diag(np.full(k, np.inf))  # never count oneself
    return np.sort(others, axis=1)[:, :closest].sum(axis=1)


def krum_select(distances: np.ndarray, f: int, m: int) -> list[int]:
    """The indices of the m best Krum scores, best first (ties: the earlier update)."""
    scores = krum_scores(distances, f)
    return [int(i) for i in np.argsort(scores, kind="stable")[: max(1, min(m, len(scores)))]]


def weiszfeld(gram: np.ndarray, weights: np.ndarray, *, iterations: int, nu: float) -> tuple[np.ndarray, list[float]]:
    """Smoothed Weiszfeld in coefficient space: c with z = Σ cᵢ dᵢ ≈ the weighted geometric median.

    Starts from the weighted mean; each step sets βᵢ = αᵢ / max(nu, ‖z − dᵢ‖) and c = β / Σβ.
    Returns the coefficients (summing to 1) and the objective Σ αᵢ‖z − dᵢ‖ after each step.
    """
    alpha = np.asarray(weights, np.float64) / float(np.sum(weights))
    coefficients = alpha.copy()
    objective: list[float] = []
    for _ in range(iterations):
        distances = _distances_to_combination(gram, coefficients)
        beta = alpha / np.maximum(nu, distances)
        coefficients = beta / beta.sum()
        objective.append(float(alpha @ _distances_to_combination(gram, coefficients)))
    return coefficients, objective


def _distances_to_combination(gram: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    gc = gram @ coefficients
    return np.sqrt(np.maximum(coefficients @ gc - 2 * gc + np.diag(gram), 0.0))


def clip_scales(norms: np.ndarray, tau: float) -> tuple[np.ndarray, float]:
    """Per-update factors min(1, tau × median norm / normᵢ), and the clip bound itself."""
    bound = tau * float(np.median(norms))
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > bound, bound / safe, 1.0), bound


def bulyan_f(k: int, f: int) -> int:
    """The largest f' ≤ f with k ≥ 4f' + 3 (Bulyan's condition), 0 below 7 updates."""
    return max(0, min(f, (k - 3) // 4))


def bulyan_select(distances: np.ndarray, f: int) -> list[int]:
    """θ = K − 2f indices, each the best Krum score among the updates not yet chosen, in choice order."""
    k = distances.shape[0]
    remaining = list(range(k))
    chosen: list[int] = []
    while len(chosen) < max(1, k - 2 * f):
        scores = krum_scores(distances[np.ix_(remaining, remaining)], f)
        best = remaining[int(np.argmin(scores))]  # ties: the earlier update
        chosen.append(best)
        remaining.remove(best)
    return chosen


def mean_around_median(stack: np.ndarray, beta: int) -> np.ndarray:
    """Per coordinate of a (K, S) stack, the mean of the beta values closest to the median.

    Sorts `stack` in place (the caller's scratch buffer). In sorted order the beta values closest
    to the median are a run of beta neighbours, the run whose farther end is nearest to it; so
    the K − beta + 1 runs are compared with no index array (unlike an argpartition), their sums
    slid along in one float64 buffer, and every temporary is one row long."""
    stack.sort(axis=0)
    k, size = stack.shape
    beta = max(1, min(beta, k))
    median = stack[(k - 1) // 2] + stack[k // 2]
    median *= 0.5
    best = np.full(size, np.inf, dtype=stack.dtype)
    spread = np.empty(size, dtype=stack.dtype)
    other = np.empty(size, dtype=stack.dtype)
    closer = np.empty(size, dtype=bool)
    window = stack[:beta].sum(axis=0, dtype=np.float64)  # the run starting at 0; slid below
    result = np.empty(size, dtype=np.float64)
    for start in range(k - beta + 1):
        if start:
            window -= stack[start - 1]
            window += stack[start + beta - 1]
        np.subtract(median, stack[start], out=spread)
        np.subtract(stack[start + beta - 1], median, out=other)
        np.maximum(spread, other, out=spread)
        np.less(spread, best, out=closer)
        np.copyto(best, spread, where=closer)
        np.copyto(result, window, where=closer)
    result /= beta
    return result


# ------------------------------------------------------------------ reading updates back


@dataclass(frozen=True, kw_only=True)
class _Entry:
    label: str  # the update's model CID (or a peer's), for the manifest's record
    weight: float
    names: frozenset[str]
    weights_cid: str = ""
    tensors: Mapping[str, np.ndarray] | None = None  # kept only when there is no store


class _Opened:
    """One update's tensors as read-only views of a memory map (or of the arrays kept)."""

    def __init__(self, entry: _Entry, path: Path | None) -> None:
        self._map: mmap.mmap | None = None
        if entry.tensors is not None:
            self.tensors: Mapping[str, np.ndarray] = entry.tensors
            return
        assert path is not None
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.tensors = decode_tensors(self._map, writable=False)

    def drop_pages(self) -> None:
        """Forget the pages read so far (the file stays; the next read maps them back in)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._map is not None:
            self.tensors = {}
            with contextlib.suppress(BufferError):  # views still alive: the map goes with them
                self._map.close()
            self._map = None


class _Updates:
    """The round's updates, opened for reading slice by slice; a context manager."""

    def __init__(self, entries: list[_Entry], store: ContentStore | None) -> None:
        self.entries = entries
        self._store = store
        self._spooled: list[str] = []
        self.opened: list[_Opened] = []

    def __enter__(self) -> _Updates:
        try:
            for entry in self.entries:
                self.opened.append(_Opened(entry, self._path(entry) if entry.tensors is None else None))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for opened in self.opened:
            opened.close()
        self.opened = []
        for path in self._spooled:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _path(self, entry: _Entry) -> Path:
        """A file holding the blob, hash-verified: a local store's own file after one streaming
        check, else a temporary copy written from the store's verified stream."""
        assert self._store is not None
        if isinstance(self._store, LocalStore) and self._store.has(entry.weights_cid):
            for _ in self._store.iter_chunks(entry.weights_cid):
                pass  # IntegrityError at the end if the bytes no longer hash to the CID
            return self._store.path_of(entry.weights_cid)
        fd, path = tempfile.mkstemp(prefix="strata-robust-")
        self._spooled.append(path)
        with os.fdopen(fd, "wb") as out:
            for chunk in self._store.iter_chunks(entry.weights_cid):
                out.write(chunk)
        return Path(path)

    def holders(self, name: str) -> list[int]:
        return [i for i, entry in enumerate(self.entries) if name in entry.names]

    def slice(self, index: int, name: str, start: int, stop: int) -> np.ndarray:
        return self.opened[index].tensors[name].reshape(-1)[start:stop]

    def drop_pages(self, index: int | None = None) -> None:
        for opened in self.opened if index is None else [self.opened[index]]:
            opened.drop_pages()


def _torch(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor over the array's memory (converted only when `dtype` is given and differs)."""
    # read-only views of a map are only read here; torch would warn that it could write
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if dtype is None else tensor.to(dtype)


def _slices(size: int, k: int, itemsize: int = 8) -> Iterator[tuple[int, int]]:
    step = max(_MIN_SLICE_ELEMENTS, SLICE_BUDGET_BYTES // max(1, k * itemsize))
    for start in range(0, size, step):
        yield start, min(size, start + step)


def _cast(values: torch.Tensor, like: np.ndarray) -> np.ndarray:
    array = values.numpy()
    if like.dtype.kind in "iub":
        array = np.rint(array)
    return array.astype(like.dtype, copy=False)


# ------------------------------------------------------------------ the aggregation template


class RobustAggregation(Aggregation):
    """Records the updates as they arrive; the rule runs over them, read back, in `result`."""

    def __init__(self, strategy: RobustStrategy, base: Mapping[str, np.ndarray], store: ContentStore | None) -> None:
        self._strategy = strategy
        self._base = base
        self._store = store
        self._entries: list[_Entry] = []
        self._finished = False
        self._report: dict[str, Any] = {}

    @property
    def count(self) -> int:
        return len(self._entries)

    def add(self, update: Mapping[str, np.ndarray], weight: float, *, label: str = "", weights_cid: str = "") -> None:
        if self._finished:
            raise AggregationError("this aggregation already gave its result", reason="aggregation_finished")
        weight = check_weight(weight)
        check_compatible(self._base, update)
        stored = self._store is not None and bool(weights_cid)
        self._entries.append(
            _Entry(
                label=label or f"#{len(self._entries)}",
                weight=weight,
                names=frozenset(update),
                weights_cid=weights_cid if stored else "",
                tensors=None if stored else dict(update),
            )
        )

    def result(self) -> TensorDict:
        if self._finished:
            raise AggregationError("this aggregation already gave its result", reason="aggregation_finished")
        self._finished = True
        if not self._entries:
            return {name: np.array(array, copy=True) for name, array in self._base.items()}
        with _Updates(self._entries, self._store) as updates:
            return self._strategy.combine(self._base, updates, self._report)

    def report(self) -> dict[str, Any]:
        """What the rule did to individual updates (refused, down-weighted), for the manifest."""
        return dict(self._report)


class RobustStrategy(Strategy):
    """A rule over all of a round's updates at once; subclasses implement `combine`."""

    def start(self, base: Mapping[str, np.ndarray], *, store: ContentStore | None = None) -> Aggregation:
        return RobustAggregation(self, base, store)

    def combine(self, base: Mapping[str, np.ndarray], updates: _Updates, report: dict[str, Any]) -> TensorDict:
        raise NotImplementedError


# ------------------------------------------------------------------ per-coordinate rules


class _Coordinatewise(RobustStrategy):
    """Rules that look at each coordinate's K values alone: one pass, slice by slice."""

    def kernel(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def combine(self, base: Mapping[str, np.ndarray], updates: _Updates, report: dict[str, Any]) -> TensorDict:
        return _coordinatewise(base, updates, self.kernel)


def _coordinatewise(
    base: Mapping[str, np.ndarray],
    updates: _Updates,
    kernel: Callable[[np.ndarray], np.ndarray],
    among: Collection[int] | None = None,
) -> TensorDict:
    """Per tensor and slice, `kernel` over the (K, S) stack of the updates that carry it (only
    those in `among` when given); a tensor none of them carries keeps its base value."""
    out: TensorDict = {}
    for name in sorted(base):
        reference = base[name]
        holders = [i for i in updates.holders(name) if among is None or i in among]
        if not holders:
            out[name] = np.array(reference, copy=True)
            continue
        dtype = np.float32 if _accumulator_dtype(reference.dtype) == torch.float32 else np.float64
        result = np.empty(reference.size, dtype=dtype)
        # one (K, S) scratch stack per slice, filled row by row and sorted in place (numpy's
        # vectorized sort along axis 0 of a few dozen rows; no index array, unlike torch.sort)
        for start, stop in _slices(reference.size, len(holders), np.dtype(dtype).itemsize):
            stack = np.empty((len(holders), stop - start), dtype=dtype)
            for row, i in enumerate(holders):
                stack[row] = updates.slice(i, name, start, stop)
                updates.drop_pages(i)
            result[start:stop] = kernel(stack)
            del stack
        out[name] = _cast(torch.from_numpy(result), reference).reshape(reference.shape)
    return out


class Median(_Coordinatewise):
    """Coordinate-wise median (Yin et al. 2018); sample counts do not weigh in."""

    name = "median"

    def kernel(self, stack: np.ndarray) -> np.ndarray:
        return coordinate_median(stack)


class TrimmedMean(_Coordinatewise):
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018); sample counts do not weigh in."""

    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise InvalidInput(f"trimmed_mean beta must be in [0, 0.5), got {beta!r}", reason="bad_config")
        self.beta = float(beta)

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def kernel(self, stack: np.ndarray) -> np.ndarray:
        return trimmed_mean(stack, self.beta)

    def combine(self, base: Mapping[str, np.ndarray], updates: _Updates, report: dict[str, Any]) -> TensorDict:
        report["trimmed_per_side"] = trim_count(len(updates.entries), self.beta)
        return super().combine(base, updates, report)


# ------------------------------------------------------------------ rules over whole updates


def _gram(base: Mapping[str, np.ndarray], updates: _Updates, *, diagonal_only: bool = False) -> np.ndarray:
    """Gram matrix (or only its diagonal, the squared norms) of the changes dᵢ = xᵢ − base, in float64."""
    k = len(updates.entries)
    gram = torch.zeros((k, k), dtype=torch.float64)
    norms = torch.zeros(k, dtype=torch.float64)
    for name in sorted(base):
        reference = base[name]
        holders = updates.holders(name)
        if not holders or reference.dtype.kind not in "fiu":
            continue
        flat = reference.reshape(-1)
        # changes stay in the tensor's float type and each slice's products are summed by BLAS in it
        # (float32 for float32 models: twice the speed of float64); slices are summed in float64
        work = torch.float32 if reference.dtype == np.float32 else torch.float64
        for start, stop in _slices(reference.size, len(holders), torch.finfo(work).bits // 8):
            origin = _torch(flat[start:stop], work)
            changes = torch.empty((len(holders), stop - start), dtype=work)
            for row, i in enumerate(holders):
                torch.sub(_torch(updates.slice(i, name, start, stop), work), origin, out=changes[row])
                updates.drop_pages(i)
            index = torch.tensor(holders)
            if diagonal_only:
                norms.index_add_(0, index, torch.linalg.vector_norm(changes, dim=1).to(torch.float64) ** 2)
            else:
                block = (changes @ changes.T).to(torch.float64)
                gram[index.unsqueeze(1), index.unsqueeze(0)] += block
            del changes
    return norms.numpy() if diagonal_only else gram.numpy()


def _combine_with(
    base: Mapping[str, np.ndarray], updates: _Updates, coefficients: np.ndarray, *, scales: np.ndarray | None = None
) -> TensorDict:
    """Per tensor: base + Σ cᵢ sᵢ (xᵢ − base) / Σ cᵢ over the updates that carry it (s = 1 unless clipping).

    With s = 1 this is the cᵢ-weighted average of those updates."""
    out: TensorDict = {}
    scales = np.ones(len(coefficients)) if scales is None else scales
    for name in sorted(base):
        reference = base[name]
        holders = [i for i in updates.holders(name) if coefficients[i] > 0]
        total = float(sum(coefficients[i] for i in holders))
        if not holders or total <= 0:
            out[name] = np.array(reference, copy=True)
            continue
        dtype = _accumulator_dtype(reference.dtype)
        flat = reference.reshape(-1)
        result = torch.empty(reference.size, dtype=dtype)
        # only the accumulator and one update's slice live at once: the slices can be long
        factors = [float(coefficients[i] * scales[i] / total) for i in holders]
        for start, stop in _slices(reference.size, 4, torch.finfo(dtype).bits // 8):
            # base + Σ fᵢ (xᵢ − base) = (1 − Σ fᵢ) base + Σ fᵢ xᵢ: one fused pass over each update's slice
            accumulator = _torch(flat[start:stop], dtype) * (1.0 - sum(factors))
            for i, factor in zip(holders, factors, strict=True):
                accumulator.add_(_torch(updates.slice(i, name, start, stop)), alpha=factor)
                updates.drop_pages(i)
            result[start:stop] = accumulator
        out[name] = _cast(result, reference).reshape(reference.shape)
    return out


class MultiKrum(RobustStrategy):
    """Multi-Krum (Blanchard et al. 2017): average, by weight, the m updates with the best Krum scores."""

    name = "multi_krum"

    def __init__(self, *, f: int = 1, m: int = 0) -> None:
        """f: the attackers tolerated; m: updates kept (0: K − f)."""
        if int(f) != f or f < 0 or int(m) != m or m < 0:
            raise InvalidInput(f"{self.name} needs integers f >= 0 and m >= 0, got f={f!r}, m={m!r}", reason="bad_config")
        self.f, self.m = int(f), int(m)

    def params(self) -> dict[str, Any]:
        return {"f": self.f, "m": self.m}

    def kept(self, k: int) -> int:
        return self.m if self.m > 0 else max(1, k - self.f)

    def combine(self, base: Mapping[str, np.ndarray], updates: _Updates, report: dict[str, Any]) -> TensorDict:
        entries = updates.entries
        distances = pairwise_squared_distances(_gram(base, updates))
        scores = krum_scores(distances, self.f)
        chosen = krum_select(distances, self.f, self.kept(len(entries)))
        weights = np.zeros(len(entries))
        for i in chosen:
            weights[i] = entries[i].weight
        report["selected"] = [entries[i].label for i in chosen]
        report["refused"] = [
            {"cid": e.label, "reason": "krum_not_selected", "message": f"Krum score {scores[i]:.4g} not among the {len(chosen)} best"}
            for i, e in enumerate(entries)
            if i not in chosen
        ]
        return _combine_with(base, updates, weights)


class Krum(MultiKrum):
    """Krum (Blanchard et al. 2017): the one update with the best score."""

    name = "krum"

    def __init__(self, *, f: int = 1) -> None:
        super().__init__(f=f, m=1)

    def params(self) -> dict[str, Any]:
        return {"f": self.f}


class GeometricMedian(RobustStrategy):
    """RFA (Pillutla et al. 2022): the weighted geometric median by smoothed Weiszfeld."""

    name = "geomed"

    def __init__(self, *, iterations: int = 10, nu: float = 1e-6) -> None:
        if int(iterations) != iterations or not 1 <= iterations <= 1000 or not (math.isfinite(nu) and nu > 0):
            raise InvalidInput(f"geomed needs 1 <= iterations <= 1000 and nu > 0, got {iterations!r}, {nu!r}", reason="bad_config")
        self.iterations, self.nu = int(iterations), float(nu)

    def params(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "nu": self.nu}

    def combine(self, base: Mapping[str, np.ndarray], updates: _Updates, report: dict[str, Any]) -> TensorDict:
        entries = updates.entries
        weights = np.array([e.weight for e in entries])
        coefficients, objective = weiszfeld(_gram(base, updates), weights, iterations=self.iterations, nu=self.nu)
        report["objective"] = objective[-1] if objective else 0.0
        # each update's share of the median (its weight's share would be weights / sum(weights))
        report["coefficients"] = {e.label: round(float(c), 6) for e, c in zip(entries, coefficients, strict=True)}
        return _combine_with(base, updates, coefficients)


class ClippedFedAvg(RobustStrategy):
    """FedAvg of the changes, each clipped to tau × the round's median change norm."""

    name = "clipped_fedavg"

    def __init__(self, *, tau: float = 2.0) -> None:
        if not (math.isfinite(tau) and tau > 0):
            raise InvalidInput(f"clipped_fedavg tau must be > 0, got {tau!r}", reason="bad_config")
        self.tau = float(tau)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def combine(self, base: Mapping[str, np.ndarray], updates: _Updates, report: dict[str, Any]) -> TensorDict:
        entries = updates.entries
        norms = np.sqrt(_gram(base, updates, diagonal_only=True))
        scales, bound = clip_scales(norms, self.tau)
        report["clip_bound"] = bound
        report["down_weighted"] = [
            {"cid": e.label, "factor": round(float(s), 6), "norm": float(n)}
            for e, s, n in zip(entries, scales, norms, strict=True)
            if s < 1
        ]
        return _combine_with(base, updates, np.array([e.weight for e in entries]), scales=scales)


class Bulyan(RobustStrategy):
    """Bulyan (El Mhamdi et al. 2018): Krum chooses θ = K − 2f updates one by one, then each
    coordinate averages the θ − 2f chosen values closest to their median. Unweighted: sample
    counts do not weigh in. Memory: one Gram pass and one coordinate-wise pass, slice by slice."""

    name = "bulyan"

    def __init__(self, *, f: int = 1) -> None:
        """f: the attackers tolerated (Bulyan needs K ≥ 4f + 3 updates; fewer lower f for that round)."""
        if int(f) != f or f < 0:
            raise InvalidInput(f"bulyan needs an integer f >= 0, got f={f!r}", reason="bad_config")
        self.f = int(f)

    def params(self) -> dict[str, Any]:
        return {"f": self.f}

    def combine(self, base: Mapping[str, np.ndarray], updates: _Updates, report: dict[str, Any]) -> TensorDict:
        entries = updates.entries
        f = bulyan_f(len(entries), self.f)
        if f > 0:
            distances = pairwise_squared_distances(_gram(base, updates))
            chosen = bulyan_select(distances, f)
        else:  # nothing to choose between: every update, and the mean around the median is the mean
            chosen = list(range(len(entries)))
        report["f_used"] = f
        report["selected"] = [entries[i].label for i in chosen]
        report["refused"] = [
            {"cid": e.label, "reason": "bulyan_not_selected", "message": f"not among the {len(chosen)} chosen by Krum (f={f})"}
            for i, e in enumerate(entries)
            if i not in chosen
        ]
        # per tensor, the values averaged are the θ' − 2f closest to the median of the θ' chosen that carry it
        return _coordinatewise(base, updates, lambda stack: mean_around_median(stack, stack.shape[0] - 2 * f), set(chosen))


ROBUST_STRATEGIES: dict[str, type[RobustStrategy]] = {
    rule.name: rule for rule in (Median, TrimmedMean, Krum, MultiKrum, GeometricMedian, ClippedFedAvg, Bulyan)
}
