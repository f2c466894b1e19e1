"""SubmitUpdate refusals over the real wire: raw UpdateChunk streams into a running aggregator.

Each bad update comes back accepted=false with its own reason code; refusals that
reach validation are journaled and show up in the round's history once it closes.
The aggregator runs in-process on 127.0.0.1:0 with quorum 0.01 and min_updates 1, so
one accepted update closes the round within a tick.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.daemon import AggregatorDaemon
from aggregator.journal import RoundRecord
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.wire import create_channel, stream_with_header
from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors
from storage.models import load_model
from strata.wiring import initial_model_factory

MAX_UPDATE_BYTES = 64 << 10  # the digits MLP is ~19 KiB
MAX_STALENESS = 1
RPC_TIMEOUT_S = 10.0


@dataclass
class Aggregator:
    daemon: AggregatorDaemon
    stub: pb_grpc.AgentServiceStub

    def base(self) -> tuple[pb.ModelRef, dict[str, np.ndarray]]:
        """The current base as an agent learns it (Join), and its tensors."""
        reply = self.stub.Join(pb.JoinRequest(agent_id="observer", federation="digits"), timeout=RPC_TIMEOUT_S)
        ref = reply.home.base
        _, weights = load_model(self.daemon.store, ref.model_cid)
        return ref, decode_tensors(weights)

    def submit(
        self,
        blob: bytes,
        *,
        agent_id: str,
        base: pb.ModelRef,
        num_samples: int = 10,
        chunk_size: int = 4096,
        messages: list[pb.UpdateChunk] | None = None,
        **header_fields: object,
    ) -> pb.SubmitUpdateReply:
        fields: dict[str, object] = {
            "agent_id": agent_id,
            "round": base.round,
            "base_cid": base.model_cid,
            "num_samples": num_samples,
            "weights_size": len(blob),
            "weights_cid": cid_of(blob),
            "federation": "digits",
            "kind": "local",
        }
        fields.update(header_fields)
        header = pb.UpdateHeader(**fields)
        stream: Iterator[pb.UpdateChunk] = iter(
            messages if messages is not None else stream_with_header(pb.UpdateChunk, header, blob, chunk_size)
        )
        return self.stub.SubmitUpdate(stream, timeout=RPC_TIMEOUT_S)

    def wait_for_round(self, round_: int, timeout: float = 10.0) -> None:
        give_up = time.monotonic() + timeout
        while self.daemon.rounds.current.round < round_:
            if time.monotonic() > give_up:
                raise TimeoutError(f"round {round_} did not open within {timeout}s")
            time.sleep(0.05)

    def closed_round(self, round_: int) -> RoundRecord:
        self.wait_for_round(round_ + 1)
        return next(r for r in self.daemon.journal.history() if r.round == round_)


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    config = AggregatorConfig(
        id="agg-refusals",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "state"),
        store=str(tmp_path / "store"),
        round=RoundSettings(
            min_updates=1,
            quorum=0.01,
            deadline_s=600.0,
            max_staleness=MAX_STALENESS,
            max_update_bytes=MAX_UPDATE_BYTES,
        ),
    )
    daemon = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
    channel = create_channel(daemon.address)
    try:
        yield Aggregator(daemon=daemon, stub=pb_grpc.AgentServiceStub(channel))
    finally:
        channel.close()
        daemon.stop()


def nudged(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (a + rng.normal(0, 0.01, a.shape)).astype(a.dtype) for name, a in base.items()}


def assert_refused(reply: pb.SubmitUpdateReply, reason: str) -> None:
    assert not reply.accepted, f"expected refusal {reason!r}, got accepted {reply}"
    assert reply.reason == reason, f"expected {reason!r}, got {reply.reason!r}: {reply.message}"
    assert reply.message, "a refusal should say why"


# ---------------------------------------------------------------------- one refusal each


def test_valid_update_is_accepted(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    reply = aggregator.submit(encode_tensors(nudged(base, 1)), agent_id="good", base=ref)
    assert reply.accepted and not reply.duplicate and reply.update_cid, reply
    assert reply.round == ref.round


def test_too_large(aggregator: Aggregator) -> None:
    ref, _ = aggregator.base()
    blob = os.urandom(MAX_UPDATE_BYTES + 1)
    assert_refused(aggregator.submit(blob, agent_id="big", base=ref, chunk_size=32 << 10), "too_large")


def test_invalid_safetensors(aggregator: Aggregator) -> None:
    ref, _ = aggregator.base()
    assert_refused(aggregator.submit(os.urandom(5000), agent_id="garbage", base=ref), "invalid_safetensors")


@pytest.mark.parametrize("change", ["wrong_shape", "unknown_tensor", "missing_tensor", "wrong_dtype"])
def test_shape_mismatch(aggregator: Aggregator, change: str) -> None:
    ref, base = aggregator.base()
    tensors = nudged(base, 2)
    if change == "wrong_shape":
        tensors["fc1.weight"] = tensors["fc1.weight"][:, :-1].copy()
    elif change == "unknown_tensor":
        tensors["extra.weight"] = np.zeros((3, 3), np.float32)
    elif change == "missing_tensor":
        del tensors["head.bias"]
    else:
        tensors["head.bias"] = tensors["head.bias"].astype(np.float64)
    assert_refused(aggregator.submit(encode_tensors(tensors), agent_id=f"shape-{change}", base=ref), "shape_mismatch")


def test_declared_tensor_not_in_base(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    blob = encode_tensors({"head.weight": base["head.weight"], "nope": np.zeros(2, np.float32)})
    reply = aggregator.submit(blob, agent_id="partial", base=ref, tensors=["head.weight", "nope"])
    assert_refused(reply, "shape_mismatch")


def test_not_finite(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    tensors = nudged(base, 3)
    tensors["fc1.weight"][0, 0] = np.nan
    assert_refused(aggregator.submit(encode_tensors(tensors), agent_id="nan", base=ref), "not_finite")


def test_norm_bound(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    tensors = {name: a * 1000 for name, a in base.items()}
    assert_refused(aggregator.submit(encode_tensors(tensors), agent_id="huge", base=ref), "norm_bound")


def test_unknown_base(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    stranger = pb.ModelRef(model_cid=cid_of(os.urandom(64)), round=ref.round)
    assert_refused(aggregator.submit(encode_tensors(nudged(base, 4)), agent_id="lost", base=stranger), "unknown_base")


def test_hash_mismatch(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    blob = encode_tensors(nudged(base, 5))
    reply = aggregator.submit(blob, agent_id="liar", base=ref, weights_cid=cid_of(blob + b"x"))
    assert_refused(reply, "hash_mismatch")


def test_out_of_order_chunks(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    blob = encode_tensors(nudged(base, 6))
    header = pb.UpdateHeader(
        agent_id="shuffler", round=ref.round, base_cid=ref.model_cid, num_samples=10,
        weights_size=len(blob), weights_cid=cid_of(blob), federation="digits", kind="local",
    )
    messages = list(stream_with_header(pb.UpdateChunk, header, blob, 4096))
    messages[1], messages[2] = messages[2], messages[1]
    reply = aggregator.submit(blob, agent_id="shuffler", base=ref, messages=messages)
    assert_refused(reply, "bad_stream")
    assert "offset" in reply.message


def test_stream_without_header(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    blob = encode_tensors(nudged(base, 7))
    messages = list(stream_with_header(pb.UpdateChunk, pb.UpdateHeader(), blob, 4096))[1:]
    assert_refused(aggregator.submit(blob, agent_id="headless", base=ref, messages=messages), "bad_header")


def test_bad_header_fields(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    blob = encode_tensors(nudged(base, 8))
    assert_refused(aggregator.submit(blob, agent_id="zero", base=ref, num_samples=0), "bad_header")
    assert_refused(aggregator.submit(blob, agent_id="", base=ref), "bad_header")
    assert_refused(aggregator.submit(blob, agent_id="other", base=ref, federation="mnist"), "unknown_federation")
    assert_refused(aggregator.submit(blob, agent_id="wrong-round", base=ref, round=ref.round + 5), "bad_header")


# ---------------------------------------------------------------------- one update per agent per round


def test_resend_is_duplicate_and_different_content_is_conflict(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    blob = encode_tensors(nudged(base, 10))
    first = aggregator.submit(blob, agent_id="dup", base=ref)
    assert first.accepted and not first.duplicate
    aggregator.wait_for_round(ref.round + 1)  # the resend arrives after its round closed: still a duplicate

    again = aggregator.submit(blob, agent_id="dup", base=ref)
    assert again.accepted and again.duplicate
    assert again.update_cid == first.update_cid and again.round == first.round

    other = encode_tensors(nudged(base, 11))
    assert_refused(aggregator.submit(other, agent_id="dup", base=ref), "conflict")
    assert_refused(aggregator.submit(blob, agent_id="dup", base=ref, num_samples=11), "conflict")

    history = aggregator.daemon.journal.history()
    assert history[0].participants == 1, "a duplicate must not be counted again"


def test_stale_update_is_refused_within_bound_is_accepted(aggregator: Aggregator) -> None:
    old_ref, old_base = aggregator.base()
    # a second agent moves the aggregator MAX_STALENESS + 1 rounds on
    for step in range(MAX_STALENESS + 1):
        ref, base = aggregator.base()
        reply = aggregator.submit(encode_tensors(nudged(base, 20 + step)), agent_id="mover", base=ref)
        assert reply.accepted, reply
        aggregator.wait_for_round(ref.round + 1)
    current, _ = aggregator.base()
    assert current.round == old_ref.round + MAX_STALENESS + 1

    reply = aggregator.submit(encode_tensors(nudged(old_base, 30)), agent_id="sleeper", base=old_ref)
    assert_refused(reply, "stale")

    # one round behind is within the bound: accepted, counted in the current round
    previous_round = next(r for r in aggregator.daemon.journal.history() if r.round == current.round - 1)
    _, previous_weights = load_model(aggregator.daemon.store, previous_round.base_cid)
    previous_ref = pb.ModelRef(model_cid=previous_round.base_cid, round=previous_round.round)
    reply = aggregator.submit(
        encode_tensors(nudged(decode_tensors(previous_weights), 31)), agent_id="late", base=previous_ref
    )
    assert reply.accepted and reply.round == current.round, reply
    closed = aggregator.closed_round(current.round)
    assert closed.extra["stale_updates"] == 1


# ---------------------------------------------------------------------- the journal keeps the refusals


def test_round_history_counts_refusals_by_reason(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    nan = nudged(base, 40)
    nan["head.weight"][1, 1] = np.inf
    refusals = {
        "not_finite": [encode_tensors(nan)],
        "norm_bound": [encode_tensors({n: a * 1000 for n, a in base.items()})] * 2,
        "invalid_safetensors": [b"\x00" * 100],
        "shape_mismatch": [encode_tensors({"head.bias": base["head.bias"]})],
    }
    for reason, blobs in refusals.items():
        for index, blob in enumerate(blobs):
            assert_refused(aggregator.submit(blob, agent_id=f"bad-{reason}-{index}", base=ref), reason)
    blob = encode_tensors(nudged(base, 41))
    assert_refused(aggregator.submit(blob, agent_id="bad-hash", base=ref, weights_cid=cid_of(b"x")), "hash_mismatch")

    assert aggregator.submit(encode_tensors(nudged(base, 42)), agent_id="good", base=ref).accepted
    record = aggregator.closed_round(ref.round)
    assert record.participants == 1
    assert record.refusals == {
        "not_finite": 1, "norm_bound": 2, "invalid_safetensors": 1, "shape_mismatch": 1, "hash_mismatch": 1,
    }


def test_stream_level_refusals_are_journaled(aggregator: Aggregator) -> None:
    ref, base = aggregator.base()
    assert_refused(aggregator.submit(os.urandom(MAX_UPDATE_BYTES + 1), agent_id="big", base=ref), "too_large")
    assert aggregator.submit(encode_tensors(nudged(base, 50)), agent_id="good", base=ref).accepted
    assert aggregator.closed_round(ref.round).refusals == {"too_large": 1}


def test_refusal_is_an_answer_not_an_rpc_error(aggregator: Aggregator) -> None:
    ref, _ = aggregator.base()
    try:
        reply = aggregator.submit(b"not safetensors", agent_id="polite", base=ref)
    except grpc.RpcError as exc:  # pragma: no cover - the failure being tested for
        pytest.fail(f"a refusal must come back as a reply, got RPC error {exc.code()}")
    assert not reply.accepted
