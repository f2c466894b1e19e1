"""Update encodings: fewer bytes per device update, decoded back to full weights before validation.

A federation names one encoding (`aggregator` config key ``encoding``, handed to
agents as ``round_config["encoding"]``):

- ``float32``: the update's weights as they are (the default; what every update was before).
- ``fp16`` / ``bf16``: the *delta* (weights - base) as float16 / bfloat16.
- ``int8``: the delta quantized per tensor, symmetric: ``scale = max|delta| / 127``,
  ``q = round(delta / scale)`` in [-127, 127]; the scale travels as a float32 scalar.
- ``topk:F``: per tensor, the ``ceil(F * n)`` delta entries of largest magnitude, as
  sorted flat indices (int32, or int64 for tensors of 2^31 elements or more) and float32
  values; everything else is zero. The agent keeps what it left out (error feedback,
  `TopKResidual`) and adds it to its next delta, so nothing is lost, only delayed.

Why the delta and not the weights: the receiver knows the base exactly (the update
names it by ``base_cid``), a delta is small so a 16- or 8-bit code of it loses far less
than a code of the weights, and sparsifying only makes sense on a change.

An encoded blob is still a deterministic safetensors file (so its CID, the manifest's
``tensors`` summary and the store treat it like any other), holding for each base
tensor ``name``: ``name`` (fp16, bf16), ``name/q`` + ``name/scale`` (int8), or
``name/idx`` + ``name/val`` (topk). Tensors that are not floating point (counters)
travel as they are under ``name``. The suffixes make the name mapping injective.

Decoding treats the blob as a stranger's: names, dtypes and shapes are checked from
the header before any data is read, then index ranges and order, the int8 range and
the scales; every problem raises `EncodingError` (reason ``bad_encoding``). All work is
vectorized numpy; nothing here unpickles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from proto.errors import InvalidInput
from storage.codec import (
    _NUMPY_TO_CODE,
    CodecError,
    TensorInfo,
    decode_tensors,
    encode_tensors,
    summarize,
)
from storage.models import load_model

if TYPE_CHECKING:
    from storage.store import ContentStore

__all__ = [
    "ENCODING_KINDS",
    "FLOAT32",
    "Encoding",
    "EncodingError",
    "decode_update",
    "encode_update",
    "federation_encoding",
    "parse_encoding",
    "read_update",
]

ENCODING_KINDS = ("float32", "fp16", "bf16", "int8", "topk")
_FP16_MAX = float(np.finfo(np.float16).max)
_INT8_LEVELS = 127


class EncodingError(InvalidInput):
    """An encoding name that is not one of ours, or an encoded blob that does not decode."""

    reason = "bad_encoding"


@dataclass(frozen=True)
class Encoding:
    """One of `ENCODING_KINDS`; `fraction` is top-k's share of entries kept per tensor."""

    kind: str = "float32"
    fraction: float = 0.0

    @property
    def name(self) -> str:
        """The canonical text form, e.g. "int8" or "topk:0.01" (what manifests and configs say)."""
        return f"topk:{self.fraction:g}" if self.kind == "topk" else self.kind

    @property
    def is_delta(self) -> bool:
        """Whether the blob holds a change against the base rather than the weights themselves."""
        return self.kind != "float32"

    def keep(self, size: int) -> int:
        """How many entries top-k keeps of a tensor of `size` elements (at least one of a non-empty one)."""
        return min(size, max(1, math.ceil(self.fraction * size))) if size else 0

    def __str__(self) -> str:
        return self.name


FLOAT32 = Encoding()


def parse_encoding(text: str) -> Encoding:
    """"float32" (also ""), "fp16", "bf16", "int8" or "topk:F" with 0 < F <= 1; raises EncodingError."""
    value = (text or "float32").strip().lower()
    if value in ("float32", "fp16", "bf16", "int8"):
        return Encoding(value)
    kind, colon, number = value.partition(":")
    if kind == "topk" and colon:
        try:
            fraction = float(number)
        except ValueError:
            fraction = math.nan
        if math.isfinite(fraction) and 0 < fraction <= 1:
            return Encoding("topk", fraction)
    raise EncodingError(
        f"unknown encoding {text[:40]!r}: expected float32, fp16, bf16, int8 or topk:F with 0 < F <= 1"
    )


