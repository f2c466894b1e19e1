"""Content stores: blobs in, CIDs out, and every read re-checks the hash.

`ContentStore` owns the contract every implementation shares: CID syntax is
validated on every call, `put` hashes while it streams, and `get` /
`iter_chunks` refuse bytes that do not hash to the CID asked for. Subclasses
supply only the storage primitives (the underscore methods).

`LocalStore` is a directory several processes may share::

    root/objects/<last 2 chars of cid>/<cid>   the blobs, immutable once visible
    root/pins/<cid>                            empty marker files
    root/tmp/                                  writes in progress

A blob becomes visible only through an atomic rename of a fully written,
fsynced temp file, so a writer killed mid-put leaves at most a stray temp file,
never a partial object.
"""

from __future__ import annotations

import abc
import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from proto.errors import FailedPrecondition, IntegrityError, InvalidInput, NotFound
from storage.cid import CidBuilder, cid_of, is_cid, validate_cid

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ContentStore",
    "LayeredStore",
    "LocalStore",
    "PutData",
    "default_store_path",
]

DEFAULT_CHUNK_SIZE = 1 << 20
_STALE_TEMP_SECONDS = 3600.0  # older temp files belong to writers that died

PutData = bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO


def _chunks_of(data: PutData, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes | memoryview]:
    """The pieces of `data`, whatever form it came in."""
    if isinstance(data, bytes | bytearray | memoryview):
        yield data
    elif hasattr(data, "read"):
        while piece := data.read(chunk_size):  # type: ignore[union-attr]
            yield piece
    elif isinstance(data, str):
        raise TypeError("put() takes bytes, not str; encode it first")
    else:
        for piece in data:
            if not isinstance(piece, bytes | bytearray | memoryview):
                raise TypeError(f"put() iterables must yield bytes, got {type(piece).__name__}")
            yield piece


def _hash_mismatch(cid: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"object {cid} failed verification: its bytes hash to {actual}", reason="hash_mismatch"
    )


class StagedWrite:
    """Bytes handed to a store as they arrive, made durable under their CID only by `commit`.

    A receiver writes an upload while it is still streaming in, so the durable write
    overlaps the network instead of following it. `discard` (or garbage) drops it;
    both are idempotent, and `discard` after `commit` keeps what was committed.
    """

    def __init__(self, store: ContentStore) -> None:
        self._store = store
        self._pieces: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        self._pieces.append(data)

    def commit(self, cid: str) -> str:
        """Store what was written under `cid` (the caller hashed these very bytes); return it."""
        pieces, self._pieces = self._pieces, []
        return self._store.put(iter(pieces), cid=cid)

    def discard(self) -> None:
        self._pieces = []


