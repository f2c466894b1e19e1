"""gRPC connections of a simulated fleet: one per device, as real devices have, or a shared few.

grpc.aio channels to the same address with the same arguments share one TCP
connection through gRPC's global subchannel pool. A real fleet does not: every
device has its own connection, and the aggregator holds one HTTP/2 transport per
device. So by default every device's channel gets a local subchannel pool (its
own connection). With `shared > 0`, devices are spread over that many channels per
address instead (cheaper on both sides; one connection then carries many devices'
streams).

Channel arguments are `proto.wire.create_channel`'s: the same message limits,
keepalive and reconnect backoff as an agent's channel.
"""

from __future__ import annotations

import itertools
from typing import Any

import grpc

from proto.wire import KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S, MAX_MESSAGE_BYTES


def channel_options(*, own_connection: bool) -> list[tuple[str, Any]]:
    """proto.wire.create_channel's options (kept equal by tests/test_sim.py), plus the pool choice."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


class Connections:
    """Hands devices channels (grpc.aio, on the running loop) and closes them."""

    def __init__(self, *, shared: int = 0) -> None:
        self._shared = shared
        self._pools: dict[str, list[grpc.aio.Channel]] = {}
        self._turn: dict[str, itertools.count] = {}
        self.open_channels = 0

    def open(self, address: str) -> grpc.aio.Channel:
        if not self._shared:
            self.open_channels += 1
            return grpc.aio.insecure_channel(address, options=channel_options(own_connection=True))
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = [
                grpc.aio.insecure_channel(address, options=channel_options(own_connection=True)) for _ in range(self._shared)
            ]
            self._turn[address] = itertools.count()
            self.open_channels += self._shared
        return pool[next(self._turn[address]) % len(pool)]

    async def release(self, channel: grpc.aio.Channel) -> None:
        """A device is done with `channel`: its own is closed (cancelling its calls); a shared one stays."""
        if not self._shared:
            self.open_channels -= 1
            await channel.close()

    async def close(self) -> None:
        for pool in self._pools.values():
            for channel in pool:
                await channel.close()
        self._pools.clear()
