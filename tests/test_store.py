"""Content stores: one contract suite for every implementation, plus LocalStore's disk guarantees."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proto.errors import FailedPrecondition, IntegrityError, InvalidInput, NotFound
from storage.cid import CHUNK_SIZE, cid_of
from storage.open import open_store
from storage.store import ContentStore, LayeredStore, LocalStore, default_store_path

REPO = Path(__file__).resolve().parents[1]
ABSENT = cid_of(b"never stored anywhere")

# name -> factory(tmp_path). A later IpfsStore adds itself here and inherits the whole suite.
STORE_FACTORIES: dict[str, Callable[[Path], ContentStore]] = {
    "local": lambda tmp_path: LocalStore(tmp_path / "store"),
    "layered": lambda tmp_path: LayeredStore([LocalStore(tmp_path / "first"), LocalStore(tmp_path / "second")]),
}


def _blob(size: int, seed: int = 0) -> bytes:
    return (seed.to_bytes(4, "little") * (size // 4 + 1))[:size] if size < 64 else os.urandom(size)


class StoreContract:
    """What every ContentStore must do. Subclasses only choose the implementations."""

    @pytest.fixture(params=sorted(STORE_FACTORIES))
    def store(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ContentStore]:
        store = STORE_FACTORIES[request.param](tmp_path)
        yield store
        store.close()

    @pytest.mark.parametrize("size", [0, 1, 1000, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 17])
    def test_put_returns_the_kubo_cid_and_get_returns_the_bytes(
        self, store: ContentStore, size: int
    ) -> None:
        data = _blob(size)
        cid = store.put(data)
        assert cid == cid_of(data)
        assert store.get(cid) == data
        assert store.has(cid) and store.size(cid) == size

    def test_put_accepts_bytearray_and_memoryview(self, store: ContentStore) -> None:
        data = _blob(5000)
        assert store.put(bytearray(data)) == store.put(memoryview(data)) == cid_of(data)

    def test_put_is_idempotent(self, store: ContentStore) -> None:
        data = _blob(4096)
        assert store.put(data) == store.put(data)
        assert list(store) == [cid_of(data)]

    def test_streaming_put_from_an_iterator(self, store: ContentStore) -> None:
        data = _blob(2 * CHUNK_SIZE + 12345)
        cuts = [0, 1, 100, CHUNK_SIZE - 3, CHUNK_SIZE + 5, 2 * CHUNK_SIZE, len(data)]
        pieces = (data[a:b] for a, b in zip(cuts, cuts[1:], strict=False))
        cid = store.put(pieces)
        assert cid == cid_of(data) and store.get(cid) == data

    def test_streaming_put_from_file_objects(self, store: ContentStore, tmp_path: Path) -> None:
        data = _blob(3 * (1 << 20) + 7)
        assert store.put(io.BytesIO(data)) == cid_of(data)
        path = tmp_path / "blob.bin"
        path.write_bytes(data[::-1])
        with open(path, "rb") as handle:
            assert store.put(handle) == cid_of(data[::-1])

    def test_a_staged_write_is_stored_only_on_commit(self, store: ContentStore) -> None:
        data = _blob(3 * CHUNK_SIZE + 5)
        cid = cid_of(data)
        staged = store.stage()
        for start in range(0, len(data), CHUNK_SIZE):
            staged.write(data[start : start + CHUNK_SIZE])
        assert not store.has(cid)
        assert staged.commit(cid) == cid
        staged.discard()  # after a commit, a discard keeps the object
        assert store.get(cid) == data

    def test_a_discarded_staged_write_leaves_nothing(self, store: ContentStore) -> None:
        staged = store.stage()
        staged.write(b"half an upload")
        staged.discard()
        staged.discard()
        assert cid_of(b"half an upload") not in set(store)

    def test_put_refuses_text(self, store: ContentStore) -> None:
        with pytest.raises(TypeError):
            store.put("text is not bytes")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            store.put([b"ok", "not ok"])  # type: ignore[list-item]

    def test_iter_chunks_streams_the_object(self, store: ContentStore) -> None:
        data = _blob(5 * 100_000 + 3)
        cid = store.put(data)
        chunks = list(store.iter_chunks(cid, chunk_size=100_000))
        assert b"".join(chunks) == data
        assert all(len(chunk) <= 100_000 for chunk in chunks) and len(chunks) == 6
        assert b"".join(store.iter_chunks(store.put(b""))) == b""

    def test_missing_objects_are_not_found(self, store: ContentStore) -> None:
        assert not store.has(ABSENT)
        for call in (store.get, store.size, store.pin, store.delete, store.iter_chunks):
            with pytest.raises(NotFound) as caught:
                call(ABSENT)
            assert caught.value.reason == "not_found"

    @pytest.mark.parametrize("bad", ["", "QmNotACid", "bafyfoo", ABSENT[:-1] + "0", ABSENT + "x"])
    def test_every_method_validates_cid_syntax(self, store: ContentStore, bad: str) -> None:
        for call in (
            store.get, store.has, store.size, store.pin, store.unpin,
            store.is_pinned, store.delete, store.iter_chunks,
        ):  # fmt: skip
            with pytest.raises(InvalidInput) as caught:
                call(bad)
            assert caught.value.reason == "bad_cid"

    def test_pins(self, store: ContentStore) -> None:
        first, second = store.put(b"first"), store.put(b"second")
        assert not store.is_pinned(first) and list(store.pins()) == []
        store.pin(first)
        store.pin(first)  # idempotent
        assert store.is_pinned(first) and not store.is_pinned(second)
        assert list(store.pins()) == [first]
        store.unpin(first)
        store.unpin(first)  # idempotent
        assert not store.is_pinned(first) and list(store.pins()) == []

    def test_iteration_lists_every_object(self, store: ContentStore) -> None:
        cids = {store.put(_blob(100 + i, seed=i)) for i in range(20)}
        assert set(store) == cids and len(list(store)) == 20

    def test_delete_respects_pins(self, store: ContentStore) -> None:
        loose, pinned = store.put(b"loose"), store.put(b"pinned")
        store.pin(pinned)
        store.delete(loose)
        assert not store.has(loose)
        with pytest.raises(FailedPrecondition) as caught:
            store.delete(pinned)
        assert caught.value.reason == "pinned" and store.has(pinned)
        store.delete(pinned, force=True)
        assert not store.has(pinned) and not store.is_pinned(pinned)

    def test_closed_store_refuses_calls_and_context_manager_closes(
        self, store: ContentStore
    ) -> None:
        cid = store.put(b"x")
        with store as same:
            assert same is store
        with pytest.raises(FailedPrecondition):
            store.get(cid)
        with pytest.raises(FailedPrecondition):
            store.put(b"y")
        store.close()  # idempotent


class TestStoreContract(StoreContract):
    pass


# ------------------------------------------------------------------ LocalStore specifics


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_local_layout(local_store: LocalStore) -> None:
    cid = local_store.put(b"layout")
    local_store.pin(cid)
    root = local_store.root
    assert (root / "objects" / cid[-2:] / cid).read_bytes() == b"layout"
    assert (root / "pins" / cid).stat().st_size == 0
    assert local_store.path_of(cid) == root / "objects" / cid[-2:] / cid
    assert list((root / "tmp").iterdir()) == []  # temp files never outlive a put


@pytest.mark.parametrize("offset", [0, 1000, 2 * CHUNK_SIZE + 5, -1])
def test_local_detects_a_flipped_byte_on_disk(local_store: LocalStore, offset: int) -> None:
    data = _blob(2 * CHUNK_SIZE + 100)
    cid = local_store.put(data)
    path = local_store.path_of(cid)
    _flip_byte(path, offset % len(data))
    with pytest.raises(IntegrityError) as caught:
        local_store.get(cid)
    assert caught.value.reason == "hash_mismatch"
    # Streaming hands out the earlier chunks, then raises instead of yielding the last one.
    stream = local_store.iter_chunks(cid, chunk_size=CHUNK_SIZE)
    received = []
    with pytest.raises(IntegrityError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 2  # of 3 chunks: the last never arrives


def test_local_detects_truncation_and_a_put_repairs_it(local_store: LocalStore) -> None:
    data = _blob(10_000)
    cid = local_store.put(data)
    path = local_store.path_of(cid)
    path.write_bytes(data[:-1])
    with pytest.raises(IntegrityError):
        local_store.get(cid)
    assert local_store.put(data) == cid
    assert local_store.get(cid) == data


def test_local_put_of_an_existing_object_does_not_rewrite_it(local_store: LocalStore) -> None:
    cid = local_store.put(b"same bytes")
    before = local_store.path_of(cid).stat()
    local_store.put(b"same bytes")
    after = local_store.path_of(cid).stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_local_staged_writes_leave_no_temp_files(local_store: LocalStore) -> None:
    committed, dropped = local_store.stage(), local_store.stage()
    committed.write(b"kept")
    dropped.write(b"dropped")
    committed.commit(cid_of(b"kept"))
    dropped.discard()
    assert list((local_store.root / "tmp").iterdir()) == []
    # committing bytes the store already holds drops the staged copy
    again = local_store.stage()
    again.write(b"kept")
    again.commit(cid_of(b"kept"))
    assert list((local_store.root / "tmp").iterdir()) == []


def test_local_iteration_ignores_foreign_files(local_store: LocalStore) -> None:
    cid = local_store.put(b"real")
    (local_store.root / "objects" / cid[-2:] / "README").write_text("not an object")
    (local_store.root / "pins" / "junk").write_text("")
    assert list(local_store) == [cid] and list(local_store.pins()) == []


def test_two_stores_on_one_directory_see_each_other(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s") as first, LocalStore(tmp_path / "s") as second:
        cid = first.put(b"shared")
        assert second.get(cid) == b"shared"


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from storage.store import LocalStore
    def pieces():
        for i in range(64):
            yield bytes([i % 251]) * (1 << 20)
            if i == 8:
                print("halfway", flush=True)
                time.sleep(60)
    LocalStore(sys.argv[1]).put(pieces())
    """
)

