"""The announcement outbox and its sender, without a coordinator: batches, order, durability, refusals."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from aggregator.announcements import Announcer, Outbox
from coordinator.client import IndexResult
from proto.errors import FailedPrecondition, InvalidInput, StrataError, Unavailable
from proto.retry import RetryPolicy


class FakeCoordinator:
    """Records what it indexed and the size of every call.

    `refuse`: manifests refused for good (each on its own). `outages`: that many calls fail
    as unreachable before any succeeds. `batched=False`: a coordinator without AnnounceModels.
    `outage_after`: single announcements that succeed before the coordinator goes away once.
    """

    def __init__(
        self, *, refuse: Iterable[bytes] = (), outages: int = 0, batched: bool = True, outage_after: int | None = None
    ) -> None:
        self.indexed: list[tuple[bytes, dict[str, str]]] = []
        self.batches: list[int] = []
        self.singles = 0
        self._refuse = set(refuse)
        self._outages = outages
        self._batched = batched
        self._outage_after = outage_after

    def _fail_if_down(self) -> None:
        if self._outages:
            self._outages -= 1
            raise Unavailable("coordinator down")

    def _index(self, manifest: bytes, notes: Mapping[str, str] | None) -> IndexResult:
        if manifest in self._refuse:
            return IndexResult(reason="invalid_manifest", message="not a manifest")
        self.indexed.append((manifest, dict(notes or {})))
        return IndexResult(cid=f"cid-{manifest.decode()}")

    def announce_many(self, items: Iterable[tuple[bytes, Mapping[str, str] | None]]) -> list[IndexResult]:
        items = list(items)
        self.batches.append(len(items))
        if not self._batched:
            err = StrataError("method not found", reason="unimplemented")
            err.status = "UNIMPLEMENTED"
            raise err
        self._fail_if_down()
        return [self._index(manifest, notes) for manifest, notes in items]

    def announce(self, manifest: bytes, notes: Mapping[str, str] | None = None) -> str:
        self.singles += 1
        if self._outage_after is not None and self.singles > self._outage_after:
            self._outage_after = None
            raise Unavailable("coordinator down")
        self._fail_if_down()
        result = self._index(manifest, notes)
        if result.refused:
            raise InvalidInput(result.message, reason=result.reason)
        return result.cid


def run_announcer(
    outbox: Outbox, coordinator: FakeCoordinator, **kwargs: int
) -> tuple[Announcer, threading.Event, threading.Thread]:
    stop = threading.Event()
    announcer = Announcer(
        coordinator,  # type: ignore[arg-type]
        outbox=outbox,
        policy=RetryPolicy(base_s=0.001, max_s=0.002),
        stop=stop,
        **kwargs,
    )
    thread = threading.Thread(target=announcer.run, daemon=True)
    thread.start()
    return announcer, stop, thread


def stop_announcer(announcer: Announcer, stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    announcer.wake()
    thread.join(timeout=2.0)
    assert not thread.is_alive()


def fill(outbox: Outbox, *manifests: bytes) -> None:
    for manifest in manifests:
        outbox.push(manifest, {"m": manifest.decode()})


# ---------------------------------------------------------------- the outbox


def test_outbox_is_oldest_first_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    with Outbox(path) as outbox:
        fill(outbox, b"m0", b"m1", b"m2", b"m3")
        first = outbox.oldest(2)
        assert [a.manifest for a in first] == [b"m0", b"m1"] and first[0].notes == {"m": "m0"}
        outbox.remove(a.seq for a in first)
    with Outbox(path) as reopened:
        assert len(reopened) == 2
        assert [a.manifest for a in reopened.oldest(500)] == [b"m2", b"m3"]


def test_a_batch_is_cut_at_its_byte_budget_but_never_empty() -> None:
    with Outbox(None) as outbox:
        outbox.push(b"x" * 100, {})
        outbox.push(b"y" * 100, {})
        outbox.push(b"z" * 10, {})
        assert [len(a.manifest) for a in outbox.oldest(10, max_bytes=150)] == [100]  # the first always goes
        assert [len(a.manifest) for a in outbox.oldest(10, max_bytes=200)] == [100, 100]
        assert [len(a.manifest) for a in outbox.oldest(10, max_bytes=210)] == [100, 100, 10]
        assert outbox.oldest(2, max_bytes=10_000)[-1].manifest == b"y" * 100
        assert Outbox(None).oldest(10) == []


def test_outbox_refuses_a_file_of_another_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path).close()

    class Newer(Outbox):
        SCHEMA_VERSION = Outbox.SCHEMA_VERSION + 1

    with pytest.raises(FailedPrecondition):
        Newer(path)


# ---------------------------------------------------------------- the sender


def test_announcer_delivers_in_order_in_batches_through_an_outage() -> None:
    coordinator = FakeCoordinator(outages=3)
    with Outbox(None) as outbox:
        fill(outbox, *[f"m{n}".encode() for n in range(7)])
        announcer, stop, thread = run_announcer(outbox, coordinator, batch_size=3)
        try:
            assert announcer.flush(timeout_s=2.0)
        finally:
            stop_announcer(announcer, stop, thread)
    assert [m for m, _ in coordinator.indexed] == [f"m{n}".encode() for n in range(7)]
    assert coordinator.indexed[2][1] == {"m": "m2"}
    # three failed calls kept the first batch whole; then 3 + 3 + 1
    assert coordinator.batches == [3, 3, 3, 3, 3, 1] and coordinator.singles == 0


def test_a_refused_announcement_is_dropped_alone_and_the_batch_delivered() -> None:
    coordinator = FakeCoordinator(refuse=[b"garbage", b"forged"])
    with Outbox(None) as outbox:
        fill(outbox, b"m0", b"garbage", b"m1", b"forged", b"m2")
        announcer, stop, thread = run_announcer(outbox, coordinator)
        try:
            assert announcer.flush(timeout_s=2.0)
            assert announcer.pending() == 0
        finally:
            stop_announcer(announcer, stop, thread)
    assert [m for m, _ in coordinator.indexed] == [b"m0", b"m1", b"m2"]
    assert coordinator.batches == [5]


def test_a_coordinator_without_batches_gets_them_one_by_one() -> None:
    coordinator = FakeCoordinator(refuse=[b"garbage"], batched=False)
    with Outbox(None) as outbox:
        fill(outbox, b"m0", b"garbage", b"m1")
        announcer, stop, thread = run_announcer(outbox, coordinator)
        try:
            assert announcer.flush(timeout_s=2.0)
        finally:
            stop_announcer(announcer, stop, thread)
    assert [m for m, _ in coordinator.indexed] == [b"m0", b"m1"] and coordinator.singles == 3


def test_an_outage_inside_the_one_by_one_fallback_keeps_only_the_rest() -> None:
    coordinator = FakeCoordinator(batched=False, outage_after=2)
    with Outbox(None) as outbox:
        fill(outbox, b"m0", b"m1", b"m2", b"m3")
        announcer, stop, thread = run_announcer(outbox, coordinator)
        try:
            assert announcer.flush(timeout_s=2.0)
        finally:
            stop_announcer(announcer, stop, thread)
    # m0 and m1 went through before the outage and are not sent again
    assert [m for m, _ in coordinator.indexed] == [b"m0", b"m1", b"m2", b"m3"] and coordinator.singles == 5


def test_what_was_not_delivered_is_delivered_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    down = FakeCoordinator(outages=10**9)
    with Outbox(path) as outbox:
        fill(outbox, b"m0", b"m1")
        announcer, stop, thread = run_announcer(outbox, down)
        assert not announcer.flush(timeout_s=0.2)  # every call failed: nothing may be lost
        stop_announcer(announcer, stop, thread)
        assert len(outbox) == 2 and down.indexed == []
    coordinator = FakeCoordinator()
    with Outbox(path) as outbox:
        fill(outbox, b"m2")
        announcer, stop, thread = run_announcer(outbox, coordinator)
        try:
            assert announcer.flush(timeout_s=2.0)
        finally:
            stop_announcer(announcer, stop, thread)
    assert [m for m, _ in coordinator.indexed] == [b"m0", b"m1", b"m2"] and coordinator.batches == [3]
