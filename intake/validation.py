"""Validation of a device update before it is accepted: every refusal has its own reason code.

The checks run cheapest first: size, then the safetensors header, then names,
shapes and dtypes against the base, then the data (finite values, then the
L2-norm bound on the change). Nothing here touches the store or the journal.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from proto.errors import Refusal, UpdateRefused
from storage.cid import cid_of
from storage.codec import CodecError, decode_tensors, summarize
from storage.control import MAX_DELTA_NORM
from storage.encodings import FLOAT32, Encoding, EncodingError, decode_update


@dataclass(frozen=True, kw_only=True)
class UpdateLimits:
    max_update_bytes: int
    # ||update - base|| <= max_relative_norm * max(||base||, 1); None disables the check
    max_relative_norm: float | None


def check_size(size: int, limits: UpdateLimits) -> None:
    if size > limits.max_update_bytes:
        raise UpdateRefused(
            f"update is {size} bytes; the limit is {limits.max_update_bytes}", reason=Refusal.TOO_LARGE
        )


def mismatch(
    base: Mapping[str, np.ndarray], tensors: Mapping[str, Any], *, expected: Collection[str] | None = None
) -> str | None:
    """Why `tensors` cannot be combined with `base`, or None: the one compatibility rule.

    Names: exactly `expected` (which must be base tensors), or, with `expected`
    None, any non-empty subset of the base (a partial update). Then each tensor's
    shape, and its dtype when it carries a numpy one (a safetensors header summary
    does not, so its dtypes are checked once decoded).
    """
    if expected is not None:
        unknown = sorted(set(expected) - set(base))
        if unknown:
            return f"declared tensors not in the base model: {unknown[:5]}"
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            return f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}"
    else:
        unknown = sorted(set(tensors) - set(base))
        if unknown:
            return f"tensors not in the base model: {unknown[:5]}"
        if not tensors:
            return "no tensors"
    for name, tensor in tensors.items():
        reference = base[name]
        if tuple(tensor.shape) != tuple(reference.shape):
            return f"tensor {name!r}: shape {tuple(tensor.shape)} != base {tuple(reference.shape)}"
        dtype = getattr(tensor, "dtype", None)
        if isinstance(dtype, np.dtype) and dtype != reference.dtype:
            return f"tensor {name!r}: dtype {dtype} != base {reference.dtype}"
    return None


def non_finite(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The first floating tensor holding NaN or an infinity, as a message; None when all are finite."""
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return f"tensor {name!r} contains NaN or infinite values"
    return None


