"""The announcement outbox and its sender, without a coordinator: order, durability, refusals."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from aggregator.announcements import Announcer, Outbox
from proto.errors import FailedPrecondition, InvalidInput, Unavailable
from proto.retry import RetryPolicy


class FakeCoordinator:
    """Records what it indexed; `refuse` is refused for good, `outages` calls fail as unreachable."""

    def __init__(self, *, refuse: bytes = b"", outages: int = 0) -> None:
        self.indexed: list[tuple[bytes, dict[str, str]]] = []
        self.calls = 0
        self._refuse = refuse
        self._outages = outages

    def announce(self, manifest: bytes, notes: Mapping[str, str] | None = None) -> str:
        self.calls += 1
        if self._outages:
            self._outages -= 1
            raise Unavailable("coordinator down")
        if manifest == self._refuse:
            raise InvalidInput("not a manifest", reason="bad_manifest")
        self.indexed.append((manifest, dict(notes or {})))
        return f"cid-{len(self.indexed)}"


def run_announcer(outbox: Outbox, coordinator: FakeCoordinator) -> tuple[Announcer, threading.Event, threading.Thread]:
    stop = threading.Event()
    announcer = Announcer(coordinator, outbox=outbox, policy=RetryPolicy(base_s=0.001, max_s=0.002), stop=stop)  # type: ignore[arg-type]
    thread = threading.Thread(target=announcer.run, daemon=True)
    thread.start()
    return announcer, stop, thread


def stop_announcer(announcer: Announcer, stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    announcer.wake()
    thread.join(timeout=2.0)
    assert not thread.is_alive()


def test_outbox_is_oldest_first_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    with Outbox(path) as outbox:
        for n in range(3):
            outbox.push(f"m{n}".encode(), {"n": str(n)})
        first = outbox.oldest()
        assert first is not None and first.manifest == b"m0" and first.notes == {"n": "0"}
        outbox.remove(first.seq)
    with Outbox(path) as reopened:
        assert len(reopened) == 2
        second = reopened.oldest()
        assert second is not None and second.manifest == b"m1"


def test_outbox_refuses_a_file_of_another_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path).close()

    class Newer(Outbox):
        SCHEMA_VERSION = Outbox.SCHEMA_VERSION + 1

    with pytest.raises(FailedPrecondition):
        Newer(path)


def test_announcer_delivers_in_order_through_an_outage() -> None:
    coordinator = FakeCoordinator(outages=3)
    outbox = Outbox(None)
    announcer, stop, thread = run_announcer(outbox, coordinator)
    try:
        for n in range(4):
            announcer.announce(f"m{n}".encode(), {"round": str(n)})
        assert announcer.flush(timeout_s=2.0)
        assert [m for m, _ in coordinator.indexed] == [b"m0", b"m1", b"m2", b"m3"]
        assert coordinator.indexed[2][1] == {"round": "2"}
        assert coordinator.calls == 4 + 3 and announcer.pending() == 0
    finally:
        stop_announcer(announcer, stop, thread)
        outbox.close()


def test_a_refused_announcement_is_dropped_and_the_rest_delivered() -> None:
    coordinator = FakeCoordinator(refuse=b"garbage")
    outbox = Outbox(None)
    announcer, stop, thread = run_announcer(outbox, coordinator)
    try:
        for manifest in (b"m0", b"garbage", b"m1"):
            announcer.announce(manifest)
        assert announcer.flush(timeout_s=2.0)
        assert [m for m, _ in coordinator.indexed] == [b"m0", b"m1"] and coordinator.calls == 3
    finally:
        stop_announcer(announcer, stop, thread)
        outbox.close()


def test_what_was_not_delivered_is_delivered_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        outbox.push(b"m0", {})
        outbox.push(b"m1", {})
    coordinator = FakeCoordinator()
    outbox = Outbox(path)
    announcer, stop, thread = run_announcer(outbox, coordinator)
    try:
        assert announcer.flush(timeout_s=2.0)
        assert [m for m, _ in coordinator.indexed] == [b"m0", b"m1"]
    finally:
        stop_announcer(announcer, stop, thread)
        outbox.close()
