"""The consistent-hash ring: which aggregator is an agent's home.

The ring is a pure function of the membership: every aggregator, relay and the
coordinator build it from the same (version, members) and get identical answers.
It is built with uhashring's ketama hashing, weighted by each member's weight, so
when a member leaves only the agents on its arcs (about 1/N of them) move.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from uhashring import HashRing as _UHashRing

from proto.errors import FailedPrecondition, InvalidInput

# a weight is a relative share of the ring; past this its ketama weight (x100) stops being a sane
# integer, and at infinity it cannot be one at all
MAX_WEIGHT = 1e6


@dataclass(frozen=True, kw_only=True)
class Member:
    id: str
    address: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidInput("ring member id must not be empty", reason="bad_member")
        if not (0 < self.weight <= MAX_WEIGHT):
            raise InvalidInput(f"ring member {self.id!r}: weight must be in (0, {MAX_WEIGHT:g}]", reason="bad_member")


class Ring:
    """An immutable consistent-hash ring over a versioned membership."""

    def __init__(self, members: Iterable[Member], version: int = 0) -> None:
        self.version = version
        self.members: tuple[Member, ...] = tuple(sorted(members, key=lambda m: m.id))
        ids = [m.id for m in self.members]
        if len(set(ids)) != len(ids):
            raise InvalidInput(f"duplicate ring member ids in {ids}", reason="bad_member")
        self._by_id = {m.id: m for m in self.members}
        self._ring = (
            _UHashRing(
                nodes={m.id: {"weight": _ketama_weight(m.weight)} for m in self.members},
                hash_fn="ketama",
            )
            if self.members
            else None
        )

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._by_id

    def member(self, member_id: str) -> Member | None:
        return self._by_id.get(member_id)

    def owner(self, key: str) -> Member:
        """The member that owns `key` (an agent id)."""
        if self._ring is None:
            raise FailedPrecondition("the ring has no members", reason="empty_ring")
        return self._by_id[self._ring.get_node(key)]

    def assignments(self, keys: Iterable[str]) -> dict[str, str]:
        """key -> owner id, for measuring how many keys move between two rings."""
        return {key: self.owner(key).id for key in keys}

    def same_members(self, other: Ring) -> bool:
        return self.members == other.members


def _ketama_weight(weight: float) -> int:
    # uhashring's ketama wants integer weights and only their ratios matter, so
    # fractional weights keep two decimals of precision
    return max(1, round(weight * 100))


def remapped_fraction(before: Ring, after: Ring, keys: Iterable[str]) -> float:
    """The fraction of keys whose owner differs between two rings."""
    keys = list(keys)
    if not keys:
        return 0.0
    old, new = before.assignments(keys), after.assignments(keys)
    return sum(old[k] != new[k] for k in keys) / len(keys)
