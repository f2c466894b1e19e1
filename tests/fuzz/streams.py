"""Client streams: header-then-chunks framing broken every way, and updates that are invalid by construction.

`chunk_framing` recognises a `oneof { X header; Chunk chunk; }` message from its
descriptor (UpdateChunk, and any later one of the same shape), and
`CHUNK_STREAMS` break its framing: chunks out of order, duplicated, overlapping,
missing, past the declared size, a declared size of 2^64-1 with three bytes,
no header, two headers, 2,000 one-byte chunks, a sender that stalls.

`UpdateForger` starts from a home's real base model and builds complete
SubmitUpdate streams that a receiver must refuse (NaN, wrong shapes and dtypes,
norm blow-ups, broken safetensors headers, CIDs that lie, a garbage manifest
beside otherwise good weights, an unknown base...). The fuzzer never sends an
update a receiver may accept, so any `accepted=true` is a hole.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, now_rfc3339
from tests.fuzz.messages import MessageGenerator, message_class
from tests.fuzz.wire import U64, garbage_that_fails


@dataclass(frozen=True)
class ChunkFraming:
    """How a header-then-chunks message type is built: which oneof member is the header, which the
    chunk, and which header field declares the total size."""

    message: Descriptor
    header: FieldDescriptor
    chunk: FieldDescriptor
    size: FieldDescriptor

    def header_message(self, header: Message) -> bytes:
        msg = message_class(self.message)()
        getattr(msg, self.header.name).CopyFrom(header)
        return msg.SerializeToString()

    def chunk_message(self, offset: int, data: bytes) -> bytes:
        msg = message_class(self.message)()
        chunk = getattr(msg, self.chunk.name)
        chunk.offset = offset
        chunk.data = data
        return msg.SerializeToString()

    def stream(self, header: Message, data: bytes, piece: int) -> list[bytes]:
        """A well-framed stream: the header, then `data` in order in pieces of `piece` bytes."""
        return [self.header_message(header)] + [
            self.chunk_message(offset, data[offset : offset + piece]) for offset in range(0, len(data), piece)
        ]


def chunk_framing(descriptor: Descriptor) -> ChunkFraming | None:
    for oneof in descriptor.oneofs:
        fields = {f.name: f for f in oneof.fields}
        header, chunk = fields.get("header"), fields.get("chunk")
        if header is None or chunk is None or chunk.message_type is None:
            continue
        if {"offset", "data"} - set(chunk.message_type.fields_by_name):
            continue
        sizes = [
            f for f in header.message_type.fields
            if f.name.endswith("size") and f.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT64)
        ]  # fmt: skip
        if sizes:
            return ChunkFraming(message=descriptor, header=header, chunk=chunk, size=sizes[0])
    return None


@dataclass(frozen=True)
class StreamPlan:
    """The messages of one client stream, and where (before which message) the sender stalls."""

    messages: tuple[bytes, ...]
    stall_at: int = -1


StreamBuilder = Callable[[ChunkFraming, MessageGenerator], StreamPlan]


def _header(framing: ChunkFraming, gen: MessageGenerator, size: int) -> Message:
    header = gen.message(framing.header.message_type)
    setattr(header, framing.size.name, size)
    return header


def _pieces(data: bytes, piece: int) -> list[tuple[int, bytes]]:
    return [(offset, data[offset : offset + piece]) for offset in range(0, len(data), piece)]


def _plan(framing: ChunkFraming, header: Message, chunks: list[tuple[int, bytes]], stall_at: int = -1) -> StreamPlan:
    return StreamPlan((framing.header_message(header), *(framing.chunk_message(o, d) for o, d in chunks)), stall_at)


def _sized(gen: MessageGenerator) -> bytes:
    return gen.rng.randbytes(gen.rng.choice([1, 100, 5000, 70_000]))


def in_order(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = _sized(gen)
    return _plan(framing, _header(framing, gen, len(data)), _pieces(data, max(1, len(data) // 3)))


def out_of_order(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(3000)
    chunks = _pieces(data, 1000)
    chunks[0], chunks[2] = chunks[2], chunks[0]
    return _plan(framing, _header(framing, gen, len(data)), chunks)


def duplicated(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(3000)
    chunks = _pieces(data, 1000)
    return _plan(framing, _header(framing, gen, len(data)), [chunks[0], chunks[1], chunks[1], chunks[2]])


def overlapping(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(3000)
    return _plan(framing, _header(framing, gen, len(data)), [(0, data[:2000]), (1000, data[1000:])])


def gap(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(3000)
    chunks = _pieces(data, 1000)
    return _plan(framing, _header(framing, gen, len(data)), [chunks[0], chunks[2]])


def truncated(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(3000)
    return _plan(framing, _header(framing, gen, 5000), _pieces(data, 1000))


def oversized(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(3000)
    return _plan(framing, _header(framing, gen, 2000), _pieces(data, 1000))


def declared_huge(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    size = gen.rng.choice([1 << 31, (1 << 63) - 1, U64, 1 << 40])
    return _plan(framing, _header(framing, gen, size), [(0, b"abc")])


def zero_declared_with_data(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    return _plan(framing, _header(framing, gen, 0), [(0, b"abc")])


def no_header(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(2000)
    return StreamPlan(tuple(framing.chunk_message(o, d) for o, d in _pieces(data, 1000)))


def two_headers(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    header = _header(framing, gen, 1000)
    return StreamPlan((framing.header_message(header), framing.header_message(header), framing.chunk_message(0, b"x" * 1000)))


def header_only(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    return _plan(framing, _header(framing, gen, gen.rng.choice([1, 1 << 20])), [])


def empty_stream(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    return StreamPlan(())


def empty_messages(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    """Messages with neither header nor chunk set: zero bytes each."""
    return StreamPlan((b"", b"", b""))


def garbage_mid(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    plan = _plan(framing, _header(framing, gen, 2000), [(0, b"x" * 1000)])
    garbage = garbage_that_fails(message_class(framing.message).FromString, gen.rng)
    return StreamPlan((*plan.messages, garbage, framing.chunk_message(1000, b"y" * 1000)))


def many_tiny_chunks(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    data = gen.rng.randbytes(2000)
    return _plan(framing, _header(framing, gen, len(data)), _pieces(data, 1))


def offset_max(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    return _plan(framing, _header(framing, gen, 10), [(gen.rng.choice([U64, 1 << 63, (1 << 63) - 1]), b"0123456789")])


def stalled_after_header(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    return _plan(framing, _header(framing, gen, 2000), [(0, b"x" * 1000), (1000, b"y" * 1000)], stall_at=1)


def stalled_mid(framing: ChunkFraming, gen: MessageGenerator) -> StreamPlan:
    return _plan(framing, _header(framing, gen, 2000), [(0, b"x" * 1000), (1000, b"y" * 1000)], stall_at=2)


CHUNK_STREAMS: dict[str, StreamBuilder] = {
    "in_order": in_order,
    "out_of_order": out_of_order,
    "duplicated": duplicated,
    "overlapping": overlapping,
    "gap": gap,
    "truncated": truncated,
    "oversized": oversized,
    "declared_huge": declared_huge,
    "zero_declared_with_data": zero_declared_with_data,
    "no_header": no_header,
    "two_headers": two_headers,
    "header_only": header_only,
    "empty_stream": empty_stream,
    "empty_messages": empty_messages,
    "garbage_mid": garbage_mid,
    "many_tiny_chunks": many_tiny_chunks,
    "offset_max": offset_max,
    "stalled_after_header": stalled_after_header,
    "stalled_mid": stalled_mid,
}
STALLING = frozenset({"stalled_after_header", "stalled_mid"})


# ---------------------------------------------------------------- updates invalid by construction


@dataclass(frozen=True, kw_only=True)
class BaseModel:
    """What a home serves as its current base: enough to forge updates against it."""

    model_cid: str
    round: int
    federation: str
    weights: bytes

    def tensors(self) -> dict[str, np.ndarray]:
        return decode_tensors(self.weights)


_EDGE_INTEGERS = (0, 1, (1 << 63) - 1, 1 << 63, U64)


def signed_manifests(base: BaseModel, *, kinds: tuple[str, ...] = ("cluster", "local", "semi-global")) -> list[bytes]:
    """Correctly signed manifests (by a throwaway key) with edge-value rounds and sample counts: valid
    JSON a receiver must either index or refuse cleanly. Seeds for `bytes manifest` fields."""
    key = KeyPair.generate()
    summary = summarize(base.weights)
    out = []
    for kind in kinds:
        for value in _EDGE_INTEGERS:
            for edge in ("round", "num_samples"):
                fields = {"round": base.round, "num_samples": 1, edge: value}
                manifest = Manifest(
                    kind=kind,
                    federation=base.federation,
                    producer=Producer(role="aggregator", id="fuzz-producer"),
                    weights=cid_of(base.weights),
                    tensors=summary,
                    base=base.model_cid if kind == "local" else None,
                    parents=() if kind == "local" else (base.model_cid,),
                    created_at=now_rfc3339(),
                    **fields,
                )
                out.append(manifest.signed(key).to_bytes())
    return out


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


class UpdateForger:
    """Complete SubmitUpdate streams against `base`, each one a receiver must refuse."""

    def __init__(self, base: BaseModel, framing: ChunkFraming, rng: random.Random) -> None:
        self.base = base
        self.framing = framing
        self.rng = rng
        self._tensors = base.tensors()
        self._names = sorted(self._tensors)
        self._counter = 0
        self.kinds: dict[str, Callable[[], tuple[dict, bytes]]] = {
            "random_bytes": lambda: ({}, self.rng.randbytes(len(base.weights))),
            "empty_blob": lambda: ({}, b""),
            "nan": lambda: ({}, self._poisoned(np.nan)),
            "inf": lambda: ({}, self._poisoned(-np.inf)),
            "shape": lambda: ({}, self._reshaped()),
            "dtype": lambda: ({}, self._retyped()),
            "missing_tensor": lambda: ({}, encode_tensors({n: t for n, t in self._nudged().items() if n != self._names[0]})),
            "extra_tensor": lambda: ({}, encode_tensors({**self._nudged(), "fuzz.extra": np.ones(3, np.float32)})),
            "norm_blowup": lambda: ({}, encode_tensors({n: t * 1e6 + 1e6 for n, t in self._tensors.items()})),
            "header_len_huge": lambda: ({}, struct.pack("<Q", (1 << 63) + 5) + self._valid()[8:]),
            "header_len_past_end": lambda: ({}, struct.pack("<Q", len(self._valid()) + 10) + self._valid()[8:]),
            "truncated_blob": lambda: ({}, self._valid()[:-100]),
            "json_garbage": lambda: ({}, struct.pack("<Q", 9) + b"{not json" + b"\x00" * 16),
            "duplicate_json_keys": lambda: ({}, self._duplicate_keys()),
            "overlapping_offsets": lambda: ({}, self._overlapping_offsets()),
            "offsets_past_end": lambda: ({}, self._offsets_past_end()),
            "cid_mismatch": lambda: ({"weights_cid": cid_of(b"something else")}, self._valid()),
            "unknown_base": lambda: ({"base_cid": cid_of(self.rng.randbytes(32))}, self._valid()),
            "wrong_round": lambda: ({"round": base.round + 7}, self._valid()),
            "zero_samples": lambda: ({"num_samples": 0}, self._valid()),
            "samples_over_int64": lambda: ({"num_samples": U64}, self._valid()),
            "bogus_kind": lambda: ({"kind": "cluster"}, self._valid()),
            "wrong_federation": lambda: ({"federation": base.federation + "-other"}, self._valid()),
            "empty_agent": lambda: ({"agent_id": ""}, self._valid()),
            "garbage_manifest": lambda: ({"manifest": b"{garbage"}, self._valid()),
            "manifest_disagrees": lambda: ({"manifest": b"SIGNED"}, self._valid()),
            "declared_unknown_tensor": lambda: ({"tensors": ["fuzz.nope"]}, self._valid()),
            "declared_subset_but_all_sent": lambda: ({"tensors": self._names[:1]}, self._valid()),
        }

    def _nudged(self) -> dict[str, np.ndarray]:
        return {n: t + np.float32(1e-3) for n, t in self._tensors.items()}

    def _valid(self) -> bytes:
        return encode_tensors(self._nudged())

    def _poisoned(self, value: float) -> bytes:
        tensors = self._nudged()
        name = self.rng.choice(self._names)
        flat = tensors[name].reshape(-1).copy()
        flat[self.rng.randrange(flat.size)] = value
        tensors[name] = flat.reshape(tensors[name].shape)
        return encode_tensors(tensors)

    def _reshaped(self) -> bytes:
        tensors = self._nudged()
        name = self.rng.choice(self._names)
        tensors[name] = np.concatenate([tensors[name].reshape(-1), np.zeros(1, tensors[name].dtype)])
        return encode_tensors(tensors)

    def _retyped(self) -> bytes:
        tensors = self._nudged()
        name = self.rng.choice(self._names)
        tensors[name] = tensors[name].astype(np.float64)
        return encode_tensors(tensors)

    def _layout(self) -> tuple[dict, bytes]:
        """A hand-written safetensors header for the base's tensors, and their data."""
        header, data, offset = {}, b"", 0
        for name in self._names:
            raw = np.ascontiguousarray(self._tensors[name], dtype="<f4").tobytes()
            header[name] = {"dtype": "F32", "shape": list(self._tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
            data += raw
            offset += len(raw)
        return header, data

    def _duplicate_keys(self) -> bytes:
        header, data = self._layout()
        first = self._names[0]
        raw = json.dumps(header)[:-1] + f', "{first}": ' + json.dumps(header[first]) + "}"
        return struct.pack("<Q", len(raw)) + raw.encode() + data

    def _overlapping_offsets(self) -> bytes:
        header, data = self._layout()
        if len(self._names) > 1:
            header[self._names[1]]["data_offsets"] = list(header[self._names[0]]["data_offsets"])
        return _safetensors(header, data)

    def _offsets_past_end(self) -> bytes:
        header, data = self._layout()
        last = header[self._names[-1]]["data_offsets"]
        header[self._names[-1]]["data_offsets"] = [last[0], last[1] + (1 << 40)]
        return _safetensors(header, data)

    def stream(self, kind: str, header_type: Descriptor) -> tuple[bytes, ...]:
        """The messages of one forged update of `kind`, from an agent id used once."""
        overrides, blob = self.kinds[kind]()
        self._counter += 1
        agent_id = overrides.pop("agent_id", f"fuzz-forger-{self._counter}")
        fields = {
            "agent_id": agent_id,
            "round": self.base.round,
            "base_cid": self.base.model_cid,
            "num_samples": 10,
            "weights_size": len(blob),
            "weights_cid": cid_of(blob),
            "federation": self.base.federation,
            "kind": "local",
        }
        fields.update(overrides)
        if fields.get("manifest") == b"SIGNED":
            fields["manifest"] = self._disagreeing_manifest(fields)
        header = message_class(header_type)(**fields)
        return tuple(self.framing.stream(header, blob, 64 * 1024))

    def _disagreeing_manifest(self, fields: dict) -> bytes:
        """A correctly signed manifest that names other weights and another sample count than its header."""
        return (
            Manifest(
                kind="local",
                federation=self.base.federation,
                round=self.base.round,
                producer=Producer(role="agent", id=fields["agent_id"]),
                weights=cid_of(b"other weights"),
                tensors=summarize(self._valid()),
                base=self.base.model_cid,
                num_samples=fields["num_samples"] + 1,
                created_at=now_rfc3339(),
            )
            .signed(KeyPair.generate())
            .to_bytes()
        )
