"""IpfsStore: a ContentStore on a Kubo node's RPC API, through ipfshttpclient.

The daemon is trusted for nothing but storage: `put` hashes the bytes while it
streams them to `add` and refuses an answer naming another CID, and every read
(`get`, `iter_chunks`) is re-hashed by ContentStore before a caller sees it.

Endpoints used, all served by current Kubo: add, cat, block/stat, pin/add,
pin/rm, pin/ls. Adds use Kubo's defaults spelled out (CIDv0, dag-pb
leaves, size-262144 chunker, balanced layout), so a CID equals storage.cid.cid_of.

How the ContentStore contract maps onto IPFS (an IPFS repo has no "delete"):

- `put` adds without pinning, like LocalStore's put; an unpinned object stays in
  the node's repo until `ipfs repo gc` (Kubo runs gc only with --enable-gc). Pin
  what must survive gc.
- `has` is `block/stat offline=true` on the root block: what this node holds,
  without asking the network.
- `get` / `iter_chunks`: a CID the node holds is read with `offline=true`; any
  other is fetched from the node's peers (bitswap), bounded by `fetch_timeout`
  (passed to Kubo as its `timeout` option), and NotFound when that expires.
  `fetch=False` makes every read offline.
- `size` streams the object offline and counts its bytes (the allowed endpoints
  expose no file size; block/stat sizes only the root block). It costs a read.
- `pins()` and `__iter__` both list recursive pins: the objects this node keeps.
  Unpinned objects are not enumerable through these endpoints.
- `delete` only drops the pin (after the usual pinned/force check); the blocks
  leave at the next `ipfs repo gc`, so `has` stays true until then.

Every call carries a timeout. A daemon that is down gives Unavailable(reason=
"ipfs_unavailable"), one that does not answer in time Unavailable(reason=
"ipfs_timeout"), both naming the address; ipfshttpclient / requests / urllib3
exceptions are translated here and never escape.
"""

from __future__ import annotations

import io
import re
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import ipfshttpclient
import ipfshttpclient.exceptions as ipfs_errors
import requests
import urllib3.exceptions

from proto.errors import IntegrityError, InvalidInput, NotFound, StrataError, Unavailable
from storage.cid import CHUNK_SIZE, CidBuilder
from storage.store import ContentStore

__all__ = ["DEFAULT_FETCH_TIMEOUT", "DEFAULT_TIMEOUT", "IpfsStore", "from_url"]

DEFAULT_TIMEOUT = 30.0
DEFAULT_FETCH_TIMEOUT = 60.0
_PROBE_TIMEOUT = 10.0  # block/stat and pin/ls are local lookups; they never need long
_UPLOAD_PIECE = 1 << 20

# urllib3 2.x warns about the `strict` argument ipfshttpclient 0.7 still passes
# when it creates a connection pool; nothing we can act on.
warnings.filterwarnings(
    "ignore",
    message=r".*'strict' parameter is no longer needed.*",
    category=FutureWarning,
    module=r"urllib3\..*",
)

_NOT_FOUND = re.compile(r"not found|could not find|no link named", re.IGNORECASE)
_NOT_PINNED = re.compile(r"not pinned", re.IGNORECASE)
_DEADLINE = re.compile(r"deadline exceeded|context canceled", re.IGNORECASE)

T = TypeVar("T")