def federation_encoding(round_config: Mapping[str, str]) -> Encoding:
    """The encoding a round config asks for (key ``encoding``; float32 when absent)."""
    return parse_encoding(str(round_config.get("encoding", "")))


# ---------------------------------------------------------------- encoding (the agent)


def encode_update(
    weights: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    encoding: Encoding,
    *,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The blob for `weights` trained from `base`, and top-k's new residual (empty for other encodings).

    `residual` is what top-k left out last time (error feedback): it is added to this delta
    before choosing, and what is left out now is returned. A residual tensor whose shape no
    longer matches is ignored (the model changed under the agent).
    """
    if not encoding.is_delta:
        return encode_tensors(dict(weights)), {}
    parts: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        array = np.asarray(value)
        if name not in base:
            raise EncodingError(f"tensor {name!r} is not in the base model: a delta needs it")
        reference = np.asarray(base[name])
        if array.shape != reference.shape:
            raise EncodingError(f"tensor {name!r}: shape {array.shape} != base {reference.shape}")
        if array.dtype.kind != "f":
            parts[name] = array  # counters and masks travel as they are
            continue
        delta = array.astype(np.float32) - reference.astype(np.float32)
        if not np.isfinite(delta).all():
            raise EncodingError(f"tensor {name!r}: the change holds NaN or infinite values")
        if encoding.kind == "fp16":
            if delta.size and float(np.abs(delta).max()) > _FP16_MAX:
                raise EncodingError(f"tensor {name!r}: a change exceeds float16's range ({_FP16_MAX:g})")
            parts[name] = delta.astype(np.float16)
        elif encoding.kind == "bf16":
            parts[name] = _to_bf16(delta)
        elif encoding.kind == "int8":
            peak = float(np.abs(delta).max()) if delta.size else 0.0
            scale = np.float32(peak / _INT8_LEVELS)
            q = np.zeros(delta.shape, np.int8) if scale == 0 else np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
            parts[f"{name}/q"] = q
            parts[f"{name}/scale"] = np.array(scale, dtype=np.float32)
        else:  # topk
            previous = residual.get(name) if residual is not None else None
            if previous is not None and previous.shape == delta.shape:
                delta = delta + previous
            flat = delta.reshape(-1)
            k = encoding.keep(flat.size)
            if k < flat.size:
                chosen = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
            else:
                chosen = np.arange(flat.size)
            values = flat[chosen].astype(np.float32)
            left = flat.copy()
            left[chosen] = 0.0
            new_residual[name] = left.reshape(delta.shape)
            parts[f"{name}/idx"] = chosen.astype(_index_dtype(flat.size))
            parts[f"{name}/val"] = values
    return encode_tensors(parts), new_residual


def _to_bf16(array: np.ndarray):  # -> torch.Tensor (bfloat16); torch is imported only by encoders of bf16
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16)


def _index_dtype(size: int) -> np.dtype:
    return np.dtype(np.int32) if size < 2**31 else np.dtype(np.int64)


# ---------------------------------------------------------------- decoding (the receiver)


def decode_update(
    blob: bytes | bytearray | memoryview,
    base: Mapping[str, np.ndarray],
    encoding: Encoding,
    *,
    expected: Collection[str],
) -> dict[str, np.ndarray]:
    """The full weights an encoded `blob` stands for: base + decoded delta, in the base's dtypes.

    `expected` names the base tensors the update carries. Raises EncodingError naming the first
    problem; CodecError for bytes that are not safetensors at all. For float32 this is plain decoding.
    """
    if not encoding.is_delta:
        return decode_tensors(blob, writable=False)
    unknown = sorted(set(expected) - set(base))
    if unknown:
        raise EncodingError(f"declared tensors not in the base model: {unknown[:5]}")
    summary = summarize(blob)
    layout = {name: _parts(name, base[name], encoding) for name in expected}
    wanted = {part: info for parts in layout.values() for part, info in parts.items()}
    if set(summary) != set(wanted):
        missing, extra = sorted(set(wanted) - set(summary)), sorted(set(summary) - set(wanted))
        raise EncodingError(f"{encoding} update: tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for part, info in wanted.items():
        held = summary[part]
        if held != info:
            raise EncodingError(
                f"{encoding} update: tensor {part!r} is {held.dtype}{list(held.shape)}, "
                f"expected {info.dtype}{list(info.shape)}"
            )
    try:
        arrays = decode_tensors(blob, writable=False)
    except CodecError as exc:  # the header was fine a moment ago: only a race with a mutable buffer gets here
        raise EncodingError(str(exc)) from None
    return {name: _decode_one(name, np.asarray(base[name]), encoding, arrays) for name in expected}


def _parts(name: str, reference: np.ndarray, encoding: Encoding) -> dict[str, TensorInfo]:
    """The tensors (name -> dtype code and shape) an encoded blob must hold for one base tensor."""
    shape = tuple(reference.shape)
    if reference.dtype.kind != "f":
        return {name: TensorInfo(_code(reference.dtype), shape)}
    if encoding.kind == "fp16":
        return {name: TensorInfo("F16", shape)}
    if encoding.kind == "bf16":
        return {name: TensorInfo("BF16", shape)}
    if encoding.kind == "int8":
        return {f"{name}/q": TensorInfo("I8", shape), f"{name}/scale": TensorInfo("F32", ())}
    size = math.prod(shape)
    k = encoding.keep(size)
    index_code = "I32" if _index_dtype(size) == np.int32 else "I64"
    return {f"{name}/idx": TensorInfo(index_code, (k,)), f"{name}/val": TensorInfo("F32", (k,))}


def _code(dtype: np.dtype) -> str:
    code = _NUMPY_TO_CODE.get(dtype.str[1:])
    if code is None:
        raise EncodingError(f"base tensor dtype {dtype} cannot travel in an update")
    return code


def _decode_one(name: str, reference: np.ndarray, encoding: Encoding, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    if reference.dtype.kind != "f":
        return arrays[name]
    if encoding.kind in ("fp16", "bf16"):
        delta = arrays[name].astype(np.float32)
    elif encoding.kind == "int8":
        q, scale = arrays[f"{name}/q"], float(arrays[f"{name}/scale"])
        if not (math.isfinite(scale) and scale >= 0):
            raise EncodingError(f"int8 update: tensor {name!r} has scale {scale!r}; it must be finite and >= 0")
        if q.size and int(q.min()) < -_INT8_LEVELS:
            raise EncodingError(f"int8 update: tensor {name!r} holds -128; symmetric codes are in [-127, 127]")
        delta = q.astype(np.float32) * np.float32(scale)
    else:
        index, values = arrays[f"{name}/idx"], arrays[f"{name}/val"]
        size = reference.size
        if index.size and (int(index[0]) < 0 or int(index[-1]) >= size or not bool(np.all(np.diff(index) > 0))):
            raise EncodingError(
                f"topk update: tensor {name!r}: indices must be strictly increasing and within [0, {size})"
            )
        delta = np.zeros(size, np.float32)
        delta[index] = values
        delta = delta.reshape(reference.shape)
    return (reference.astype(np.float32) + delta).astype(reference.dtype, copy=False)


# ---------------------------------------------------------------- reading stored updates back


def read_update(
    store: ContentStore,
    update_cid: str,
    *,
    expected: Collection[str] | None = None,
    base_tensors: Callable[[str], Mapping[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """A stored update's full weights, whatever its encoding (its manifest's ``extra.encoding``).

    What a restarted round re-folds and what rules that need every update at once read back.
    `expected` names the base tensors it carries (the journal's `AcceptedUpdate.tensors`; default:
    read from the part names). `base_tensors(cid)` supplies a delta's base (default: from `store`).
    """
    manifest, weights = load_model(store, update_cid)
    encoding = parse_encoding(str(manifest.extra.get("encoding", "")))
    if not encoding.is_delta:
        return decode_tensors(weights)
    if not manifest.base:
        raise EncodingError(f"update {update_cid} is {encoding}-encoded but names no base")
    base = base_tensors(manifest.base) if base_tensors is not None else decode_tensors(load_model(store, manifest.base)[1])
    names = expected if expected is not None else _base_names(summarize(weights), encoding)
    return decode_update(weights, base, encoding, expected=sorted(names))


def _base_names(summary: Mapping[str, TensorInfo], encoding: Encoding) -> set[str]:
    """The base tensors an encoded blob carries, from its part names (a guess for a non-floating base
    tensor whose own name ends in one of the suffixes: pass `expected` where it matters)."""
    suffixes = {"int8": ("q", "scale"), "topk": ("idx", "val")}.get(encoding.kind, ())
    names = set()
    for part in summary:
        stem, slash, suffix = part.rpartition("/")
        names.add(stem if slash and suffix in suffixes else part)
    return names
