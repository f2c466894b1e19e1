"""gRPC plumbing shared by every Strata process: channels, typed errors on the client side, chunked streams.

- `create_channel` applies the same message-size limits and keepalive settings as
  `proto.serving.create_server` (where servers, and the server side of error
  mapping, live); `error_from_rpc` turns a failed call back into its typed error.
- `iter_chunks`, `stream_with_header`, `Reassembler` and `read_header_stream` move
  weights as ~1 MiB chunks, refusing out-of-order, oversize and truncated streams.

This module imports nothing of ours except `proto.errors`; logs use the plain
`extra={"fields": {...}}` convention that `strata.logs` renders.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from proto import strata_pb2
from proto.errors import (
    Conflict,
    FailedPrecondition,
    IntegrityError,
    InvalidInput,
    NotFound,
    StrataError,
    Unavailable,
    WireError,
)

CHUNK_SIZE = 1 << 20
# Chunks are ~1 MiB, so 4 MiB leaves room for headers (manifests) and nothing bigger.
MAX_MESSAGE_BYTES = 4 << 20
DEFAULT_TIMEOUT_S = 30.0
STREAM_TIMEOUT_S = 300.0

REASON_METADATA_KEY = "strata-reason"

KEEPALIVE_TIME_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0

log = logging.getLogger("strata.wire")

T = TypeVar("T")


# ---------------------------------------------------------------- channels


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """PEM paths. A server needs cert+key; `ca` on a server demands client certificates (mTLS)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None


