"""Tensors <-> safetensors bytes, deterministic on the way out and suspicious on the way in.

Encoding writes the safetensors layout itself so the bytes depend only on the
tensors: names sorted, tensors packed back to back in that order, the JSON
header sorted and compact with no ``__metadata__``, padded with spaces to a
multiple of 8 bytes (as the safetensors library does), data little-endian.
Equal tensors therefore give equal bytes, hence equal CIDs.

Decoding treats the bytes as input from a stranger: the header is parsed and
checked here (size limits, JSON shape, dtypes, offsets that tile the data
exactly) before any tensor is materialized. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from proto.errors import InvalidInput

__all__ = [
    "MAX_HEADER_BYTES",
    "CodecError",
    "TensorInfo",
    "TensorSummary",
    "decode_tensors",
    "decode_torch",
    "encode_tensors",
    "num_bytes",
    "num_elements",
    "strict_json",
    "summarize",
]

MAX_HEADER_BYTES = 16 * 1024 * 1024
_LEN_PREFIX = 8  # u64 little-endian header length

# safetensors dtype code -> (itemsize, little-endian numpy dtype used to read the raw bytes)
_DTYPES: dict[str, tuple[int, np.dtype]] = {
    "F64": (8, np.dtype("<f8")),
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),  # numpy has no bfloat16: read the bits, upcast on decode
    "I64": (8, np.dtype("<i8")),
    "I32": (4, np.dtype("<i4")),
    "I16": (2, np.dtype("<i2")),
    "I8": (1, np.dtype("i1")),
    "U64": (8, np.dtype("<u8")),
    "U32": (4, np.dtype("<u4")),
    "U16": (2, np.dtype("<u2")),
    "U8": (1, np.dtype("u1")),
    "BOOL": (1, np.dtype("?")),
}
_NUMPY_TO_CODE = {
    np.dtype(kind).str[1:]: code
    for code, kind in {
        "F64": "f8", "F32": "f4", "F16": "f2", "I64": "i8", "I32": "i4", "I16": "i2",
        "I8": "i1", "U64": "u8", "U32": "u4", "U16": "u2", "U8": "u1", "BOOL": "?",
    }.items()
}  # fmt: skip


# torch costs over a second to import, so it is imported only by callers that hand us tensors.
@cache
def _torch_to_code() -> dict[Any, str]:
    import torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }  # fmt: skip


_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


class CodecError(InvalidInput):
    """Bytes that are not a well-formed safetensors file (or tensors that cannot be encoded)."""

    reason = "invalid_safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor."""

    dtype: str  # safetensors dtype code, e.g. "F32", "BF16", "I64"
    shape: tuple[int, ...]

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def num_bytes(self) -> int:
        return self.num_elements * _DTYPES[self.dtype][0]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, value: Any) -> TensorInfo:
        """Parse {"dtype": ..., "shape": [...]}; raises CodecError naming what is wrong."""
        if not isinstance(value, dict) or set(value) != {"dtype", "shape"}:
            raise CodecError(
                f"tensor info must be an object with keys 'dtype' and 'shape', got {_short(value)}"
            )
        return cls(_check_dtype(value["dtype"]), _check_shape(value["shape"]))


TensorSummary = dict[str, TensorInfo]


def num_bytes(summary: Mapping[str, TensorInfo]) -> int:
    """Total tensor data bytes the summary describes (the file is this plus the header)."""
    return sum(info.num_bytes for info in summary.values())


def num_elements(summary: Mapping[str, TensorInfo]) -> int:
    return sum(info.num_elements for info in summary.values())


# ---------------------------------------------------------------- encoding


