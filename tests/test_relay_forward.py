"""The relay's forwarder loop alone: backoff while upstream is away, and a closed window cuts the wait short."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

from relay.forward import Forwarder


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


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_wake_cuts_a_backoff_wait_short() -> None:
    journal = _Journal()
    # a retry wait drawn from [0, 1000 s): only wake() brings the next attempt within the test
    forwarder = Forwarder(journal=journal, store=None, upstream=_Unjoined(), max_staleness=1, retry_s=1000.0)  # type: ignore[arg-type]
    stopping = threading.Event()
    thread = threading.Thread(target=forwarder.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: journal.looks >= 1)
        forwarder.wake()
        assert _wait_for(lambda: journal.looks >= 2), "wake() did not end the backoff wait"
    finally:
        stopping.set()
        forwarder.wake()
        thread.join(timeout=2.0)
    assert not thread.is_alive()