class _HashingReader(io.RawIOBase):
    """A file object over put()'s chunks that hashes every byte ipfshttpclient reads.

    The multipart encoder pulls from it as it sends, so the blob is never held twice.
    An error raised by the chunk iterator (e.g. TypeError for str) is kept and
    re-raised by the store rather than surfacing as a connection failure.
    """

    def __init__(self, chunks: Iterator[bytes | memoryview]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")
        self.builder = CidBuilder()
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            except BaseException as error:
                self.error = error
                raise
            view = memoryview(chunk)
            self._pending = view if view.format == "B" and view.ndim == 1 else view.cast("B")
            self.builder.update(self._pending)
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class IpfsStore(ContentStore):
    """A content store on a Kubo node's RPC API (addr: a multiaddr such as
    "/ip4/127.0.0.1/tcp/5001/http" or "/dns/kubo-a/tcp/5001/http")."""

    def __init__(
        self,
        addr: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        fetch: bool = True,
    ) -> None:
        if timeout <= 0 or fetch_timeout <= 0:
            raise InvalidInput("IPFS timeouts must be positive", reason="bad_timeout")
        self.addr = addr
        self.timeout = float(timeout)
        self.fetch_timeout = float(fetch_timeout)
        self.fetch = fetch
        try:
            # Client(), not connect(): connect()'s version check refuses every Kubo >= 0.8.
            self._client = ipfshttpclient.Client(
                addr, timeout=self.timeout, chunk_size=_UPLOAD_PIECE, session=True
            )
        except ipfs_errors.AddressError as error:
            raise InvalidInput(
                f"not an IPFS API multiaddr: {addr!r} ({error})", reason="bad_store_url"
            ) from None

    def __repr__(self) -> str:
        return f"IpfsStore({self.addr!r})"

    # ------------------------------------------------------------ the boundary

    def _call(self, what: str, call: Callable[[], T], *, timeout: float | None = None) -> T:
        """Run one RPC call, translating every client-library exception into ours."""
        limit = self.timeout if timeout is None else timeout
        try:
            return call()
        except StrataError:
            raise
        except ipfs_errors.ErrorResponse as error:
            raise self._error_response(what, str(error.args[0] if error.args else error)) from None
        except (
            ipfs_errors.TimeoutError,
            requests.exceptions.Timeout,
            urllib3.exceptions.TimeoutError,
        ):
            raise self._timed_out(what, limit) from None
        except (
            ipfs_errors.Error,
            requests.exceptions.RequestException,
            urllib3.exceptions.HTTPError,
            OSError,
        ) as error:
            if _is_timeout(error):
                raise self._timed_out(what, limit) from None
            failed = f"is unreachable ({what})" if isinstance(error, ipfs_errors.ConnectionError) else f"failed {what}"
            raise Unavailable(
                f"IPFS node at {self.addr} {failed}: {_root_cause(error)}", reason="ipfs_unavailable"
            ) from None

    def _timed_out(self, what: str, limit: float) -> Unavailable:
        return Unavailable(
            f"IPFS node at {self.addr} did not answer {what} within {limit:g}s", reason="ipfs_timeout"
        )

    def _error_response(self, what: str, message: str) -> StrataError:
        if _NOT_FOUND.search(message):
            return NotFound(f"{what}: IPFS node at {self.addr}: {message}", reason="not_found")
        return Unavailable(
            f"IPFS node at {self.addr} refused {what}: {message}", reason="ipfs_error"
        )

    # ------------------------------------------------------------ primitives

    def _put(self, chunks: Iterator[bytes | memoryview], known_cid: str | None = None) -> str:
        # the node hashes anyway and its answer is checked against our own CID, so known_cid adds nothing
        reader = _HashingReader(chunks)
        options = {"cid-version": 0, "raw-leaves": False, "chunker": f"size-{CHUNK_SIZE}"}

        def add() -> Any:
            return self._client.add(reader, pin=False, opts=options, timeout=self.timeout)

        try:
            answer = self._call("add", add)
        except StrataError:
            if reader.error is not None:
                raise reader.error from None
            raise
        if reader.error is not None:
            raise reader.error
        entry = answer[-1] if isinstance(answer, list) else answer
        claimed = str(entry.get("Hash", "")) if hasattr(entry, "get") else ""
        expected = reader.builder.finish()
        if claimed != expected:
            raise IntegrityError(
                f"IPFS node at {self.addr} stored {reader.builder.size} bytes as {claimed!r}, "
                f"but they hash to {expected}",
                reason="hash_mismatch",
            )
        return expected

    def _read(self, cid: str) -> bytes:
        data = bytearray()
        for piece in self._stream(cid):
            data += piece
        return bytes(data)

    def _read_chunks(self, cid: str, chunk_size: int) -> Iterator[bytes]:
        return _rechunk(self._stream(cid), chunk_size)

    def _stream(self, cid: str) -> Iterator[bytes]:
        """Open `cat` now (so NotFound is raised before iteration) and return its pieces."""
        if self._has(cid):
            what, limit = f"cat {cid}", self.timeout
            opts: dict[str, str] = {}
            offline = True
        elif self.fetch:
            what, limit = f"cat {cid} (fetch from peers)", self.fetch_timeout
            opts = {"timeout": f"{self.fetch_timeout:g}s"}  # Kubo cancels its own search
            offline = False
        else:
            raise NotFound(f"object {cid} not on IPFS node {self.addr}", reason="not_found")
        read_timeout = limit + (0 if offline else self.timeout)
        try:
            pieces = self._call(
                what,
                lambda: self._client.cat(
                    cid,
                    stream=True,
                    offline=offline,
                    opts=opts,
                    timeout=(self.timeout, read_timeout),
                ),  # fmt: skip
                timeout=read_timeout,
            )
        except Unavailable as error:
            if not offline and error.reason == "ipfs_error" and _DEADLINE.search(error.message):
                raise NotFound(
                    f"object {cid} is not on IPFS node {self.addr} and none of its peers "
                    f"provided it within {self.fetch_timeout:g}s",
                    reason="not_found",
                ) from None
            raise
        return self._guarded(what, pieces, read_timeout)

    def _guarded(self, what: str, pieces: Iterator[bytes], limit: float) -> Iterator[bytes]:
        iterator = iter(pieces)
        try:
            while True:
                piece = self._call(what, lambda: next(iterator, None), timeout=limit)
                if piece is None:
                    return
                if piece:
                    yield piece
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    def _has(self, cid: str) -> bool:
        try:
            self._call(
                f"block/stat {cid}",
                lambda: self._client.block.stat(cid, offline=True, timeout=_short(self)),
                timeout=_short(self),
            )
        except NotFound:
            return False
        return True

    def _size(self, cid: str) -> int:
        if not self._has(cid):
            raise NotFound(f"object {cid} not on IPFS node {self.addr}", reason="not_found")
        return sum(len(piece) for piece in self._stream(cid))

    def _pin(self, cid: str) -> None:
        if not self._has(cid):
            raise NotFound(f"cannot pin {cid}: not on IPFS node {self.addr}", reason="not_found")
        self._call(
            f"pin/add {cid}",
            lambda: self._client.pin.add(cid, offline=True, timeout=self.timeout),
        )

    def _unpin(self, cid: str) -> None:
        try:
            self._call(f"pin/rm {cid}", lambda: self._client.pin.rm(cid, timeout=self.timeout))
        except Unavailable as error:
            if error.reason == "ipfs_error" and _NOT_PINNED.search(error.message):
                return  # already unpinned
            raise

    def _is_pinned(self, cid: str) -> bool:
        try:
            answer = self._call(
                f"pin/ls {cid}",
                lambda: self._client.pin.ls(cid, type="recursive", timeout=_short(self)),
                timeout=_short(self),
            )
        except (NotFound, Unavailable) as error:
            if error.reason in ("not_found", "ipfs_error") and _NOT_PINNED.search(error.message):
                return False
            raise
        return cid in answer.get("Keys", {})

    def _pins(self) -> Iterator[str]:
        answer = self._call(
            "pin/ls", lambda: self._client.pin.ls(type="recursive", timeout=self.timeout)
        )
        return iter(sorted(answer.get("Keys", {})))

    def _cids(self) -> Iterator[str]:
        return self._pins()

    def _delete(self, cid: str) -> None:
        # ContentStore.delete already refused a pinned object or dropped its pin (force);
        # IPFS frees the blocks at the next `repo gc`.
        if not self._has(cid):
            raise NotFound(f"object {cid} not on IPFS node {self.addr}", reason="not_found")

    def _close(self) -> None:
        self._client.close()


def _short(store: IpfsStore) -> float:
    return min(store.timeout, _PROBE_TIMEOUT)


def _rechunk(pieces: Iterator[bytes], chunk_size: int) -> Iterator[bytes]:
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= chunk_size:
            yield bytes(buffer[:chunk_size])
            del buffer[:chunk_size]
    if buffer:
        yield bytes(buffer)


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
        if current is None and hasattr(error, "original"):
            current = getattr(error, "original", None)


def _is_timeout(error: BaseException) -> bool:
    causes = list(_causes(error))
    # urllib3 2.x makes NewConnectionError (refused, unreachable) a ConnectTimeoutError subclass.
    refused = (urllib3.exceptions.NewConnectionError, ConnectionRefusedError)
    if any(isinstance(cause, refused) for cause in causes):
        return False
    timeouts = (
        TimeoutError,
        ipfs_errors.TimeoutError,
        requests.exceptions.Timeout,
        urllib3.exceptions.TimeoutError,
    )
    return any(isinstance(cause, timeouts) for cause in _causes(error)) or "timed out" in str(error)


def _root_cause(error: BaseException) -> str:
    *_, last = _causes(error)
    return f"{type(last).__name__}: {last}"


def from_url(url: str) -> IpfsStore:
    """An IpfsStore from "ipfs:<multiaddr>[?timeout=S&fetch_timeout=S&fetch=0|1]",
    e.g. "ipfs:/ip4/127.0.0.1/tcp/5001/http" or "ipfs:/dns/kubo-a/tcp/5001/http?timeout=10"."""
    if not isinstance(url, str) or not url.lower().startswith("ipfs:"):
        raise InvalidInput(f"not an ipfs: store URL: {url!r}", reason="bad_store_url")
    addr, _, query = url[len("ipfs:") :].partition("?")
    addr = addr.removeprefix("//")
    if not addr.startswith("/"):
        raise InvalidInput(
            f"store URL {url!r} needs a multiaddr, e.g. ipfs:/ip4/127.0.0.1/tcp/5001/http",
            reason="bad_store_url",
        )
    options: dict[str, Any] = {}
    for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        value = values[-1]
        try:
            if key in ("timeout", "fetch_timeout"):
                options[key] = float(value)
            elif key == "fetch":
                if value.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(value)
                options[key] = value.lower() in ("1", "true")
            else:
                raise InvalidInput(
                    f"unknown option {key!r} in store URL {url!r} "
                    "(expected timeout, fetch_timeout, fetch)",
                    reason="bad_store_url",
                )
        except ValueError:
            raise InvalidInput(
                f"bad value {value!r} for {key} in store URL {url!r}", reason="bad_store_url"
            ) from None
    return IpfsStore(addr, **options)