def encode_tensors(tensors: Mapping[str, np.ndarray | torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes for `tensors` (numpy arrays or torch tensors)."""
    header: dict[str, Any] = {}
    buffers: list[memoryview] = []  # views into the arrays: one copy, in the join
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        if name == "__metadata__":
            raise CodecError("'__metadata__' is reserved and cannot name a tensor")
        code, array = _as_le_array(name, tensors[name])
        size = array.nbytes
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, size + offset],
        }
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)))
        offset += size
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    return b"".join([struct.pack("<Q", len(header_bytes)), header_bytes, *buffers])


def _as_le_array(name: str, value: np.ndarray | torch.Tensor) -> tuple[str, np.ndarray]:
    """(dtype code, C-contiguous little-endian array sharing memory where possible)."""
    torch = sys.modules.get("torch")  # if torch was never imported, value is no tensor
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        code = _torch_to_code().get(tensor.dtype)
        if code is None:
            raise CodecError(f"tensor {name!r}: unsupported torch dtype {tensor.dtype}")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)  # same bits; numpy can hold int16
        array = tensor.numpy()
    elif isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        code = _NUMPY_TO_CODE.get(array.dtype.str[1:])
        if code is None:
            raise CodecError(f"tensor {name!r}: unsupported numpy dtype {array.dtype}")
    else:
        raise CodecError(
            f"tensor {name!r}: expected a numpy array or torch tensor, got {type(value).__name__}"
        )
    little = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    return code, np.asarray(array, dtype=little, order="C")  # keeps 0-d shapes


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Layout:
    summary: TensorSummary
    offsets: dict[str, tuple[int, int]]  # absolute byte ranges in the file
    view: memoryview


def summarize(data: bytes | bytearray | memoryview) -> TensorSummary:
    """Names, dtypes and shapes from the header alone; the tensor data is never read.

    The header is fully validated against the length of `data`.
    """
    return _parse(data).summary


def _parse(data: bytes | bytearray | memoryview) -> _Layout:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    total = len(view)
    head = bytes(view[:4])
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CodecError(
            "not safetensors (looks like a pickle/zip, e.g. torch.save output); "
            "refusing to read it: pickles run code when loaded"
        )
    if total < _LEN_PREFIX:
        raise CodecError(f"not safetensors: truncated ({total} bytes, need at least 8)")
    (header_len,) = struct.unpack("<Q", view[:_LEN_PREFIX])
    if header_len > MAX_HEADER_BYTES:
        raise CodecError(
            f"not safetensors: header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )
    if _LEN_PREFIX + header_len > total:
        raise CodecError(
            f"not safetensors: header length {header_len} is larger than the file "
            f"({total - _LEN_PREFIX} bytes after the length prefix); truncated?"
        )
    raw_header = bytes(view[_LEN_PREFIX : _LEN_PREFIX + header_len])
    if not raw_header.startswith(b"{"):
        raise CodecError("not safetensors: header does not start with '{'")
    try:
        header = strict_json(raw_header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"not safetensors: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CodecError("not safetensors: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CodecError("bad safetensors header: '__metadata__' must map strings to strings")

    data_start = _LEN_PREFIX + header_len
    data_len = total - data_start
    summary: TensorSummary = {}
    ranges: list[tuple[int, int, str]] = []
    for name in sorted(header):
        entry = header[name]
        if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
            raise CodecError(
                f"bad safetensors header: tensor {name!r} must have exactly the keys "
                f"'dtype', 'shape', 'data_offsets', got {_short(entry)}"
            )
        try:
            info = TensorInfo(_check_dtype(entry["dtype"]), _check_shape(entry["shape"]))
        except CodecError as exc:
            raise CodecError(f"bad safetensors header: tensor {name!r}: {exc}") from None
        offsets = entry["data_offsets"]
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(x) and x >= 0 for x in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise CodecError(
                f"bad safetensors header: tensor {name!r}: data_offsets must be [begin, end] "
                f"with 0 <= begin <= end, got {_short(offsets)}"
            )
        begin, end = offsets
        if end > data_len:
            raise CodecError(
                f"bad safetensors header: tensor {name!r} ends at {end}, "
                f"past the {data_len} data bytes in the file (truncated?)"
            )
        if end - begin != info.num_bytes:
            raise CodecError(
                f"bad safetensors header: tensor {name!r} is {info.dtype}{list(info.shape)} "
                f"= {info.num_bytes} bytes but its offsets span {end - begin}"
            )
        summary[name] = info
        ranges.append((begin, end, name))

    # The tensors must tile the data region exactly: no gaps, no overlaps, nothing after.
    ranges.sort()
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise CodecError(
                f"bad safetensors header: tensor {name!r} starts at {begin}, expected {position} "
                f"({problem})"
            )
        position = end
    if position != data_len:
        raise CodecError(
            f"bad safetensors header: tensors cover {position} bytes but the file holds "
            f"{data_len} data bytes"
        )
    offsets_abs = {name: (data_start + begin, data_start + end) for begin, end, name in ranges}
    return _Layout(summary, offsets_abs, view)


def strict_json(raw: bytes) -> Any:
    """UTF-8 JSON with duplicate keys refused: what safetensors headers and manifests are read with.

    Raises UnicodeDecodeError or ValueError (json.JSONDecodeError, or a duplicate key).
    """
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_dtype(value: Any) -> str:
    if not isinstance(value, str) or value not in _DTYPES:
        raise CodecError(f"unknown dtype {_short(value)} (known: {', '.join(_DTYPES)})")
    return value


def _check_shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(_is_int(x) and x >= 0 for x in value):
        raise CodecError(f"shape must be a list of non-negative integers, got {_short(value)}")
    return tuple(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- decoding


def decode_tensors(data: bytes | bytearray | memoryview, *, writable: bool = True) -> dict[str, np.ndarray]:
    """Validated numpy arrays; BF16 comes back as float32, exactly.

    Writable copies by default; `writable=False` gives read-only views of `data` where the
    bytes already are the array (native byte order), saving a model-sized copy."""
    layout = _parse(data)
    result: dict[str, np.ndarray] = {}
    for name, info in layout.summary.items():
        begin, end = layout.offsets[name]
        raw = np.frombuffer(layout.view[begin:end], dtype=_DTYPES[info.dtype][1])
        if info.dtype == "BF16":
            # bfloat16 is the top half of a float32: shifting the bits up is exact.
            array = (raw.astype(np.uint32) << 16).view(np.float32)
        elif info.dtype == "BOOL":
            array = raw.view(np.uint8) != 0  # any nonzero byte is True, as in torch
        else:
            array = raw.astype(raw.dtype.newbyteorder("="), copy=writable)
        result[name] = array.reshape(info.shape)
    return result


def decode_torch(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Validated torch tensors with their exact dtypes (BF16 stays bfloat16)."""
    from safetensors.torch import load  # the header has been checked by then

    _parse(data)
    return load(bytes(data))
