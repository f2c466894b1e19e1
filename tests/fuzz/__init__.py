"""A descriptor-driven fuzzer for Strata's gRPC daemons ("attack your own daemons").

    targets = [Target("aggregator", address, AGGREGATOR_SERVICES), ...]
    tally = asyncio.run(runner.run(address, factory.cases(target.rpcs(), per_rpc=50)))
    assert tally.bad_statuses() == 0 and tally.accepted == 0

- `messages`: every RPC of strata.proto from its descriptors; random valid messages and boundary values;
- `wire`: the protobuf wire format by hand, mutations and hostile encodings;
- `streams`: broken header/chunk framing, and updates invalid by construction (`UpdateForger`);
- `cases`: what one call sends, drawn from every category;
- `runner`: raw-bytes calls with deadlines, and the status histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import create_channel, read_header_stream
from storage.manifest import Manifest
from tests.fuzz.messages import Rpc, rpcs
from tests.fuzz.streams import BaseModel

__all__ = [
    "AGGREGATOR_SERVICES",
    "COORDINATOR_SERVICES",
    "RELAY_SERVICES",
    "Target",
    "fetch_base",
]

# every daemon also serves grpc's health service, behind the same interceptors
HEALTH_SERVICE = "grpc.health.v1.Health"
AGGREGATOR_SERVICES = ("strata.v1.AgentService", "strata.v1.PeerService", HEALTH_SERVICE)
RELAY_SERVICES = ("strata.v1.AgentService", HEALTH_SERVICE)
COORDINATOR_SERVICES = ("strata.v1.CoordinatorService", HEALTH_SERVICE)


@dataclass(frozen=True)
class Target:
    """One daemon under attack: the services it serves at `address`."""

    name: str
    address: str
    services: Sequence[str]

    def rpcs(self) -> list[Rpc]:
        return rpcs(pb.DESCRIPTOR, health_pb2.DESCRIPTOR, services=self.services)


def fetch_base(address: str, *, timeout_s: float = 30.0) -> BaseModel:
    """A home's current base model, downloaded the way an agent does."""
    with create_channel(address) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        header, weights = read_header_stream(
            stub.GetModel(pb.GetModelRequest(), timeout=timeout_s), size_of=lambda h: h.weights_size, max_size=1 << 30
        )
    manifest = Manifest.from_bytes(header.manifest)
    return BaseModel(model_cid=header.model_cid, round=header.round, federation=manifest.federation, weights=weights)
