"""RingView: the last ring this aggregator saw, which it places agents with; and `static_ring`.

The view is fed either by static configuration or by the coordinator's WatchRing
stream. It keeps the last version it saw, so an aggregator goes on placing agents
when the coordinator is down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from coordinator.ring import Member, Ring


class RingView:
    """`on_change` runs (outside the lock) each time a new ring is adopted."""

    def __init__(self, ring: Ring, *, on_change: Callable[[], None] | None = None) -> None:
        self._ring = ring
        self._lock = threading.Lock()
        self._on_change = on_change

    @property
    def ring(self) -> Ring:
        with self._lock:
            return self._ring

    def update(self, ring: Ring, *, authoritative: bool = False) -> bool:
        """Adopt a newer ring. Returns False (and changes nothing) for an older or equal version,
        unless `authoritative`: the coordinator's direct answer wins even with a lower version,
        which is what a coordinator that lost its state (and restarted its count) sends."""
        with self._lock:
            old = self._ring
            if ring.version == old.version and ring.same_members(old):
                return False
            if ring.version < old.version and not authoritative:
                return False
            self._ring = ring
        if self._on_change is not None:
            self._on_change()
        return True


def static_ring(self_member: Member, peers: list[str]) -> Ring:
    """A ring from `id=host:port` entries; this aggregator is added if the list omits it."""
    members = {self_member.id: self_member}
    for entry in peers:
        member_id, address = entry.split("=", 1)
        if member_id != self_member.id:
            members[member_id] = Member(id=member_id, address=address)
    return Ring(members.values(), version=1)
