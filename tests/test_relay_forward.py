"""The relay's forwarder loop alone: backoff while upstream is away, and a closed window cuts the wait short."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from proto.errors import Refusal, UpdateRefused
from relay.forward import Forwarder
from tests.agent_service_contract import wait_until
from tests.test_relay import B, device_submission, tiny_relay


class _Journal:
    """One pending window, forever; counts how often the forwarder looked."""

    def __init__(self) -> None:
        self.looks = 0

    def pending_windows(self) -> list[SimpleNamespace]:
        self.looks += 1
        return [SimpleNamespace(round=1, update_cid="pending")]


class _Unjoined:
    def upstream_round(self) -> int | None:
        return None  # not joined: nothing can be forwarded


def test_wake_cuts_a_backoff_wait_short() -> None:
    journal = _Journal()
    # a retry wait drawn from [0, 1000 s): only wake() brings the next attempt within the test
    forwarder = Forwarder(journal=journal, store=None, upstream=_Unjoined(), max_staleness=1, retry_s=1000.0)  # type: ignore[arg-type]
    stopping = threading.Event()
    thread = threading.Thread(target=forwarder.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: journal.looks >= 1, timeout=2.0)
        forwarder.wake()
        assert wait_until(lambda: journal.looks >= 2, timeout=2.0), "wake() did not end the backoff wait"
    finally:
        stopping.set()
        forwarder.wake()
        thread.join(timeout=2.0)
    assert not thread.is_alive()


class _OnceCounted:
    """Upstream's answer (the aggregator's intake is tested for it in test_rounds): the first send is
    refused already_counted, as while the open round still counts the relay's previous window."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def upstream_round(self) -> int | None:
        return 3

    def submit_signed(self, manifest, blob, *, tensors=(), base_metrics=None) -> object:  # noqa: ANN001
        self.sent.append(manifest.cid)
        if len(self.sent) == 1:
            raise UpdateRefused("already counted", reason=Refusal.ALREADY_COUNTED)
        return SimpleNamespace(update_cid=manifest.cid, duplicate=False)


def test_a_window_refused_already_counted_waits_and_is_sent_again(tmp_path: Path) -> None:
    tiny = tiny_relay(tmp_path, max_devices=1)
    tiny.relay.intake.submit(device_submission(tiny, "d1", {B: [1, 1]}, 1))
    closed = tiny.relay.maybe_close(active_trainers=1)
    assert closed is not None
    upstream = _OnceCounted()
    forwarder = Forwarder(journal=tiny.relay.journal, store=tiny.store, upstream=upstream, max_staleness=2, retry_s=0.01)
    assert not forwarder.forward_pending()  # deferred, not dropped
    assert [w.update_cid for w in tiny.relay.journal.pending_windows()] == [closed.manifest.cid]
    assert forwarder.forward_pending()
    assert upstream.sent == [closed.manifest.cid, closed.manifest.cid]
    assert tiny.relay.journal.pending_windows() == []
