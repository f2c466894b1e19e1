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

from proto.wire import channel_options


def sim_channel_options(*, own_connection: bool) -> list[tuple[str, Any]]:
    """proto.wire's channel options, plus the pool choice: with `own_connection`, one TCP connection per device."""
    return channel_options() + ([("grpc.use_local_subchannel_pool", 1)] if own_connection else [])


class Connections:
    """Hands devices channels (grpc.aio, on the running loop) and closes them."""

    def __init__(self, *, shared: int = 0) -> None:
        self._shared = shared
        self._pools: dict[str, list[grpc.aio.Channel]] = {}
        self._turn: dict[str, itertools.count] = {}

    def open(self, address: str) -> grpc.aio.Channel:
        if not self._shared:
            return grpc.aio.insecure_channel(address, options=sim_channel_options(own_connection=True))
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = [
                grpc.aio.insecure_channel(address, options=sim_channel_options(own_connection=True)) for _ in range(self._shared)
            ]
            self._turn[address] = itertools.count()
        return pool[next(self._turn[address]) % len(pool)]

    async def release(self, channel: grpc.aio.Channel) -> None:
        """A device is done with `channel`: its own is closed (cancelling its calls); a shared one stays."""
        if not self._shared:
            await channel.close()

    async def close(self) -> None:
        for pool in self._pools.values():
            for channel in pool:
                await channel.close()
        self._pools.clear()
