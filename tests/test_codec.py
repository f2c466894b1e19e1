"""storage.codec: deterministic safetensors out, strict validation in."""

from __future__ import annotations

import io
import json
import mmap
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load_numpy
from safetensors.torch import save as st_save_torch

from storage.cid import cid_of
from storage.codec import (
    MAX_HEADER_BYTES,
    CodecError,
    TensorInfo,
    decode_tensors,
    decode_torch,
    encode_tensors,
    num_bytes,
    summarize,
)

NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
    "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _numpy_sample(dtype: type, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def _torch_sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


def _craft(header: dict, data: bytes = b"", *, pad: bool = True) -> bytes:
    """A safetensors-shaped file with an arbitrary (possibly lying) header."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _refused(data: bytes, *needles: str) -> CodecError:
    for reader in (summarize, decode_tensors, decode_torch):
        with pytest.raises(CodecError) as caught:
            reader(data)
        assert caught.value.reason == "invalid_safetensors"
        for needle in needles:
            assert needle in str(caught.value), (needle, str(caught.value))
    return caught.value


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("code", sorted(NUMPY_DTYPES))
@pytest.mark.parametrize("shape", [(3, 5), (7,), (), (0, 4)])
def test_numpy_round_trip_per_dtype(code: str, shape: tuple[int, ...]) -> None:
    array = _numpy_sample(NUMPY_DTYPES[code], shape)
    data = encode_tensors({"t": array})
    assert summarize(data) == {"t": TensorInfo(code, shape)}
    decoded = decode_tensors(data)["t"]
    assert decoded.dtype == array.dtype and decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)
    decoded[...] = 0  # the caller gets its own writable memory, not a view of `data`


@pytest.mark.parametrize("code", sorted(TORCH_DTYPES))
def test_torch_round_trip_per_dtype_exact(code: str) -> None:
    tensor = _torch_sample(TORCH_DTYPES[code], (4, 6))
    data = encode_tensors({"w": tensor})
    assert summarize(data)["w"] == TensorInfo(code, (4, 6))
    back = decode_torch(data)["w"]
    assert back.dtype == tensor.dtype
    assert torch.equal(back, tensor)


def test_bfloat16_decodes_to_exact_float32_in_numpy() -> None:
    tensor = torch.tensor([1.0, -2.5, 3.140625, 1e-30, 3e38, float("inf")], dtype=torch.bfloat16)
    array = decode_tensors(encode_tensors({"b": tensor}))["b"]
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, tensor.float().numpy())


def test_numpy_and_torch_inputs_of_equal_values_give_equal_bytes() -> None:
    array = _numpy_sample(np.float32, (8, 3))
    assert encode_tensors({"x": array}) == encode_tensors({"x": torch.from_numpy(array.copy())})


def test_encoding_is_deterministic_whatever_the_input_layout() -> None:
    a = _numpy_sample(np.float32, (16, 16), seed=1)
    b = _numpy_sample(np.int64, (5,), seed=2)
    reference = encode_tensors({"a": a, "b": b})
    variants = [
        {"b": b, "a": a},  # insertion order
        {"a": np.asfortranarray(a), "b": b},  # memory order
        {"a": a.astype(">f4"), "b": b.astype(">i8")},  # byte order
        {"a": np.ascontiguousarray(a.T).T, "b": b[::-1].copy()[::-1]},  # strided views
        {"a": torch.from_numpy(a.copy()).requires_grad_(), "b": torch.from_numpy(b.copy())},
    ]
    for variant in variants:
        assert encode_tensors(variant) == reference
    assert cid_of(encode_tensors({"a": a.copy(), "b": b.copy()})) == cid_of(reference)
    changed = a.copy()
    changed[3, 4] = np.nextafter(changed[3, 4], np.float32(np.inf))
    assert cid_of(encode_tensors({"a": changed, "b": b})) != cid_of(reference)


def test_output_is_valid_for_the_safetensors_library_and_vice_versa() -> None:
    tensors = {"layer.weight": _numpy_sample(np.float32, (3, 4)), "step": np.array(7)}
    ours = encode_tensors(tensors)
    theirs_reading_ours = st_load_numpy(ours)
    for name, array in tensors.items():
        np.testing.assert_array_equal(theirs_reading_ours[name], array)
    library_bytes = st_save_torch({"x": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)})
    assert torch.equal(decode_torch(library_bytes)["x"], torch.arange(6.0).reshape(2, 3).bfloat16())


def test_header_is_padded_sorted_and_has_no_metadata() -> None:
    data = encode_tensors({"b": np.zeros(1, np.float32), "a": np.zeros(1, np.float32)})
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    assert list(header) == ["a", "b"] and "__metadata__" not in header
    assert header["a"]["data_offsets"] == [0, 4]


def test_empty_mapping_round_trips() -> None:
    data = encode_tensors({})
    assert summarize(data) == {} and decode_tensors(data) == {} and decode_torch(data) == {}


def test_unsupported_inputs_are_refused() -> None:
    with pytest.raises(CodecError, match="unsupported numpy dtype"):
        encode_tensors({"c": np.zeros(2, np.complex64)})
    with pytest.raises(CodecError, match="expected a numpy array or torch tensor"):
        encode_tensors({"l": [1.0, 2.0]})
    with pytest.raises(CodecError, match="reserved"):
        encode_tensors({"__metadata__": np.zeros(1)})


def test_summary_helpers() -> None:
    data = encode_tensors(
        {"a": np.zeros((2, 3), np.float32), "b": torch.zeros(5, dtype=torch.bfloat16)}
    )
    summary = summarize(data)
    assert num_bytes(summary) == 2 * 3 * 4 + 5 * 2
    assert {name: TensorInfo.from_json(info.to_json()) for name, info in summary.items()} == summary
    assert TensorInfo.from_json({"dtype": "F32", "shape": [2, 3]}) == TensorInfo("F32", (2, 3))
    with pytest.raises(CodecError):
        TensorInfo.from_json({"dtype": "F32", "shape": [-1]})


def _resident_kib(path: Path) -> int:
    """How much of this process's mappings of `path` is in memory (Linux /proc/self/smaps Rss)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            ours = len(fields) >= 6 and fields[5] == str(path)
        elif ours and fields[:1] == ["Rss:"]:
            total += int(fields[1])
    return total


