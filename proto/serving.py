"""Serving gRPC without a thread per connection: grpc.aio servers on one event loop, driven from sync code.

Every Strata daemon serves through `create_server`. Handlers are coroutines on
one process-wide event loop (its own thread), so 10,000 idle WatchModels streams
or stalled uploads cost memory, not threads. Work that blocks or burns CPU
(hashing, validation, SQLite, the store) goes through `ServerHandle.offload` to
a bounded thread pool, so one slow call never stalls the loop.

- `ErrorInterceptor` is the one place where typed `StrataError`s become gRPC
  status (reason in the "strata-reason" trailer). It also parses every request
  itself, so bytes that are not the declared message are INVALID_ARGUMENT with
  one log line, not a traceback (and not the per-failure leak of grpcio's
  thread-pool server).
- `Signal` wakes coroutines on the loop when something changes in another
  thread (a new base model, a new ring).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto.errors import FailedPrecondition, InvalidInput, StrataError, Unavailable, WireError
from proto.wire import (
    KEEPALIVE_TIME_S,
    KEEPALIVE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    REASON_METADATA_KEY,
    Reassembler,
    TlsFiles,
    server_credentials,
)

log = logging.getLogger("strata.serving")

T = TypeVar("T")

# The server must accept pings at least as often as clients send them, or it
# answers with GOAWAY "too_many_pings" and drops the connection. grpc core reads it
# only as "grpc.http2.min_ping_interval_without_data_ms" (GRPC_ARG_HTTP2_MIN_RECV_...).
_SERVER_MIN_PING_INTERVAL_S = 10.0
# one log line per this many seconds for each kind of refused garbage, however much arrives
_REFUSAL_LOG_INTERVAL_S = 5.0
# status details are sent as trailing metadata, which gRPC caps at 16 KiB
_MAX_DETAILS_CHARS = 1024


# ---------------------------------------------------------------- the loop


class _Loop:
    """The process's serving loop, started on first use, on a daemon thread."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=run, name="strata-serving-loop", daemon=True).start()
                ready.wait()
                cls._loop = loop
            return cls._loop


def serving_loop() -> asyncio.AbstractEventLoop:
    """The event loop every server of this process runs on."""
    return _Loop.get()


