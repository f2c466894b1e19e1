"""What the fuzzer sends: `Case`s for an RPC, drawn from every category in turn.

Categories, for every RPC:

- `valid`: a random valid message of the input type;
- `mutated:<how>`: a valid serialization with bytes flipped, cut short, a field
  duplicated, a wire type changed, an unknown field added, or spliced;
- `garbage`: random bytes that do not parse as the input type;
- `boundary:<field>=<value>`: one field at an edge value (see messages.boundary_cases);
- `wire:<what>`: hostile encodings (huge declared lengths, 100,000 nested groups, ...);

and for client-streaming RPCs with header/chunk framing, `stream:<what>`
(streams.CHUNK_STREAMS) and `forged:<what>` (streams.UpdateForger, when a base
model is known). Server-streaming calls are sometimes read slowly
(`slow_reader`). The draw is seeded: the same seed gives the same cases.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tests.fuzz.messages import Boundary, MessageGenerator, Rpc, boundary_cases
from tests.fuzz.streams import CHUNK_STREAMS, STALLING, UpdateForger, chunk_framing
from tests.fuzz.wire import MUTATORS, WIRE_ODDITIES, garbage_that_fails

# the share of each category in a run (client streams add `stream` and `forged`)
CATEGORY_WEIGHTS = {"valid": 0.22, "mutated": 0.26, "garbage": 0.12, "boundary": 0.2, "wire": 0.12, "slow_reader": 0.04}
STREAM_WEIGHTS = {"stream": 0.25, "forged": 0.25}
# boundary messages over _CACHE_FROM bytes are built once and reused, up to _CACHE_BYTES in all
_CACHE_FROM = 256 << 10
_CACHE_BYTES = 48 << 20
# answered requests kept per RPC as bases for mutations and boundary values
_CORPUS_SIZE = 64
_CORPUS_ITEM_BYTES = 16 << 10


@dataclass(frozen=True)
class Case:
    """One call: its request messages (exactly one unless client-streaming), and how to pace it."""

    rpc: Rpc
    kind: str
    messages: tuple[bytes, ...]
    # client streams: pause `stall_s` before sending messages[stall_at]; len(messages) stalls before half-close
    stall_at: int = -1
    stall_s: float = 0.0
    # server streams: after the first response, stop reading for this long, then cancel
    read_stall_s: float = 0.0

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)

    def sample(self, limit: int = 48) -> str:
        """The start of the first message, in hex: enough to rebuild a finding by hand."""
        first = self.messages[0] if self.messages else b""
        return first[:limit].hex() + ("..." if len(first) > limit else "")


class CaseFactory:
    """Cases for any RPC. `seeds` and `byte_seeds` are plausible values for valid messages; `forgers` (by RPC path)
    forge whole updates against a real base; `stall_s` is how long a stalling sender waits (set it
    above the server's stream idle limit)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        seeds: Sequence[str] = (),
        byte_seeds: Sequence[bytes] = (),
        stall_s: float = 1.5,
        forgers: dict[str, UpdateForger] | None = None,
    ) -> None:
        self.rng = rng
        self.gen = MessageGenerator(rng, seeds, byte_seeds=byte_seeds)
        self.stall_s = stall_s
        self.forgers = forgers or {}
        self._boundaries: dict[str, list[Boundary]] = {}
        self._boundary_turn: dict[str, int] = {}
        self._built: dict[str, bytes] = {}
        self._corpus: dict[str, list[bytes]] = {}
        self._built_bytes = 0

    # ------------------------------------------------------------ one request message

    def valid(self, rpc: Rpc) -> bytes:
        return self.gen.message(rpc.input).SerializeToString()

    def learn(self, case: Case, status: str) -> None:
        """Keep requests the server answered (OK, or a stream it held open) as bases for later
        mutations and boundary values: they got past the first checks, so their neighbours go deeper."""
        if len(case.messages) != 1 or not status.startswith(("OK", "OPEN")) or status == "OK accepted":
            return
        if case.size > _CORPUS_ITEM_BYTES or case.kind.startswith(("garbage", "wire", "stream", "forged")):
            return
        try:
            case.rpc.parse_input(case.messages[0])  # a mutation may have been answered with a refusal
        except Exception:  # noqa: BLE001 - not a base for anything
            return
        corpus = self._corpus.setdefault(case.rpc.path, [])
        if len(corpus) < _CORPUS_SIZE:
            corpus.append(case.messages[0])
        else:
            corpus[self.rng.randrange(_CORPUS_SIZE)] = case.messages[0]

    def _base(self, rpc: Rpc) -> bytes:
        """A valid serialization: one the server answered before (half the time, when there is one) or a new one."""
        corpus = self._corpus.get(rpc.path)
        if corpus and self.rng.random() < 0.5:
            return self.rng.choice(corpus)
        return self.valid(rpc)

    def mutated(self, rpc: Rpc) -> tuple[str, bytes]:
        name = self.rng.choice(sorted(MUTATORS))
        return f"mutated:{name}", MUTATORS[name](self._base(rpc), self.rng)

    def garbage(self, rpc: Rpc) -> bytes:
        return garbage_that_fails(rpc.parse_input, self.rng)

    def wire(self, rpc: Rpc) -> tuple[str, bytes]:
        name = self.rng.choice(sorted(WIRE_ODDITIES))
        return f"wire:{name}", WIRE_ODDITIES[name](rpc.input, self.rng)

    def boundary(self, rpc: Rpc) -> tuple[str, bytes]:
        """The next edge value for this input type: every one is sent before any repeats."""
        key = rpc.input.full_name
        if key not in self._boundaries:
            cases = boundary_cases(rpc.input)
            self.rng.shuffle(cases)
            self._boundaries[key] = cases
            self._boundary_turn[key] = 0
        cases = self._boundaries[key]
        if not cases:
            return "boundary:empty_message", b""
        turn = self._boundary_turn[key]
        self._boundary_turn[key] = turn + 1
        case = cases[turn % len(cases)]
        cache_key = f"{key}:{case.label}"
        data = self._built.get(cache_key)
        if data is None:
            # mostly inside a random valid message; a megabyte case is built once and reused
            base = rpc.parse_input(self._base(rpc)) if self.rng.random() < 0.7 else None
            data = case.build(base)
            if len(data) > _CACHE_FROM and self._built_bytes + len(data) <= _CACHE_BYTES:
                self._built[cache_key] = data
                self._built_bytes += len(data)
        return f"boundary:{case.label}", data

    def one(self, rpc: Rpc, category: str) -> tuple[str, bytes]:
        if category == "valid":
            return "valid", self.valid(rpc)
        if category == "mutated":
            return self.mutated(rpc)
        if category == "garbage":
            return "garbage", self.garbage(rpc)
        if category == "wire":
            return self.wire(rpc)
        if category == "boundary":
            return self.boundary(rpc)
        raise ValueError(f"unknown category {category!r}")

    # ------------------------------------------------------------ calls

    def categories(self, rpc: Rpc) -> dict[str, float]:
        weights = dict(CATEGORY_WEIGHTS)
        if not rpc.server_streaming:
            weights.pop("slow_reader")
        if rpc.client_streaming and chunk_framing(rpc.input) is not None:
            weights.update(STREAM_WEIGHTS)
            if rpc.path not in self.forgers:
                weights.pop("forged")
        return weights

    def case(self, rpc: Rpc, category: str | None = None) -> Case:
        weights = self.categories(rpc)
        if category is None:
            category = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        if category == "stream":
            framing = chunk_framing(rpc.input)
            assert framing is not None
            name = self.rng.choice(sorted(CHUNK_STREAMS))
            plan = CHUNK_STREAMS[name](framing, self.gen)
            return Case(rpc, f"stream:{name}", plan.messages, plan.stall_at, self.stall_s if name in STALLING else 0.0)
        if category == "forged":
            forger = self.forgers[rpc.path]
            name = self.rng.choice(sorted(forger.kinds))
            return Case(rpc, f"forged:{name}", forger.stream(name, forger.framing.header.message_type))
        if category == "slow_reader":
            return Case(rpc, "slow_reader", (self.valid(rpc),), read_stall_s=self.stall_s)
        kind, data = self.one(rpc, category)
        if not rpc.client_streaming:
            return Case(rpc, kind, (data,))
        # in a client stream the odd message comes alone, or after a valid one
        lead = (self.valid(rpc),) if self.rng.random() < 0.5 else ()
        return Case(rpc, kind, (*lead, data))

    def cases(self, rpcs: Sequence[Rpc], per_rpc: int) -> Iterator[Case]:
        """`per_rpc` cases for each RPC, interleaved; each RPC gets every one of its categories first."""
        plans = []
        for rpc in rpcs:
            categories = list(self.categories(rpc))
            plan: list[str | None] = categories[:per_rpc] + [None] * max(0, per_rpc - len(categories))
            plans.append((rpc, plan))
        for turn in range(per_rpc):
            for rpc, plan in plans:
                yield self.case(rpc, plan[turn])
