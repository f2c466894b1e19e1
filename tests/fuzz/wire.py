"""The protobuf wire format by hand: encode records, split a serialization into them, and break it.

Python's protobuf API refuses to write most malformed bytes, so everything that
must reach a server broken (wrong wire types, lengths that promise megabytes and
deliver three bytes, 100,000 nested groups, invalid UTF-8 in a string) is built
here from tags and varints. `MUTATORS` take a valid serialization and return a
mutated one; `WIRE_ODDITIES` build hostile bytes for a message type.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
MAX_FIELD_NUMBER = (1 << 29) - 1
U64 = (1 << 64) - 1


def varint(value: int) -> bytes:
    """Base-128 varint of `value` (negative numbers as their 64-bit two's complement, as protobuf does)."""
    value &= U64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint((field_number << 3) | wire_type)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return tag(field_number, LENGTH) + varint(len(payload)) + payload


@dataclass(frozen=True)
class Record:
    """One top-level field record of a serialization: data[start:end] is its tag and payload."""

    field_number: int
    wire_type: int
    start: int
    payload_start: int
    end: int


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def records(data: bytes) -> list[Record]:
    """The top-level records of a well-formed proto3 serialization (no groups)."""
    out: list[Record] = []
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        field_number, wire_type = key >> 3, key & 7
        payload_start = pos
        if wire_type == VARINT:
            _, pos = _read_varint(data, pos)
        elif wire_type == FIXED64:
            pos += 8
        elif wire_type == FIXED32:
            pos += 4
        elif wire_type == LENGTH:
            size, pos = _read_varint(data, pos)
            pos += size
        else:
            raise ValueError(f"wire type {wire_type} in a proto3 serialization")
        out.append(Record(field_number, wire_type, start, payload_start, pos))
    return out


# ---------------------------------------------------------------- mutations of a valid serialization

Mutator = Callable[[bytes, random.Random], bytes]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(1, 256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, min(8, len(out)))):
        out[rng.randrange(len(out))] ^= rng.randrange(1, 256)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] if data else b""


def duplicate_record(data: bytes, rng: random.Random) -> bytes:
    """A field sent twice: legal protobuf (the last scalar wins, messages merge), a classic parser trap."""
    found = records(data)
    if not found:
        return data + data
    record = rng.choice(found)
    copy = data[record.start : record.end]
    at = rng.choice([r.end for r in found] + [0])
    return data[:at] + copy + data[at:]


def wrong_wire_type(data: bytes, rng: random.Random) -> bytes:
    """A known field's tag rewritten with another wire type, its payload left as it was."""
    found = records(data)
    if not found:
        return tag(1, rng.choice([FIXED64, FIXED32, START_GROUP])) + b"\x01"
    record = rng.choice(found)
    other = rng.choice([w for w in (VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32, 6, 7) if w != record.wire_type])
    return data[: record.start] + tag(record.field_number, other) + data[record.payload_start :]


def unknown_field(data: bytes, rng: random.Random) -> bytes:
    number = rng.choice([rng.randint(20, 1000), 19000, 19999, MAX_FIELD_NUMBER])
    payload = {
        VARINT: varint(rng.getrandbits(64)),
        FIXED64: rng.randbytes(8),
        FIXED32: rng.randbytes(4),
        LENGTH: varint(5) + rng.randbytes(5),
    }
    wire_type = rng.choice(list(payload))
    return data + tag(number, wire_type) + payload[wire_type]


def splice(data: bytes, rng: random.Random) -> bytes:
    """Two serializations concatenated: legal, they merge."""
    return data + data[rng.randrange(len(data) + 1) :]


MUTATORS: dict[str, Mutator] = {
    "flip": flip_bytes,
    "truncate": truncate,
    "duplicate_field": duplicate_record,
    "wrong_wire_type": wrong_wire_type,
    "unknown_field": unknown_field,
    "splice": splice,
}


# ---------------------------------------------------------------- hostile bytes for a message type

_HUGE_LENGTHS = (1 << 31, (1 << 32) - 1, (1 << 63) - 1, U64)


def _fields_of(descriptor: Descriptor, *types: int) -> list[FieldDescriptor]:
    return [f for f in descriptor.fields if f.type in types]


def _any_field(descriptor: Descriptor, rng: random.Random, *types: int) -> int:
    fields = _fields_of(descriptor, *types) if types else list(descriptor.fields)
    return rng.choice(fields).number if fields else rng.randint(1, 15)