_BUSY_WRITER = textwrap.dedent(
    """
    import os, sys
    from storage.store import LocalStore
    store = LocalStore(sys.argv[1])
    print("ready", flush=True)
    while True:
        store.put(os.urandom(3 << 20))
    """
)

_PUTTER = textwrap.dedent(
    """
    import sys
    from storage.store import LocalStore
    store = LocalStore(sys.argv[1])
    seed = int(sys.argv[2])
    for i in range(30):
        # half the objects are shared between the writers, half are their own
        key = i if i % 2 else 1000 * seed + i
        print(store.put(key.to_bytes(4, "little") * 100_000))
    """
)


def _python(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env
    )


def _assert_all_visible_objects_verify(root: Path) -> int:
    with LocalStore(root) as store:
        cids = list(store)
        for cid in cids:
            store.get(cid)  # raises on any partial or corrupt object
        return len(cids)


def test_sigkill_mid_put_leaves_no_visible_object(tmp_path: Path) -> None:
    root = tmp_path / "store"
    writer = _python(_SLOW_WRITER, str(root))
    try:
        assert writer.stdout.readline().strip() == "halfway"
        leftover = list((root / "tmp").iterdir())
        assert len(leftover) == 1 and leftover[0].stat().st_size >= 8 << 20  # really mid-write
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert _assert_all_visible_objects_verify(root) == 0