class ContentStore(abc.ABC):
    """A content-addressed blob store. Use as a context manager, or call close()."""

    _closed = False

    # ------------------------------------------------------------ public contract

    def put(self, data: PutData, *, cid: str | None = None) -> str:
        """Store `data` (bytes, an iterable of bytes, or a binary file object); return its CID.

        Putting bytes that are already stored is a no-op that returns the same CID.
        `cid` is for a caller that has just computed the CID of these very bytes (e.g.
        while receiving them): a store may then skip hashing them again, and skip the
        write when it holds the object. A wrong `cid` cannot go unnoticed: every read
        re-hashes.
        """
        self._check_open()
        if cid is not None:
            validate_cid(cid)
            if self._has_sized(cid, data):
                return cid
        return self._put(_chunks_of(data), known_cid=cid)

    def _has_sized(self, cid: str, data: PutData) -> bool:
        """Whether an intact-looking copy of `cid` is already stored (stores may refine this)."""
        return False

    def stage(self) -> StagedWrite:
        """Start writing an object whose CID will be known only at the end (see `StagedWrite`)."""
        self._check_open()
        return StagedWrite(self)

    def get(self, cid: str) -> bytes:
        """The bytes of `cid`, re-hashed: IntegrityError(reason="hash_mismatch") if they do
        not hash to `cid` (they are never returned), NotFound if absent."""
        self._check(cid)
        data = self._read(cid)
        actual = cid_of(data)
        if actual != cid:
            raise _hash_mismatch(cid, actual)
        return data

    def iter_chunks(self, cid: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Stream `cid` in pieces of at most `chunk_size` bytes, verified as they pass.

        The whole object can only be checked at its end, so the verdict comes with the
        last chunk: on a mismatch the last chunk is withheld and IntegrityError(reason=
        "hash_mismatch") is raised instead. A consumer must not act on the earlier chunks
        until the iterator is exhausted. NotFound is raised here, before iteration starts.
        """
        self._check(cid)
        if chunk_size < 1:
            raise InvalidInput("chunk_size must be positive", reason="bad_chunk_size")
        return self._verified(cid, self._read_chunks(cid, chunk_size))

    def has(self, cid: str) -> bool:
        self._check(cid)
        return self._has(cid)

    def size(self, cid: str) -> int:
        """Size in bytes of the stored object (not re-hashed); NotFound if absent."""
        self._check(cid)
        return self._size(cid)

    def pin(self, cid: str) -> None:
        """Protect `cid` from delete() and garbage collection. NotFound if absent. Idempotent."""
        self._check(cid)
        self._pin(cid)

    def unpin(self, cid: str) -> None:
        """Remove the pin on `cid`, if any. Idempotent."""
        self._check(cid)
        self._unpin(cid)

    def is_pinned(self, cid: str) -> bool:
        self._check(cid)
        return self._is_pinned(cid)

    def pins(self) -> Iterator[str]:
        self._check_open()
        return self._pins()

    def __iter__(self) -> Iterator[str]:
        """Every stored CID, in no particular order."""
        self._check_open()
        return self._cids()

    def delete(self, cid: str, *, force: bool = False) -> None:
        """Remove `cid`. A pinned object is refused (FailedPrecondition, reason="pinned")
        unless `force`, which also drops the pin. NotFound if absent."""
        self._check(cid)
        if self._is_pinned(cid):
            if not force:
                raise FailedPrecondition(
                    f"object {cid} is pinned; unpin it or pass force=True", reason="pinned"
                )
            self._unpin(cid)
        self._delete(cid)

    def close(self) -> None:
        """Release resources. Idempotent; any other call afterwards fails."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"{type(self).__name__} is closed", reason="store_closed")

    def _check(self, cid: str) -> None:
        self._check_open()
        validate_cid(cid)

    @staticmethod
    def _verified(cid: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        builder = CidBuilder()
        held: bytes | None = None  # one chunk of look-ahead, so the last one carries the verdict
        for chunk in chunks:
            if held is not None:
                yield held
            builder.update(chunk)
            held = chunk
        actual = builder.finish()
        if actual != cid:
            raise _hash_mismatch(cid, actual)
        if held is not None:
            yield held

    # ------------------------------------------------------------ primitives

    @abc.abstractmethod
    def _put(self, chunks: Iterator[bytes | memoryview], known_cid: str | None = None) -> str:
        """Store the concatenated chunks, computing the CID with storage.cid as they stream
        (a store may trust `known_cid` instead of hashing)."""

    @abc.abstractmethod
    def _read(self, cid: str) -> bytes:
        """The stored bytes, unverified; raise NotFound if absent."""

    @abc.abstractmethod
    def _read_chunks(self, cid: str, chunk_size: int) -> Iterator[bytes]:
        """Raise NotFound now if absent, else return an iterator over the stored bytes."""

    @abc.abstractmethod
    def _has(self, cid: str) -> bool: ...

    @abc.abstractmethod
    def _size(self, cid: str) -> int: ...

    @abc.abstractmethod
    def _pin(self, cid: str) -> None: ...

    @abc.abstractmethod
    def _unpin(self, cid: str) -> None: ...

    @abc.abstractmethod
    def _is_pinned(self, cid: str) -> bool: ...

    @abc.abstractmethod
    def _pins(self) -> Iterator[str]: ...

    @abc.abstractmethod
    def _cids(self) -> Iterator[str]: ...

    @abc.abstractmethod
    def _delete(self, cid: str) -> None: ...

    def _close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing open
        """Release resources; called once."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(ContentStore):
    """A directory of blobs, safe to share between processes on one machine."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._objects = self.root / "objects"
        self._pin_dir = self.root / "pins"
        self._tmp = self.root / "tmp"
        for directory in (self._objects, self._pin_dir, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_temps()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path_of(self, cid: str) -> Path:
        """Where `cid` lives (or would live) on disk."""
        validate_cid(cid)
        return self._objects / cid[-2:] / cid

    def _sweep_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)

    def _has_sized(self, cid: str, data: PutData) -> bool:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return False
        try:
            return (self._objects / cid[-2:] / cid).stat().st_size == memoryview(data).nbytes
        except FileNotFoundError:
            return False

    def _put(self, chunks: Iterator[bytes | memoryview], known_cid: str | None = None) -> str:
        builder = None if known_cid else CidBuilder()
        size = 0
        fd, temp = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    if builder is not None:
                        builder.update(chunk)
                    size += out.write(chunk)
                out.flush()
                os.fchmod(out.fileno(), 0o644)
                os.fsync(out.fileno())
            cid = known_cid or builder.finish()
            self._install(temp, size, cid)
            temp = ""
            return cid
        finally:
            if temp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def _install(self, temp: str, size: int, cid: str) -> None:
        """Move a durable temp file into place as `cid` (or drop it when an intact copy exists)."""
        target = self._objects / cid[-2:] / cid
        try:
            existing = target.stat().st_size
        except FileNotFoundError:
            existing = None
        if existing == size:
            os.unlink(temp)  # already stored
            return
        # Absent, or a damaged copy of the wrong size: (re)place it atomically.
        target.parent.mkdir(exist_ok=True)
        os.replace(temp, target)
        _fsync_dir(target.parent)

    def stage(self) -> StagedWrite:
        self._check_open()
        return _LocalStagedWrite(self)

    def _open(self, cid: str) -> BinaryIO:
        try:
            return open(self._objects / cid[-2:] / cid, "rb")  # the caller closes it
        except FileNotFoundError:
            raise NotFound(f"object {cid} not in store {self.root}", reason="not_found") from None

    def _read(self, cid: str) -> bytes:
        with self._open(cid) as handle:
            return handle.read()

    def _read_chunks(self, cid: str, chunk_size: int) -> Iterator[bytes]:
        handle = self._open(cid)

        def chunks() -> Iterator[bytes]:
            with handle:
                while piece := handle.read(chunk_size):
                    yield piece

        return chunks()

    def _has(self, cid: str) -> bool:
        return (self._objects / cid[-2:] / cid).is_file()

    def _size(self, cid: str) -> int:
        try:
            return (self._objects / cid[-2:] / cid).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"object {cid} not in store {self.root}", reason="not_found") from None

    def _pin(self, cid: str) -> None:
        if not self._has(cid):
            raise NotFound(f"cannot pin {cid}: not in store {self.root}", reason="not_found")
        (self._pin_dir / cid).touch()

    def _unpin(self, cid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._pin_dir / cid).unlink()

    def _is_pinned(self, cid: str) -> bool:
        return (self._pin_dir / cid).exists()

    def _pins(self) -> Iterator[str]:
        return (entry.name for entry in os.scandir(self._pin_dir) if is_cid(entry.name))

    def _cids(self) -> Iterator[str]:
        for shard in os.scandir(self._objects):
            if shard.is_dir():
                for entry in os.scandir(shard.path):
                    if is_cid(entry.name) and entry.name.endswith(shard.name):
                        yield entry.name

    def _delete(self, cid: str) -> None:
        try:
            (self._objects / cid[-2:] / cid).unlink()
        except FileNotFoundError:
            raise NotFound(f"object {cid} not in store {self.root}", reason="not_found") from None


class LayeredStore(ContentStore):
    """Several stores read as one: writes go to the first, reads try each in order.

    For walking a lineage that spans stores, e.g. an aggregator's store and a relay's
    private store holding the device updates behind it.
    """

    def __init__(self, stores: Sequence[ContentStore]) -> None:
        if not stores:
            raise InvalidInput("a layered store needs at least one store", reason="bad_store_url")
        self.stores = list(stores)

    def __repr__(self) -> str:
        return f"LayeredStore({self.stores!r})"

    def _holder(self, cid: str) -> ContentStore:
        for store in self.stores:
            if store.has(cid):
                return store
        raise NotFound(f"object {cid} is in none of {self.stores!r}", reason="not_found")

    def _put(self, chunks: Iterator[bytes | memoryview], known_cid: str | None = None) -> str:
        return self.stores[0].put(chunks, cid=known_cid)

    def _read(self, cid: str) -> bytes:
        return self._holder(cid).get(cid)

    def _read_chunks(self, cid: str, chunk_size: int) -> Iterator[bytes]:
        return self._holder(cid).iter_chunks(cid, chunk_size)

    def _has(self, cid: str) -> bool:
        return any(store.has(cid) for store in self.stores)

    def _size(self, cid: str) -> int:
        return self._holder(cid).size(cid)

    def _pin(self, cid: str) -> None:
        self._holder(cid).pin(cid)

    def _unpin(self, cid: str) -> None:
        for store in self.stores:
            store.unpin(cid)

    def _is_pinned(self, cid: str) -> bool:
        return any(store.is_pinned(cid) for store in self.stores)

    def _pins(self) -> Iterator[str]:
        return iter(dict.fromkeys(cid for store in self.stores for cid in store.pins()))

    def _cids(self) -> Iterator[str]:
        return iter(dict.fromkeys(cid for store in self.stores for cid in store))

    def _delete(self, cid: str) -> None:
        self._holder(cid).delete(cid)

    def _close(self) -> None:
        for store in self.stores:
            store.close()


def default_store_path() -> Path:
    """$STRATA_STORE if set, else ~/.strata/store (honouring $HOME)."""
    configured = os.environ.get("STRATA_STORE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.path.expanduser("~")) / ".strata" / "store"


# a staged write asks the kernel to write back what it holds every this many bytes, so the
# final fsync (the acknowledgement's wait) flushes only the tail
_WRITEBACK_EVERY = 1 << 20


class _LocalStagedWrite(StagedWrite):
    """A temp file in the store's tmp directory, written back as it grows, renamed into place on commit."""

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store)
        self._local = store
        fd, self._temp = tempfile.mkstemp(dir=store._tmp, prefix="staged-")
        self._file = os.fdopen(fd, "wb")
        self._size = 0
        self._unsynced = 0

    def write(self, data: bytes | memoryview) -> None:
        written = self._file.write(data)
        self._size += written
        self._unsynced += written
        if self._unsynced >= _WRITEBACK_EVERY:
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    def commit(self, cid: str) -> str:
        validate_cid(cid)
        self._file.flush()
        os.fchmod(self._file.fileno(), 0o644)
        os.fsync(self._file.fileno())
        self._file.close()
        self._local._install(self._temp, self._size, cid)
        self._temp = ""
        return cid

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._temp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)
            self._temp = ""