def run_on_loop(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the serving loop from another thread and return its result."""
    loop = serving_loop()
    if _running_loop() is loop:
        raise FailedPrecondition("run_on_loop called from the serving loop itself", reason="deadlock")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Signal:
    """A thread-safe "something changed" broadcast to coroutines on the serving loop.

    A waiter checks the state it cares about, then `await signal.wait(timeout)`;
    `notify()` from any thread wakes every waiter. Checking and waiting both run on
    the loop with no await between them, so no change can slip through unseen.
    """

    def __init__(self) -> None:
        self._loop = serving_loop()
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> bool:
        """True when notified, False after `timeout` seconds. (A timer, not a task per wait:
        10,000 watch streams wake through here.)"""
        event = self._event
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False


# ---------------------------------------------------------------- servers


class ServerHandle:
    """A grpc.aio server bound to its port, started and stopped from sync code.

    Register servicers on `.server` before `start()`. `start`/`stop` are idempotent,
    and the handle is a context manager that stops the server on exit.
    """

    def __init__(
        self,
        *,
        server: grpc.aio.Server,
        port: int,
        host: str,
        health_servicer: health.aio.HealthServicer,
        workers: int,
    ) -> None:
        self.server = server
        self.port = port
        self.host = host
        self.health = health_servicer
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="strata-offload")
        self._state = "created"
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking or CPU-bound `fn` in this server's bounded pool, off the loop."""
        return await serving_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def start(self) -> ServerHandle:
        with self._lock:
            if self._state == "stopped":
                raise FailedPrecondition("a stopped server cannot be restarted", reason="server_stopped")
            if self._state == "created":
                run_on_loop(self._start())
                self._state = "started"
        return self

    async def _start(self) -> None:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def set_serving(self, service: str, serving: bool) -> None:
        """Health status of one service, e.g. "strata.v1.AgentService"."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        run_on_loop(self.health.set(service, status))

    def stop(self, grace: float | None = 1.0) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then cancel them."""
        with self._lock:
            if self._state == "stopped":
                return
            was_started, self._state = self._state == "started", "stopped"
        # a bound but never started aio server still holds its port until stopped
        run_on_loop(self._stop(grace, was_started))
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _stop(self, grace: float | None, was_started: bool) -> None:
        if was_started:
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    def __enter__(self) -> ServerHandle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_server(
    address: str = "127.0.0.1:0",
    *,
    workers: int = 8,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    tls: TlsFiles | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> ServerHandle:
    """A grpc.aio server with limits, keepalive, health and `ErrorInterceptor`, bound but not started.

    `workers` sizes the pool `offload` runs blocking work in. Port 0 binds a free
    port; the handle's `.port` is the one bound. TLS comes from `tls` (files) or
    `credentials` (e.g. reloading ones, `trust.security`); neither is plaintext.
    """
    if tls is not None and credentials is None:
        credentials = server_credentials(tls)
    return run_on_loop(_create(address, workers, tuple(interceptors), max_message_bytes, credentials))


async def _create(
    address: str,
    workers: int,
    interceptors: tuple[grpc.aio.ServerInterceptor, ...],
    max_message_bytes: int,
    credentials: grpc.ServerCredentials | None,
) -> ServerHandle:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(_SERVER_MIN_PING_INTERVAL_S * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        # Without this two servers can silently share a port on Linux.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        # Outermost, so it also maps typed errors raised by handlers other interceptors return.
        interceptors=[ErrorInterceptor(), *interceptors],
        options=options,
        maximum_concurrent_rpcs=None,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise Unavailable(f"cannot bind {address}: {e}", reason="bind_failed") from e
    if port == 0:
        raise Unavailable(f"cannot bind {address}", reason="bind_failed")
    host = address.rsplit(":", 1)[0]
    return ServerHandle(server=server, port=port, host=host, health_servicer=health_servicer, workers=workers)


# ---------------------------------------------------------------- errors and parsing


class _RateLimitedLog:
    """One line per (event, key) per interval, with how many were folded into it."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, event: str, key: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get((event, key), (float("-inf"), 0))
        if now - last < self._interval_s:
            self._last[(event, key)] = (last, suppressed + 1)
            return
        self._last[(event, key)] = (now, 0)
        if len(self._last) > 10_000:  # keys are method names and reasons; bound it anyway
            self._last.clear()
        log.info(event, extra={"fields": {**fields, "suppressed": suppressed}})


_log_refusal = _RateLimitedLog(_REFUSAL_LOG_INTERVAL_S)


class _BadRequest(InvalidInput):
    reason = "bad_request"


def _parser(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    if deserializer is None:
        return lambda raw: raw

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except (DecodeError, ValueError, TypeError) as exc:
            raise _BadRequest(f"request is not a valid message: {type(exc).__name__}") from None

    return parse


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Parses requests and maps exceptions escaping handlers to gRPC status, for every RPC shape.

    Garbage request bytes → INVALID_ARGUMENT "bad_request". `StrataError` → its
    `.status`, details "reason: message", reason in the "strata-reason" trailer.
    Anything else → INTERNAL with a generic message; the traceback is logged here
    and never sent to the caller.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        parse = _parser(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, method, parse), response_serializer=serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, method, _stream_parser(parse)), response_serializer=serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, method, parse), response_serializer=serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, method, _stream_parser(parse)), response_serializer=serializer
        )


def _stream_parser(parse: Callable[[bytes], Any]) -> Callable[[AsyncIterator[bytes]], AsyncIterator[Any]]:
    async def parsed(raw_messages: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raw_messages:
            yield parse(raw)

    return parsed


def _unary(behavior: Callable, method: str, parse: Callable) -> Callable:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(parse(request), context)
            return await result if inspect.isawaitable(result) else result
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - this is the one place errors are mapped
            await _abort_for(e, context, method)

    return call


async def responses_of(result: Any) -> AsyncIterator[Any]:
    """The responses of a server-streaming handler's `result`, whichever way it sends them.

    Ours are async generators; grpc's own aio servicers (grpc.health.v1's Watch) are coroutines
    that send with `context.write` and return None. An interceptor wrapping either must not
    `async for` over a coroutine (that was INTERNAL for every Health.Watch)."""
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


def _streaming(behavior: Callable, method: str, parse: Callable) -> Callable:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in responses_of(behavior(parse(request), context)):
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - this is the one place errors are mapped
            await _abort_for(e, context, method)

    return call


async def _abort_for(e: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """Abort the RPC for exception `e`; always raises."""
    if isinstance(e, StrataError):
        _log_refusal(
            "rpc_refused",
            f"{method}:{e.reason}",
            {"method": method, "status": e.status, "reason": e.reason, "error": e.message[:200]},
        )
        code = getattr(grpc.StatusCode, e.status, grpc.StatusCode.INTERNAL)
        context.set_trailing_metadata(((REASON_METADATA_KEY, _ascii(e.reason)),))
        await context.abort(code, _details(f"{e.reason}: {e.message}"))
    if isinstance(e, NotImplementedError):  # a generated servicer's method this server does not serve
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unimplemented: {method} is not served here")
    log.error("unhandled error in rpc", exc_info=e, extra={"fields": {"method": method}})
    context.set_trailing_metadata(((REASON_METADATA_KEY, "internal"),))
    await context.abort(grpc.StatusCode.INTERNAL, "internal: internal server error (details are in the server log)")


def _details(text: str) -> str:
    """Status details short enough for the trailers: a message quoting a caller's megabyte input would
    break gRPC's 16 KiB metadata limit, and the caller would get RESOURCE_EXHAUSTED instead of its refusal."""
    if len(text) <= _MAX_DETAILS_CHARS:
        return text
    return f"{text[:_MAX_DETAILS_CHARS]}... ({len(text) - _MAX_DETAILS_CHARS} more characters)"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


# ---------------------------------------------------------------- chunked streams, server side


async def receive_header_stream(
    messages: AsyncIterator[Any],
    *,
    size_of: Callable[[Any], int],
    max_size: int,
    idle_timeout_s: float,
    offload: Callable[..., Awaitable[Any]],
    on_chunk: Callable[[bytes], None] | None = None,
) -> tuple[Any, bytes]:
    """The server side of `proto.wire.read_header_stream`: (header, bytes) of a header-then-chunks stream.

    Each message must arrive within `idle_timeout_s` of the previous one, so a stalled
    sender is refused instead of held forever. Reassembly and `on_chunk` (e.g. hashing)
    run through `offload`, off the loop. Raises WireError like the sync reader.
    """
    iterator = messages.__aiter__()

    async def next_message() -> Any:
        try:
            async with asyncio.timeout(idle_timeout_s):
                return await anext(iterator, None)
        except TimeoutError:
            raise WireError(f"no message for {idle_timeout_s:g} s: the stream stalled", reason="stalled") from None

    first = await next_message()
    if first is None or first.WhichOneof("part") != "header":
        raise WireError("stream must start with a header", reason="missing_header")
    header = first.header
    reassembler = Reassembler(size_of(header), max_size=max_size)

    def absorb(chunk: Any) -> None:
        reassembler.add(chunk.offset, chunk.data)
        if on_chunk is not None:
            on_chunk(chunk.data)

    # each chunk is absorbed (checked, kept, hashed) off the loop while the next one arrives
    absorbing: asyncio.Future[Any] | None = None
    try:
        while (message := await next_message()) is not None:
            if message.WhichOneof("part") != "chunk":
                raise WireError("a second header arrived inside the stream", reason="unexpected_header")
            if absorbing is not None:
                await absorbing
            absorbing = asyncio.ensure_future(offload(absorb, message.chunk))
        if absorbing is not None:
            await absorbing
    finally:
        if absorbing is not None and not absorbing.done():
            absorbing.cancel()
    return header, await offload(reassembler.finish)
