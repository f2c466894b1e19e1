"""Every RPC of a .proto, and messages for it built from the descriptors alone.

`rpcs(pb.DESCRIPTOR)` walks each service and method: its path, its input and
output types, and whether it is client- or server-streaming. `MessageGenerator`
fills any message type at random by field type (recursively, one field of each
oneof, maps, repeated fields, enums including unknown values), and
`boundary_cases` lists the edge values of each field: 0, -1, 2^31, 2^63-1,
2^64-1, NaN and infinities, empty and megabyte strings, 100,000-entry maps and
repeated fields, messages just over the 4 MiB limit.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import Message

F = FieldDescriptor
MIB = 1 << 20
# the servers' limit (proto.wire.MAX_MESSAGE_BYTES); one byte more must be refused by gRPC itself
OVER_LIMIT = (4 << 20) + 1
BIG_COLLECTION = 100_000

_SIGNED32 = (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32)
_SIGNED64 = (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64)
_UNSIGNED32 = (F.TYPE_UINT32, F.TYPE_FIXED32)
_UNSIGNED64 = (F.TYPE_UINT64, F.TYPE_FIXED64)
_FLOATING = (F.TYPE_DOUBLE, F.TYPE_FLOAT)


@dataclass(frozen=True)
class Rpc:
    """One method of one service, as its descriptor declares it."""

    service: str
    method: str
    input: Descriptor
    output: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def shape(self) -> str:
        return f"{'stream' if self.client_streaming else 'unary'}_{'stream' if self.server_streaming else 'unary'}"

    def parse_input(self, data: bytes) -> Message:
        return message_class(self.input).FromString(data)

    def parse_output(self, data: bytes) -> Message:
        return message_class(self.output).FromString(data)


def rpcs(*files: FileDescriptor, services: Iterable[str] | None = None) -> list[Rpc]:
    """Every method of every service in `files` (only the named services, when given)."""
    wanted = set(services) if services is not None else None
    found = []
    for file in files:
        for service in file.services_by_name.values():
            if wanted is not None and service.full_name not in wanted:
                continue
            for method in service.methods:
                found.append(
                    Rpc(
                        service=service.full_name,
                        method=method.name,
                        input=method.input_type,
                        output=method.output_type,
                        client_streaming=method.client_streaming,
                        server_streaming=method.server_streaming,
                    )
                )
    return found


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def is_map(field: FieldDescriptor) -> bool:
    return field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


# ---------------------------------------------------------------- random valid messages


def _int_range(field: FieldDescriptor) -> tuple[int, int]:
    if field.type in _SIGNED32 or field.type == F.TYPE_ENUM:
        return -(1 << 31), (1 << 31) - 1
    if field.type in _SIGNED64:
        return -(1 << 63), (1 << 63) - 1
    if field.type in _UNSIGNED32:
        return 0, (1 << 32) - 1
    return 0, (1 << 64) - 1


_PRINTABLE = string.ascii_letters + string.digits + "-_.:/@"


class MessageGenerator:
    """Random valid messages of any type. `seeds` are plausible strings (a real CID, the federation,
    known agent ids) and `byte_seeds` plausible bytes (signed manifests), used now and then so some
    messages get past the first checks."""

    def __init__(
        self,
        rng: random.Random,
        seeds: Sequence[str] = (),
        *,
        byte_seeds: Sequence[bytes] = (),
        max_depth: int = 3,
        max_repeated: int = 3,
    ) -> None:
        self.rng = rng
        self.seeds = list(seeds)
        self.byte_seeds = list(byte_seeds)
        self.max_depth = max_depth
        self.max_repeated = max_repeated

    def message(self, descriptor: Descriptor, depth: int = 0) -> Message:
        rng = self.rng
        msg = message_class(descriptor)()
        chosen = {oneof.name: rng.choice([*oneof.fields, None]) for oneof in descriptor.oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None:
                if chosen[oneof.name] is not field:
                    continue
            elif rng.random() < 0.25:
                continue  # unset: a default value on the wire is an absent one
            self._fill(msg, field, depth)
        return msg

    def _fill(self, msg: Message, field: FieldDescriptor, depth: int) -> None:
        rng = self.rng
        if is_map(field):
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            container = getattr(msg, field.name)
            for _ in range(rng.randint(0, self.max_repeated)):
                key = self.scalar(key_field)
                if value_field.type == F.TYPE_MESSAGE:
                    container[key].CopyFrom(self.message(value_field.message_type, depth + 1))
                else:
                    container[key] = self.scalar(value_field)
        elif field.is_repeated:
            container = getattr(msg, field.name)
            for _ in range(rng.randint(0, self.max_repeated)):
                if field.type == F.TYPE_MESSAGE:
                    container.add().CopyFrom(self.message(field.message_type, depth + 1))
                else:
                    container.append(self.scalar(field))
        elif field.type == F.TYPE_MESSAGE:
            child = getattr(msg, field.name)
            if depth < self.max_depth:
                child.CopyFrom(self.message(field.message_type, depth + 1))
            else:
                child.SetInParent()
        else:
            setattr(msg, field.name, self.scalar(field))

    def scalar(self, field: FieldDescriptor) -> Any:
        rng = self.rng
        kind = field.type
        if kind == F.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == F.TYPE_ENUM:
            if rng.random() < 0.8:
                return rng.choice(field.enum_type.values).number
            return rng.randint(*_int_range(field))  # proto3 enums are open: unknown numbers are legal
        if kind in _FLOATING:
            return rng.choice([0.0, 1.0, rng.uniform(-1e3, 1e3), rng.uniform(0, 100), rng.expovariate(0.01)])
        if kind == F.TYPE_STRING:
            return self.text()
        if kind == F.TYPE_BYTES:
            if self.byte_seeds and rng.random() < 0.35:
                return rng.choice(self.byte_seeds)
            return rng.randbytes(rng.choice([0, 1, 16, 200]))
        low, high = _int_range(field)
        return rng.choice([0, 1, rng.randint(0, 100), rng.randint(low, high)])

    def text(self) -> str:
        rng = self.rng
        choice = rng.random()
        if self.seeds and choice < 0.35:
            return rng.choice(self.seeds)
        if choice < 0.45:
            return ""
        if choice < 0.85:
            return "".join(rng.choices(_PRINTABLE, k=rng.randint(1, 24)))
        # any code point that is valid UTF-8 (no surrogates)
        return "".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(1, 12)))


# ---------------------------------------------------------------- boundary values


def _scalar_bounds(field: FieldDescriptor) -> list[tuple[str, Any]]:
    kind = field.type
    if kind in _SIGNED32 or kind == F.TYPE_ENUM:
        values = [("0", 0), ("-1", -1), ("2^31-1", (1 << 31) - 1), ("-2^31", -(1 << 31))]
        return [*values, ("unknown_99", 99)] if kind == F.TYPE_ENUM else values
    if kind in _SIGNED64:
        return [("0", 0), ("-1", -1), ("2^31", 1 << 31), ("2^63-1", (1 << 63) - 1), ("-2^63", -(1 << 63))]
    if kind in _UNSIGNED32:
        return [("0", 0), ("2^31", 1 << 31), ("2^32-1", (1 << 32) - 1)]
    if kind in _UNSIGNED64:
        return [("0", 0), ("2^31", 1 << 31), ("2^63-1", (1 << 63) - 1), ("2^64-1", (1 << 64) - 1)]
    if kind == F.TYPE_DOUBLE:
        return [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("-0.0", -0.0), ("max", 1.7976931348623157e308), ("denormal", 5e-324), ("-1", -1.0)]
    if kind == F.TYPE_FLOAT:
        return [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("max", 3.4e38), ("-1", -1.0)]
    if kind == F.TYPE_BOOL:
        return [("true", True)]
    if kind == F.TYPE_STRING:
        return [
            ("empty", ""),
            ("nul", "\x00"),
            ("1MiB", "a" * MIB),
            ("3MiB_unicode", "é" * (3 * MIB // 2)),
            ("path", "../../../../etc/passwd"),
            ("rtl_control", "\u202e\u0000\ufeff"),
            ("over_limit", "b" * OVER_LIMIT),
        ]
    if kind == F.TYPE_BYTES:
        return [("empty", b""), ("1MiB", b"\x00" * MIB), ("3MiB", b"\xff" * (3 * MIB)), ("over_limit", b"\x01" * OVER_LIMIT)]
    return []


def _big_collection(field: FieldDescriptor) -> Callable[[Message], None]:
    """Fill `field` of a message with BIG_COLLECTION entries."""

    def fill(msg: Message) -> None:
        container = getattr(msg, field.name)
        if is_map(field):
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for i in range(BIG_COLLECTION):
                key = f"k{i}" if key_field.type == F.TYPE_STRING else i
                if value_field.type == F.TYPE_MESSAGE:
                    container[key].SetInParent()
                elif value_field.type == F.TYPE_STRING:
                    container[key] = "v"
                elif value_field.type in _FLOATING:
                    container[key] = float(i)
                else:
                    container[key] = 1
        elif field.type == F.TYPE_MESSAGE:
            for _ in range(BIG_COLLECTION):
                container.add()
        elif field.type == F.TYPE_STRING:
            container.extend(f"s{i}" for i in range(BIG_COLLECTION))
        elif field.type == F.TYPE_BYTES:
            container.extend([b"b"] * BIG_COLLECTION)
        elif field.type in _FLOATING:
            container.extend([math.nan] * BIG_COLLECTION)
        elif field.type == F.TYPE_BOOL:
            container.extend([True] * BIG_COLLECTION)
        else:
            container.extend([1] * BIG_COLLECTION)

    return fill


def _descend(msg: Message, field: FieldDescriptor) -> Message:
    """The message in `field` (the first element of a repeated message field, added if need be)."""
    child = getattr(msg, field.name)
    if field.is_repeated:
        return child[0] if len(child) else child.add()
    return child


def _setter(path: Sequence[FieldDescriptor], value: Any) -> Callable[[Message], None]:
    def apply(msg: Message) -> None:
        for field in path[:-1]:
            msg = _descend(msg, field)
        last = path[-1]
        if last.is_repeated:
            getattr(msg, last.name).append(value)
        else:
            setattr(msg, last.name, value)

    return apply


def _field_edits(descriptor: Descriptor, prefix: tuple[FieldDescriptor, ...], depth: int) -> Iterator[tuple[str, Callable[[Message], None]]]:
    for field in descriptor.fields:
        path = (*prefix, field)
        name = ".".join(f.name for f in path)
        if field.is_repeated:
            yield f"{name}=100k", _nested(prefix, _big_collection(field))
            if is_map(field):
                continue
        if field.type == F.TYPE_MESSAGE:
            if depth < 2:
                yield from _field_edits(field.message_type, path, depth + 1)
            continue
        for label, value in _scalar_bounds(field):
            yield f"{name}={label}", _setter(path, value)


def _nested(prefix: Sequence[FieldDescriptor], fill: Callable[[Message], None]) -> Callable[[Message], None]:
    def apply(msg: Message) -> None:
        for field in prefix:
            msg = _descend(msg, field)
        fill(msg)

    return apply


@dataclass(frozen=True)
class Boundary:
    """One edge value in one field; `build()` serializes it (lazily: some are megabytes), into an
    otherwise empty message or into a copy of `base` (so the edge value meets plausible neighbours
    and reaches the checks behind the first one)."""

    label: str
    descriptor: Descriptor
    edit: Callable[[Message], None]

    def build(self, base: Message | None = None) -> bytes:
        msg = message_class(self.descriptor)()
        if base is not None:
            msg.CopyFrom(base)
        self.edit(msg)
        return msg.SerializeToString()


def boundary_cases(descriptor: Descriptor) -> list[Boundary]:
    """Every field (and the fields of its message fields, two levels down) at each of its edge values."""
    return [Boundary(label, descriptor, edit) for label, edit in _field_edits(descriptor, (), 0)]
