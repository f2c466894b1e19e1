"""The relay's forwarder loop alone: backoff while upstream is away, and a closed window cuts the wait short."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from relay.forward import Forwarder
from tests.agent_service_contract import wait_until


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
