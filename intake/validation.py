"""Validation of a device update before it is accepted: every refusal has its own reason code.

The checks run cheapest first: size, then the safetensors header, then names,
shapes and dtypes against the base, then the data (finite values, then the
L2-norm bound on the change). Nothing here touches the store or the journal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from proto.errors import Refusal, UpdateRefused
from storage.codec import CodecError, decode_tensors, summarize


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


def validate_update(
    weights: bytes,
    *,
    base: Mapping[str, np.ndarray],
    declared_tensors: list[str] | tuple[str, ...],
    limits: UpdateLimits,
) -> dict[str, np.ndarray]:
    """Check an update's bytes against its base and return its tensors.

    `declared_tensors` is the header's list of included tensors; empty means all of
    the base's. Raises UpdateRefused with the reason of the first failed check.
    """
    check_size(len(weights), limits)
    try:
        summary = summarize(weights)
    except CodecError as exc:
        raise UpdateRefused(str(exc), reason=Refusal.INVALID_SAFETENSORS) from None

    expected_names = set(declared_tensors) if declared_tensors else set(base)
    unknown = sorted(expected_names - set(base))
    if unknown:
        raise UpdateRefused(f"declared tensors not in the base model: {unknown[:5]}", reason=Refusal.SHAPE_MISMATCH)
    present = set(summary)
    if present != expected_names:
        missing, extra = sorted(expected_names - present), sorted(present - expected_names)
        raise UpdateRefused(
            f"tensor names differ from the {'declared subset' if declared_tensors else 'base'}: "
            f"missing {missing[:5]}, unexpected {extra[:5]}",
            reason=Refusal.SHAPE_MISMATCH,
        )
    for name, info in summary.items():
        expected = base[name]
        if tuple(info.shape) != tuple(expected.shape):
            raise UpdateRefused(
                f"tensor {name!r}: shape {tuple(info.shape)} != base {tuple(expected.shape)}",
                reason=Refusal.SHAPE_MISMATCH,
            )

    try:
        tensors = decode_tensors(weights)
    except CodecError as exc:
        raise UpdateRefused(str(exc), reason=Refusal.INVALID_SAFETENSORS) from None
    for name, array in tensors.items():
        if array.dtype != base[name].dtype:
            raise UpdateRefused(
                f"tensor {name!r}: dtype {array.dtype} != base {base[name].dtype}", reason=Refusal.SHAPE_MISMATCH
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise UpdateRefused(f"tensor {name!r} contains NaN or infinite values", reason=Refusal.NOT_FINITE)

    if limits.max_relative_norm is not None:
        change, base_norm = relative_change(base, tensors)
        bound = limits.max_relative_norm * max(base_norm, 1.0)
        if change > bound:
            raise UpdateRefused(
                f"update changes the model by L2 {change:.4g}, over the bound {bound:.4g} "
                f"({limits.max_relative_norm} x base norm {base_norm:.4g})",
                reason=Refusal.NORM_BOUND,
            )
    return tensors


def relative_change(base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """(||update - base||₂, ||base||₂) over the tensors the update includes."""
    change_sq = base_sq = 0.0
    for name, array in update.items():
        if array.dtype.kind != "f":
            continue
        reference = base[name].reshape(-1).astype(np.float32, copy=False)
        delta = array.reshape(-1).astype(np.float32, copy=False) - reference
        change_sq += float(np.dot(delta, delta))
        base_sq += float(np.dot(reference, reference))
    return change_sq**0.5, base_sq**0.5