def test_sigkill_during_a_stream_of_puts_leaves_only_whole_objects(tmp_path: Path) -> None:
    root = tmp_path / "store"
    writer = _python(_BUSY_WRITER, str(root))
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        while not any((root / "objects").rglob("Qm*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # now some put is almost surely in flight
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        writer.kill()
        writer.wait(timeout=10)
    assert _assert_all_visible_objects_verify(root) >= 1


def test_concurrent_writers_share_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "store"
    writers = [_python(_PUTTER, str(root), str(seed)) for seed in (1, 2)]
    outputs = []
    for writer in writers:
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0
        outputs.append(out.split())
    assert all(len(cids) == 30 for cids in outputs)
    assert outputs[0][1::2] == outputs[1][1::2]  # the shared objects got the same CIDs
    assert _assert_all_visible_objects_verify(root) == 45
    assert list((root / "tmp").iterdir()) == []


def test_stale_temp_files_are_swept_on_open(tmp_path: Path) -> None:
    LocalStore(tmp_path / "s").close()
    stale, fresh = tmp_path / "s" / "tmp" / "put-stale", tmp_path / "s" / "tmp" / "put-fresh"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    LocalStore(tmp_path / "s").close()
    assert not stale.exists() and fresh.exists()  # a young one may belong to a live writer


# ------------------------------------------------------------------ opening stores


def test_open_store_urls(tmp_path: Path) -> None:
    from storage.ipfs import IpfsStore

    for url in (f"local:{tmp_path}/a", str(tmp_path / "b"), f"local://{tmp_path}/c"):
        with open_store(url) as store:
            assert isinstance(store, LocalStore)
    with open_store("ipfs:/dns/localhost/tcp/5001/http") as store:  # no network call until used
        assert isinstance(store, IpfsStore)
    assert (tmp_path / "a" / "objects").is_dir() and (tmp_path / "c" / "objects").is_dir()
    for url, needle in (
        ("s3://bucket/key", "unknown store URL scheme"),
        ("", "non-empty"),
        ("local:", "names no directory"),
    ):
        with pytest.raises(InvalidInput, match=needle) as caught:
            open_store(url)
        assert caught.value.reason == "bad_store_url"


def test_default_store_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STRATA_STORE", raising=False)
    assert default_store_path() == tmp_path / "home" / ".strata" / "store"
    monkeypatch.setenv("STRATA_STORE", str(tmp_path / "elsewhere"))
    assert default_store_path() == tmp_path / "elsewhere"


def test_layered_store_reads_through_to_later_stores(tmp_path: Path) -> None:
    first, second = LocalStore(tmp_path / "first"), LocalStore(tmp_path / "second")
    only_in_second = second.put(b"held elsewhere")
    with LayeredStore([first, second]) as layered:
        assert layered.get(only_in_second) == b"held elsewhere"
        written = layered.put(b"new")
        assert first.has(written) and not second.has(written)
        assert set(layered) == {only_in_second, written}


def test_put_with_a_known_cid_skips_rehashing_but_reads_still_verify(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "store") as store:
        data = os.urandom(300_000)
        cid = cid_of(data)
        assert store.put(data, cid=cid) == cid and store.get(cid) == data
        mtime = store.path_of(cid).stat().st_mtime_ns
        assert store.put(data, cid=cid) == cid
        assert store.path_of(cid).stat().st_mtime_ns == mtime, "an object already held is not rewritten"
        # a caller that lies about the CID cannot plant bytes unnoticed: the read re-hashes
        liar = cid_of(b"something else")
        store.put(data, cid=liar)
        with pytest.raises(IntegrityError):
            store.get(liar)