def validate_update(
    weights: bytes,
    *,
    base: Mapping[str, np.ndarray],
    declared_tensors: list[str] | tuple[str, ...],
    limits: UpdateLimits,
    base_squared_norms: Mapping[str, float] | None = None,
    encoding: Encoding = FLOAT32,
    delta_base: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Check an update's bytes against its base and return its tensors.

    `declared_tensors` is the header's list of included tensors; empty means all of
    the base's. Raises UpdateRefused with the reason of the first failed check. The returned
    arrays are read-only views of `weights` (float32), or the decoded full weights (an encoded
    delta, decoded against `delta_base`, the update's own base, default `base`, before any
    other check). `base_squared_norms` (see `squared_norms`) saves measuring the base again for
    every update.
    """
    check_size(len(weights), limits)
    try:
        summary = summarize(weights)
    except CodecError as exc:
        raise UpdateRefused(str(exc), reason=Refusal.INVALID_SAFETENSORS) from None
    expected = declared_tensors or tuple(base)
    if encoding.is_delta:
        problem = mismatch(base, {name: base[name] for name in expected if name in base}, expected=expected)
        if problem is None:
            try:
                tensors = decode_update(weights, delta_base if delta_base is not None else base, encoding, expected=expected)
            except EncodingError as exc:
                raise UpdateRefused(str(exc), reason=Refusal.BAD_ENCODING) from None
            except CodecError as exc:
                raise UpdateRefused(str(exc), reason=Refusal.INVALID_SAFETENSORS) from None
            problem = mismatch(base, tensors, expected=expected)
    else:
        # names and shapes from the header first: a mismatch is refused before the data is decoded
        problem = mismatch(base, summary, expected=expected)
    if problem is None and not encoding.is_delta:
        try:
            tensors = decode_tensors(weights, writable=False)
        except CodecError as exc:
            raise UpdateRefused(str(exc), reason=Refusal.INVALID_SAFETENSORS) from None
        problem = mismatch(base, tensors, expected=expected)
    if problem is not None:
        raise UpdateRefused(problem, reason=Refusal.SHAPE_MISMATCH)
    problem = non_finite(tensors)
    if problem is not None:
        raise UpdateRefused(problem, reason=Refusal.NOT_FINITE)

    if limits.max_relative_norm is not None:
        change, base_norm = relative_change(base, tensors, base_squared_norms)
        bound = limits.max_relative_norm * max(base_norm, 1.0)
        if change > bound:
            raise UpdateRefused(
                f"update changes the model by L2 {change:.4g}, over the bound {bound:.4g} "
                f"({limits.max_relative_norm} x base norm {base_norm:.4g})",
                reason=Refusal.NORM_BOUND,
            )
    return tensors


# elements per pass when measuring a change: the scratch buffer stays in cache, no model-sized temporary
_NORM_CHUNK = 1 << 18


def squared_norms(tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """||t||² of each floating tensor: a base's are computed once per round, not once per update."""
    out = {}
    for name, array in tensors.items():
        if array.dtype.kind == "f":
            flat = array.reshape(-1).astype(np.float32, copy=False)
            out[name] = float(np.dot(flat, flat))
    return out


def _squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(-1).astype(np.float32, copy=False)
    b = b.reshape(-1).astype(np.float32, copy=False)
    scratch = np.empty(min(a.size, _NORM_CHUNK), np.float32)
    total = 0.0
    for start in range(0, a.size, _NORM_CHUNK):
        delta = scratch[: min(_NORM_CHUNK, a.size - start)]
        np.subtract(a[start : start + delta.size], b[start : start + delta.size], out=delta)
        total += float(np.dot(delta, delta))
    return total


def relative_change(
    base: Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray],
    base_squared_norms: Mapping[str, float] | None = None,
) -> tuple[float, float]:
    """(||update - base||₂, ||base||₂) over the floating tensors the update includes."""
    norms = base_squared_norms if base_squared_norms is not None else squared_norms({n: base[n] for n in update})
    change_sq = base_sq = 0.0
    for name, array in update.items():
        if array.dtype.kind != "f":
            continue
        change_sq += _squared_distance(array, base[name])
        base_sq += norms[name]
    return change_sq**0.5, base_sq**0.5


def validate_control(
    control: bytes,
    *,
    declared_cid: str,
    trained: Mapping[str, np.ndarray],
    max_norm: float = MAX_DELTA_NORM,
) -> dict[str, np.ndarray]:
    """Check SCAFFOLD's delta_c (a stranger's input, applied to every agent's next correction) against
    the update it came with: it hashes to `declared_cid` (the header's, when given), is float32
    safetensors over exactly the `trained` tensors with their shapes, finite, and its L2 norm is at
    most `max_norm`. Returns its tensors (read-only views)."""
    if declared_cid and cid_of(control) != declared_cid:
        raise UpdateRefused(f"delta_c does not hash to {declared_cid}", reason=Refusal.BAD_CONTROL_VARIATE)
    try:
        tensors = decode_tensors(control, writable=False)
    except CodecError as exc:
        raise UpdateRefused(f"delta_c: {exc}", reason=Refusal.BAD_CONTROL_VARIATE) from None
    problem = mismatch(trained, tensors, expected=tuple(trained))
    if problem is None:
        wrong = sorted(name for name, tensor in tensors.items() if tensor.dtype != np.float32)
        if wrong:
            problem = f"tensors not float32: {wrong[:5]}"
    if problem is not None:
        raise UpdateRefused(f"delta_c: {problem}", reason=Refusal.BAD_CONTROL_VARIATE)
    problem = non_finite(tensors)
    if problem is not None:
        raise UpdateRefused(f"delta_c: {problem}", reason=Refusal.CONTROL_VARIATE_OUT_OF_BOUNDS)
    norm = math.sqrt(sum(float(np.dot(t.ravel().astype(np.float64), t.ravel().astype(np.float64))) for t in tensors.values()))
    if not norm <= max_norm:
        raise UpdateRefused(
            f"delta_c has L2 norm {norm:.4g}, over the bound {max_norm:.4g}", reason=Refusal.CONTROL_VARIATE_OUT_OF_BOUNDS
        )
    return tensors