def _size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    if tls.cert is None or tls.key is None:
        raise InvalidInput("a TLS server needs both a certificate and a key", reason="tls_config")
    pair = (Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())
    root = Path(tls.ca).read_bytes() if tls.ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def channel_options(
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    keepalive_time_s: float = KEEPALIVE_TIME_S,
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
) -> list[tuple[str, Any]]:
    """The options every Strata channel uses (also for grpc.aio channels a caller builds itself)."""
    return _size_options(max_message_bytes) + [
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC backs off up to 120 s between reconnects by default; a peer that comes
        # back (a restarted aggregator or coordinator) should be found within seconds
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def create_channel(
    address: str,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    keepalive_time_s: float = KEEPALIVE_TIME_S,
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
    tls: TlsFiles | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel with the same size limits as `create_server` and client keepalive.

    With `tls`, `ca` verifies the server and `cert`+`key` present a client certificate;
    `credentials` (e.g. from a bundle held in memory) stand in for the files.
    """
    opts = channel_options(
        max_message_bytes=max_message_bytes, keepalive_time_s=keepalive_time_s, keepalive_timeout_s=keepalive_timeout_s
    ) + list(options)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=opts)
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    root = Path(tls.ca).read_bytes() if tls.ca else None
    key = Path(tls.key).read_bytes() if tls.key else None
    cert = Path(tls.cert).read_bytes() if tls.cert else None
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, creds, options=opts)


# ---------------------------------------------------------------- errors, client side

_ERROR_BY_STATUS: dict[grpc.StatusCode, type[StrataError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
}
# Reasons raised as WireError by this module; they share INVALID_ARGUMENT with InvalidInput.
_WIRE_REASONS = frozenset(
    {"bad_stream", "out_of_order", "oversize", "truncated", "hash_mismatch", "missing_header", "unexpected_header", "stalled"}
)
_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def _is_size_refusal(code: grpc.StatusCode | None, details: str) -> bool:
    # gRPC reports an over-limit message as RESOURCE_EXHAUSTED too; resending it never helps.
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details


def _rpc_parts(e: grpc.RpcError) -> tuple[grpc.StatusCode | None, str, str | None]:
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or ""
    reason = None
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == REASON_METADATA_KEY:
            reason = value if isinstance(value, str) else value.decode("ascii", "replace")
    return code, details, reason


def error_from_rpc(e: grpc.RpcError) -> StrataError:
    """The typed error a failed call stands for; the caller raises it `from e`."""
    code, details, reason = _rpc_parts(e)
    message = details
    if reason and details.startswith(f"{reason}: "):
        message = details[len(reason) + 2 :]
    if code == grpc.StatusCode.INVALID_ARGUMENT and reason in _WIRE_REASONS:
        cls: type[StrataError] = WireError
    elif _is_size_refusal(code, details):
        cls, reason = InvalidInput, reason or "message_too_large"
    else:
        cls = _ERROR_BY_STATUS.get(code, StrataError) if code is not None else StrataError
    if reason is None and code is not None:
        reason = code.name.lower()
    err = cls(message or (code.name if code else "rpc failed"), reason=reason)
    if cls is StrataError and code is not None:
        # keep the real status (e.g. UNAUTHENTICATED) visible on the generic error
        err.status = code.name
    return err


def is_retryable(e: BaseException, *, idempotent: bool = False) -> bool:
    """True for failures a later attempt may not hit: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
    whether raw RPC errors or the typed errors `error_from_rpc` made of them.

    For an idempotent call (Join), CANCELLED is retryable too: a caller that cancelled its own call
    stops before asking, so CANCELLED here came from the channel or the server going away under
    it, which a fleet losing an aggregator sees by the thousand."""
    if isinstance(e, grpc.RpcError):
        code, details, _ = _rpc_parts(e)
        if idempotent and code == grpc.StatusCode.CANCELLED:
            return True
        return code in _RETRYABLE and not _is_size_refusal(code, details)
    if idempotent and isinstance(e, StrataError) and e.status == "CANCELLED":
        return True
    # error_from_rpc keeps RESOURCE_EXHAUSTED as the status of a plain StrataError (a size refusal
    # becomes InvalidInput instead)
    return isinstance(e, Unavailable) or (isinstance(e, StrataError) and e.status == "RESOURCE_EXHAUSTED")


# ---------------------------------------------------------------- chunked streams


def iter_chunks(data: bytes | bytearray | memoryview, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, memoryview]]:
    """(offset, view) pairs covering `data` in order; views share the caller's buffer."""
    if chunk_size <= 0:
        raise InvalidInput(f"chunk_size must be positive, got {chunk_size}", reason="bad_chunk_size")
    view = memoryview(data).cast("B")
    for offset in range(0, len(view), chunk_size):
        yield offset, view[offset : offset + chunk_size]


def stream_with_header(
    message_cls: Callable[..., T],
    header: Any,
    data: bytes | bytearray | memoryview,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[T]:
    """The messages of a header-then-chunks stream, e.g. `stream_with_header(pb.UpdateChunk, hdr, blob)`.

    Works for every `oneof part { X header; Chunk chunk; }` message (ModelChunk,
    UpdateChunk, BlobChunk). Each chunk is copied once, into its protobuf message.
    """
    yield message_cls(header=header)
    for offset, view in iter_chunks(data, chunk_size):
        yield message_cls(chunk=strata_pb2.Chunk(offset=offset, data=view.tobytes()))


class Reassembler:
    """Rebuilds a byte stream from (offset, data) chunks, refusing anything but a clean stream.

    Raises WireError with reason "oversize", "out_of_order", "truncated" or
    "hash_mismatch". `sha256` (hex) is checked incrementally; `verify(data)` runs on
    the finished bytes and may raise (storage passes a CID check here).
    """

    def __init__(
        self,
        expected_size: int,
        *,
        max_size: int,
        expected_cid: str | None = None,
        sha256: str | None = None,
        verify: Callable[[bytes], None] | None = None,
    ) -> None:
        what = f" for {expected_cid}" if expected_cid else ""
        if expected_size < 0:
            raise WireError(f"negative stream size {expected_size}{what}", reason="oversize")
        if expected_size > max_size:
            raise WireError(
                f"stream{what} declares {expected_size} bytes, more than the limit of {max_size}",
                reason="oversize",
            )
        self.expected_size = expected_size
        self.expected_cid = expected_cid
        self._what = what
        # the pieces as they arrived, joined once at the end: a declared size is a stranger's
        # claim, not a reason to allocate, and growing one buffer would copy it again and again
        self._pieces: list[bytes | memoryview] = []
        self._received = 0
        self._sha256 = sha256.lower() if sha256 else None
        self._hasher = hashlib.sha256() if sha256 else None
        self._verify = verify
        self._finished = False

    def add(self, offset: int, data: bytes | memoryview) -> None:
        if self._finished:
            raise WireError(f"chunk at offset {offset} arrived after the stream{self._what} ended", reason="out_of_order")
        if offset != self._received:
            hint = " (duplicate or overlapping chunk)" if offset < self._received else " (a chunk is missing)"
            raise WireError(
                f"chunk at offset {offset} arrived but {self._received} bytes were expected next{hint}",
                reason="out_of_order",
            )
        end = offset + len(data)
        if end > self.expected_size:
            raise WireError(
                f"chunk at offset {offset} of {len(data)} bytes runs past the declared size "
                f"{self.expected_size}{self._what}",
                reason="oversize",
            )
        self._pieces.append(data)
        if self._hasher is not None:
            self._hasher.update(data)
        self._received = end

    def finish(self) -> bytes:
        if self._received != self.expected_size:
            raise WireError(
                f"stream{self._what} ended after {self._received} of {self.expected_size} bytes",
                reason="truncated",
            )
        self._finished = True
        if self._hasher is not None and self._hasher.hexdigest() != self._sha256:
            raise WireError(
                f"stream{self._what} hashes to sha256 {self._hasher.hexdigest()}, not the declared {self._sha256}",
                reason="hash_mismatch",
            )
        data = b"".join(self._pieces)
        self._pieces = []
        if self._verify is not None:
            self._verify(data)
        return data


def read_header_stream(
    messages: Iterable[Any],
    *,
    size_of: Callable[[Any], int],
    max_size: int,
    verify: Callable[[Any, bytes], None] | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> tuple[Any, bytes]:
    """Consume a header-then-chunks stream (ModelChunk, UpdateChunk, BlobChunk): (header, bytes).

    `size_of(header)` gives the declared size (e.g. `lambda h: h.weights_size`);
    `verify(header, data)` may check the bytes against the header's CID; `on_chunk`
    sees each accepted chunk as it arrives (e.g. to hash while the rest is in flight).
    """
    iterator = iter(messages)
    first = next(iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise WireError("stream must start with a header", reason="missing_header")
    header = first.header
    reassembler = Reassembler(size_of(header), max_size=max_size)
    for message in iterator:
        if message.WhichOneof("part") != "chunk":
            raise WireError("a second header arrived inside the stream", reason="unexpected_header")
        reassembler.add(message.chunk.offset, message.chunk.data)
        if on_chunk is not None:
            on_chunk(message.chunk.data)
    data = reassembler.finish()
    if verify is not None:
        verify(header, data)
    return header, data
