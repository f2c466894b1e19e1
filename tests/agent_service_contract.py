"""The agent-facing contract: what any AgentService (an aggregator, a relay) must do for a device.

Devices cannot tell a relay from an aggregator, so both pass this one suite. Use it by
subclassing `AgentServiceContract` in a test module that provides an `agent_service`
fixture returning a `ServiceUnderTest` (address of a running server whose rounds close
after one accepted update).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.client import Client
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import create_channel, read_header_stream, stream_with_header
from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors
from storage.manifest import Manifest

RPC_TIMEOUT_S = 10.0
FEDERATION = "digits"


@dataclass
class ServiceUnderTest:
    address: str
    # how long a new base may take to appear after one accepted update
    new_base_timeout_s: float = 20.0


def stub_for(address: str) -> tuple[grpc.Channel, pb_grpc.AgentServiceStub]:
    channel = create_channel(address)
    return channel, pb_grpc.AgentServiceStub(channel)


def join(stub: pb_grpc.AgentServiceStub, agent_id: str, capability: int = pb.TRAIN) -> pb.Home:
    reply = stub.Join(
        pb.JoinRequest(agent_id=agent_id, federation=FEDERATION, capability=capability), timeout=RPC_TIMEOUT_S
    )
    assert reply.WhichOneof("outcome") == "home", reply
    return reply.home


def get_model(stub: pb_grpc.AgentServiceStub, model_cid: str = "", if_none_match: str = "") -> tuple[pb.ModelHeader, bytes]:
    stream = stub.GetModel(
        pb.GetModelRequest(model_cid=model_cid, if_none_match=if_none_match, federation=FEDERATION),
        timeout=RPC_TIMEOUT_S,
    )
    return read_header_stream(stream, size_of=lambda h: h.weights_size, max_size=1 << 30)


def base_tensors(stub: pb_grpc.AgentServiceStub, model_cid: str) -> dict[str, np.ndarray]:
    _, weights = get_model(stub, model_cid)
    return decode_tensors(weights)


def submit(
    stub: pb_grpc.AgentServiceStub,
    blob: bytes,
    *,
    agent_id: str,
    base: pb.ModelRef,
    num_samples: int = 10,
    **header_fields: object,
) -> pb.SubmitUpdateReply:
    fields: dict[str, object] = {
        "agent_id": agent_id,
        "round": base.round,
        "base_cid": base.model_cid,
        "num_samples": num_samples,
        "weights_size": len(blob),
        "weights_cid": cid_of(blob),
        "federation": FEDERATION,
        "kind": "local",
    }
    fields.update(header_fields)
    header = pb.UpdateHeader(**fields)
    return stub.SubmitUpdate(stream_with_header(pb.UpdateChunk, header, blob, 4096), timeout=RPC_TIMEOUT_S)


def nudged(tensors: dict[str, np.ndarray], delta: float = 0.01, names: list[str] | None = None) -> bytes:
    """A valid update: the base moved a little (only `names`, when given)."""
    chosen = names or sorted(tensors)
    return encode_tensors({name: (tensors[name] + np.float32(delta)).astype(tensors[name].dtype) for name in chosen})



def noisy(base: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A valid update as tensors: the base plus seeded noise (std 0.01), so every seed's bytes differ."""
    rng = np.random.default_rng(seed)
    return {name: (array + rng.normal(0, 0.01, array.shape)).astype(array.dtype) for name, array in base.items()}


def connect_client(
    made: list[Client], address: str, agent_id: str, state_dir: Path | None = None, *, watch: bool = False
) -> Client:
    """A joined agent client, kept in `made` (the `clients` fixture closes them)."""
    client = Client(
        address, agent_id=agent_id, watch=watch, join_timeout_s=30, backoff_max_s=0.5,
        state_dir=str(state_dir) if state_dir else None,
    ).connect()  # fmt: skip
    made.append(client)
    return client