def test_summarize_reads_only_the_header(tmp_path: Path) -> None:
    # A 2 GiB sparse file, mapped: reading its data would bring 2 GiB of pages in; the
    # header is one page (a few MiB at most, with the kernel's read-around and large folios).
    if not Path("/proc/self/smaps").is_file():
        pytest.skip("counts resident pages through Linux's /proc/self/smaps")
    header = {"big": {"dtype": "F32", "shape": [1 << 29], "data_offsets": [0, 1 << 31]}}
    prefix = _craft(header)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as out:
        out.write(prefix)
        out.truncate(len(prefix) + (1 << 31))
    with (
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        view = memoryview(mapped)
        assert _resident_kib(path) == 0  # mapped, nothing read yet
        summary = summarize(view)
        resident = _resident_kib(path)
        view.release()
    assert summary == {"big": TensorInfo("F32", (1 << 29,))}
    assert resident < 64 << 10, f"{resident} KiB of the file is resident after summarize: it read tensor data"


# ------------------------------------------------------------------ refusals


def test_refuses_garbage() -> None:
    _refused(b"this is definitely not a safetensors file at all", "not safetensors")


@pytest.mark.parametrize("data", [b"", b"\x08\x00\x00"])
def test_refuses_shorter_than_the_length_prefix(data: bytes) -> None:
    _refused(data, "truncated")


def test_refuses_truncated_file() -> None:
    data = encode_tensors({"w": np.arange(100, dtype=np.float32)})
    _refused(data[:-1], "past the 399 data bytes", "truncated")
    _refused(data[:20], "header length")


def test_refuses_header_length_beyond_the_file() -> None:
    _refused(struct.pack("<Q", 1000) + b"{}", "larger than the file")


def test_refuses_oversize_header() -> None:
    _refused(struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{" + b" " * 64, "exceeds the limit")


@pytest.mark.parametrize("body", [b"[1, 2, 3]", b'"text"', b"{not json}", b'{"a": 1, "a": 2}'])
def test_refuses_header_that_is_not_a_json_object(body: bytes) -> None:
    _refused(struct.pack("<Q", len(body)) + body, "not safetensors")


def test_refuses_invalid_utf8_header() -> None:
    body = b'{"\xff": 1}'
    _refused(struct.pack("<Q", len(body)) + body, "UTF-8")


OVERLAP = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
}
GAP = {
    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
}
OUT_OF_RANGE = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
SIZE_MISMATCH = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}
BACKWARDS = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}
TRAILING = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}


@pytest.mark.parametrize(
    ("header", "data_len", "needle"),
    [
        (OVERLAP, 12, "overlaps"),
        (GAP, 12, "gap"),
        (OUT_OF_RANGE, 12, "past the 12 data bytes"),
        (SIZE_MISMATCH, 16, "12 bytes but its offsets span 16"),
        (BACKWARDS, 8, "data_offsets"),
        (TRAILING, 8, "cover 4 bytes"),
    ],
    ids=["overlap", "gap", "out_of_range", "size_mismatch", "backwards", "trailing_bytes"],
)
def test_refuses_lying_offsets(header: dict, data_len: int, needle: str) -> None:
    _refused(_craft(header, bytes(data_len)), needle)


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": [1]}, "exactly the keys"),
        ([1, 2, 3], "exactly the keys"),
    ],
)
def test_refuses_bad_tensor_entries(entry: object, needle: str) -> None:
    _refused(_craft({"t": entry}, bytes(8)), needle)


def test_refuses_bad_metadata() -> None:
    _refused(_craft({"__metadata__": {"k": 1}}), "__metadata__")


class _Boobytrap:
    """Unpickling this would create a file; proving that nothing here unpickles."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


def test_refuses_pickle_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for protocol in (2, 3, 4, 5):
        payload = pickle.dumps({"w": _Boobytrap(marker)}, protocol=protocol)
        _refused(payload, "looks like a pickle/zip")
    assert not marker.exists()


def test_refuses_torch_save_zip() -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    _refused(buffer.getvalue(), "looks like a pickle/zip")
