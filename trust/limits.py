"""Fair share under abuse: per-identity limits on concurrent streams and on the call rate.

One misbehaving identity (a compromised agent holding hundreds of stalled
uploads, or hammering Join) must not starve the others. `FairShare` is a
grpc.aio server interceptor placed after `trust.interceptor.TrustInterceptor`
(whose `caller()` names the identity): each identity gets a token bucket of
calls (`rate_per_s`, `burst`) and at most `max_streams` streaming calls open at
once. Over either limit, the call is refused RESOURCE_EXHAUSTED (reason
`rate_limited` or `too_many_streams`), which clients treat as "back off and
retry". Calls without an identity (plaintext demos, public methods) are not
limited here: without certificates there is no identity to be fair to.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from proto.errors import StrataError
from proto.serving import responses_of
from trust.interceptor import caller

# identities whose buckets are kept; the least recently seen are dropped beyond it
_MAX_TRACKED = 100_000


class Overloaded(StrataError):
    status = "RESOURCE_EXHAUSTED"
    reason = "rate_limited"


@dataclass
class _Share:
    tokens: float
    stamp: float
    streams: int = 0


class FairShare(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        max_streams: int = 16,
        rate_per_s: float = 20.0,
        burst: float = 100.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_streams = max_streams
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._shares: dict[str, _Share] = {}
        self._lock = threading.Lock()

    def _take(self, key: str, *, stream: bool) -> None:
        now = self._clock()
        with self._lock:
            share = self._shares.get(key)
            if share is None:
                if len(self._shares) >= _MAX_TRACKED:
                    self._forget_idle()
                share = self._shares[key] = _Share(tokens=self.burst, stamp=now)
            share.tokens = min(self.burst, share.tokens + (now - share.stamp) * self.rate_per_s)
            share.stamp = now
            if share.tokens < 1:
                raise Overloaded(f"{key} calls faster than {self.rate_per_s:g}/s: slow down", reason="rate_limited")
            if stream and share.streams >= self.max_streams:
                raise Overloaded(
                    f"{key} already has {share.streams} streams open (limit {self.max_streams})",
                    reason="too_many_streams",
                )
            share.tokens -= 1
            if stream:
                share.streams += 1

    def _release(self, key: str) -> None:
        with self._lock:
            share = self._shares.get(key)
            if share is not None and share.streams > 0:
                share.streams -= 1

    def _forget_idle(self) -> None:
        idle = sorted((s.stamp, k) for k, s in self._shares.items() if s.streams == 0)
        for _, key in idle[: len(idle) // 2 + 1]:
            del self._shares[key]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, stream=False), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, stream=True), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streaming(handler.unary_stream), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._streaming(handler.stream_stream), **kwargs)

    def _unary(self, behavior: Callable, *, stream: bool) -> Callable:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            identity = caller()
            key = None if identity is None else str(identity)
            if key is not None:
                self._take(key, stream=stream)
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                if key is not None and stream:
                    self._release(key)

        return call

    def _streaming(self, behavior: Callable) -> Callable:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            identity = caller()
            key = None if identity is None else str(identity)
            if key is not None:
                self._take(key, stream=True)
            try:
                async for response in responses_of(behavior(request, context)):
                    yield response
            finally:
                if key is not None:
                    self._release(key)

        return call