def huge_declared_length(descriptor: Descriptor, rng: random.Random) -> bytes:
    """A length-delimited field that declares gigabytes (up to 2^64-1) and carries a few bytes."""
    number = _any_field(descriptor, rng, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
    return tag(number, LENGTH) + varint(rng.choice(_HUGE_LENGTHS)) + rng.randbytes(rng.randint(0, 3))


def overlong_varint(descriptor: Descriptor, rng: random.Random) -> bytes:
    """A varint of 11 bytes (at most 10 are legal), or a tag that never ends."""
    if rng.random() < 0.5:
        return tag(_any_field(descriptor, rng), VARINT) + b"\xff" * 10 + b"\x01"
    return b"\xff" * rng.randint(1, 12)


def varint_overflow(descriptor: Descriptor, rng: random.Random) -> bytes:
    """2^64-1, 2^63 or a negative number in a varint field of any width (uint32, enum, bool...)."""
    fields = _fields_of(
        descriptor,
        FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
    )  # fmt: skip
    number = rng.choice(fields).number if fields else 1
    return tag(number, VARINT) + varint(rng.choice([U64, 1 << 63, -1, 1 << 32, (1 << 31)]))


def invalid_utf8(descriptor: Descriptor, rng: random.Random) -> bytes:
    """Bytes that are not UTF-8 in a proto3 string field (which the parser must refuse)."""
    fields = _fields_of(descriptor, FieldDescriptor.TYPE_STRING)
    number = rng.choice(fields).number if fields else 1
    return length_delimited(number, rng.choice([b"\xc3\x28", b"\xff\xfe", b"\xed\xa0\x80", b"ok\x80"]))


def field_number_zero(descriptor: Descriptor, rng: random.Random) -> bytes:
    return tag(0, rng.choice([VARINT, LENGTH])) + b"\x00"


def field_number_too_big(descriptor: Descriptor, rng: random.Random) -> bytes:
    return varint(((MAX_FIELD_NUMBER + 1) << 3) | VARINT) + b"\x01"


def stray_end_group(descriptor: Descriptor, rng: random.Random) -> bytes:
    return tag(rng.randint(1, 15), END_GROUP)


def unterminated_group(descriptor: Descriptor, rng: random.Random) -> bytes:
    return tag(rng.randint(20, 40), START_GROUP) + tag(1, VARINT) + b"\x01"


def deep_groups(depth: int) -> Callable[[Descriptor, random.Random], bytes]:
    """`depth` nested unknown groups, properly closed: recursion the parser must bound."""

    def build(descriptor: Descriptor, rng: random.Random) -> bytes:
        number = 1000
        return tag(number, START_GROUP) * depth + tag(number, END_GROUP) * depth

    return build


def deep_nesting(depth: int) -> Callable[[Descriptor, random.Random], bytes]:
    """`depth` nested length-delimited records: through a real message field when the type has one
    (the parser must recurse into it), else through an unknown field."""

    def build(descriptor: Descriptor, rng: random.Random) -> bytes:
        fields = _fields_of(descriptor, FieldDescriptor.TYPE_MESSAGE)
        number = rng.choice(fields).number if fields else 1000
        # prefixes from the inside out, joined once: concatenating level by level is quadratic
        prefixes, inner = [], 0
        for _ in range(depth):
            prefix = tag(number, LENGTH) + varint(inner)
            prefixes.append(prefix)
            inner += len(prefix)
        return b"".join(reversed(prefixes))

    return build


def random_garbage(descriptor: Descriptor, rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([1, 2, 7, 64, 1024, rng.randint(1, 4096)]))


WIRE_ODDITIES: dict[str, Callable[[Descriptor, random.Random], bytes]] = {
    "huge_declared_length": huge_declared_length,
    "overlong_varint": overlong_varint,
    "varint_overflow": varint_overflow,
    "invalid_utf8": invalid_utf8,
    "field_number_zero": field_number_zero,
    "field_number_too_big": field_number_too_big,
    "stray_end_group": stray_end_group,
    "unterminated_group": unterminated_group,
    "deep_groups_100": deep_groups(100),
    "deep_groups_100k": deep_groups(100_000),
    "deep_nesting_100": deep_nesting(100),
    "deep_nesting_10k": deep_nesting(10_000),
}


def garbage_that_fails(parse: Callable[[bytes], object], rng: random.Random, *, attempts: int = 64) -> bytes:
    """Random bytes that `parse` refuses (random bytes often parse as unknown fields, so draw until one fails)."""
    for _ in range(attempts):
        data = rng.randbytes(rng.choice([1, 3, 8, 32, 64, 256, 1024, 4096]))
        try:
            parse(data)
        except Exception:  # noqa: BLE001 - any refusal will do
            return data
    return b"\xff" * 11  # an overlong varint: never a message