class AgentServiceContract:
    """The suite. Tests receive `agent_service: ServiceUnderTest`."""

    def test_join_returns_home_with_base(self, agent_service: ServiceUnderTest) -> None:
        channel, stub = stub_for(agent_service.address)
        with channel:
            home = join(stub, "contract-join")
            assert home.aggregator_id
            assert home.base.model_cid and home.base.weights_cid
            assert home.heartbeat_interval_s > 0

    def test_get_model_streams_manifest_then_verified_chunks(self, agent_service: ServiceUnderTest) -> None:
        channel, stub = stub_for(agent_service.address)
        with channel:
            home = join(stub, "contract-get")
            stream = stub.GetModel(pb.GetModelRequest(federation=FEDERATION), timeout=RPC_TIMEOUT_S)
            messages = list(stream)
            assert messages[0].WhichOneof("part") == "header"
            assert all(m.WhichOneof("part") == "chunk" for m in messages[1:]) and len(messages) > 1
            header = messages[0].header
            assert header.model_cid == home.base.model_cid
            assert cid_of(header.manifest) == header.model_cid
            weights = b"".join(m.chunk.data for m in messages[1:])
            assert len(weights) == header.weights_size
            manifest = Manifest.from_bytes(header.manifest)
            assert cid_of(weights) == manifest.weights == header.weights_cid
            manifest.verify_signature()

    def test_if_none_match_answers_not_modified(self, agent_service: ServiceUnderTest) -> None:
        channel, stub = stub_for(agent_service.address)
        with channel:
            home = join(stub, "contract-inm")
            stream = stub.GetModel(
                pb.GetModelRequest(federation=FEDERATION, if_none_match=home.base.model_cid), timeout=RPC_TIMEOUT_S
            )
            messages = list(stream)
            assert len(messages) == 1
            assert messages[0].header.not_modified and messages[0].header.model_cid == home.base.model_cid

    def test_submit_accepts_valid_and_refuses_garbage_with_reason_codes(self, agent_service: ServiceUnderTest) -> None:
        channel, stub = stub_for(agent_service.address)
        with channel:
            home = join(stub, "contract-submit")
            tensors = base_tensors(stub, home.base.model_cid)
            garbage = submit(stub, b"not safetensors at all", agent_id="garbage", base=home.base)
            assert (garbage.accepted, garbage.reason) == (False, "invalid_safetensors")
            poisoned = {k: v.copy() for k, v in tensors.items()}
            first = sorted(poisoned)[0]
            poisoned[first].reshape(-1)[0] = np.nan
            nan = submit(stub, encode_tensors(poisoned), agent_id="nan", base=home.base)
            assert (nan.accepted, nan.reason) == (False, "not_finite")
            blob = nudged(tensors)
            unknown = submit(
                stub, blob, agent_id="unknown", base=pb.ModelRef(model_cid=cid_of(b"elsewhere"), round=home.base.round)
            )
            assert (unknown.accepted, unknown.reason) == (False, "unknown_base")
            lying = submit(stub, blob, agent_id="lying", base=home.base, weights_cid=cid_of(b"other"))
            assert (lying.accepted, lying.reason) == (False, "hash_mismatch")
            accepted = submit(stub, blob, agent_id="contract-submit", base=home.base)
            assert accepted.accepted, accepted
            assert accepted.update_cid and accepted.round == home.base.round
            again = submit(stub, blob, agent_id="contract-submit", base=home.base)
            assert again.accepted and again.duplicate and again.update_cid == accepted.update_cid

    def test_get_model_never_serves_a_device_update_whatever_its_cid(self, agent_service: ServiceUnderTest) -> None:
        """Plaintext has no auditor: a device update is refused to everyone, its sender included."""
        channel, stub = stub_for(agent_service.address)
        with channel:
            home = join(stub, "contract-private")
            reply = submit(stub, nudged(base_tensors(stub, home.base.model_cid)), agent_id="contract-private", base=home.base)
            assert reply.accepted, reply
            with pytest.raises(grpc.RpcError) as info:
                get_model(stub, reply.update_cid)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "device_update" in (info.value.details() or "")
            # the base is still served, by CID too
            header, _ = get_model(stub, home.base.model_cid)
            assert header.model_cid == home.base.model_cid

    def test_watch_models_announces_new_base(self, agent_service: ServiceUnderTest) -> None:
        channel, stub = stub_for(agent_service.address)
        with channel:
            home = join(stub, "contract-watch")
            events: list[pb.ModelEvent] = []
            stream = stub.WatchModels(
                pb.WatchModelsRequest(agent_id="contract-watch", federation=FEDERATION, known_cid=home.base.model_cid),
                timeout=agent_service.new_base_timeout_s + 5,
            )

            def read() -> None:
                try:
                    for event in stream:
                        events.append(event)
                        return
                except grpc.RpcError:
                    pass

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            tensors = base_tensors(stub, home.base.model_cid)
            reply = submit(stub, nudged(tensors), agent_id="contract-watch", base=home.base)
            assert reply.accepted, reply
            reader.join(timeout=agent_service.new_base_timeout_s)
            stream.cancel()
            assert events, "no new base announced"
            new_base = events[0].new_base
            assert new_base.model_cid and new_base.model_cid != home.base.model_cid
            assert new_base.round > home.base.round

    def test_heartbeat_returns_current_base(self, agent_service: ServiceUnderTest) -> None:
        channel, stub = stub_for(agent_service.address)
        with channel:
            home = join(stub, "contract-heartbeat")
            reply = stub.Heartbeat(
                pb.HeartbeatRequest(agent_id="contract-heartbeat", federation=FEDERATION), timeout=RPC_TIMEOUT_S
            )
            assert reply.current_base.model_cid == home.base.model_cid
            assert reply.next_interval_s > 0


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    what: str = "the condition",
    poll_s: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Past ``timeout`` seconds it raises TimeoutError naming ``what``, with ``detail()``
    (e.g. a daemon's log tail or a status dump) appended so a hang explains itself.
    """
    import time

    give_up = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > give_up:
            extra = f"\n{detail()}" if detail is not None else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {value!r}{extra}")
        time.sleep(poll_s)
    return value
