"""Where the agent's client finds its home: joining with backoff, redirects, re-joining when the home
moves or goes, and new bases by push. In-process FakeHome servers on 127.0.0.1:0; milliseconds each.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from agent.client import Client
from agent.session import MAX_REDIRECTS
from proto import strata_pb2 as pb
from proto.errors import FailedPrecondition, InvalidInput, Unavailable
from tests.agent_fakes import FakeHome, make_model, serving
from tests.agent_service_contract import wait_until
from tests.procs import free_port

FAST = {"watch": False, "join_timeout_s": 2.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05}


def client(seeds: str | list[str], **settings: Any) -> Client:
    return Client(seeds, **{"agent_id": "edge-1", **FAST, **settings})


def test_join_follows_a_redirect_to_the_home() -> None:
    with serving(FakeHome("agg-a"), FakeHome("agg-b")) as (a, b):
        a.redirect_to = b.address
        with client(a.address) as c:
            assert (c.home_id, c.home_address) == ("agg-b", b.address)
            assert c.current().model_cid == b.announced.model_cid
        assert a.calls["Join"] == 1 and b.calls["Join"] == 1


def test_a_redirect_loop_is_given_up() -> None:
    with serving(FakeHome("agg-a")) as (a,):
        a.redirect_to = a.address
        with pytest.raises(Unavailable) as info:
            client(a.address, join_timeout_s=0.2).join()
    assert info.value.reason == "no_aggregator" and "redirects" in str(info.value)
    assert a.calls["Join"] >= MAX_REDIRECTS


def test_join_backs_off_while_the_home_is_unavailable_then_joins() -> None:
    with serving(FakeHome("agg-a")) as (a,):
        a.join_failures = 3
        with client(a.address) as c:
            assert c.home_id == "agg-a"
        assert a.calls["Join"] == 4


def test_join_tries_every_known_address() -> None:
    with serving(FakeHome("agg-b")) as (b,):
        with client([f"127.0.0.1:{free_port()}", b.address]) as c:
            assert c.home_id == "agg-b"


def test_join_gives_up_after_its_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        client(f"127.0.0.1:{free_port()}", join_timeout_s=0.3, rpc_timeout_s=0.2).join()
    assert info.value.reason == "no_aggregator" and time.monotonic() - started < 2.0


def test_join_does_not_retry_a_refusal() -> None:
    with serving(FakeHome("agg-a")) as (a,):
        a.join_refusal = "unknown_federation"
        with pytest.raises(InvalidInput) as info:
            client(a.address).join()
        assert info.value.reason == "unknown_federation" and a.calls["Join"] == 1


def test_close_ends_a_join_that_is_backing_off() -> None:
    c = client(f"127.0.0.1:{free_port()}", join_timeout_s=60.0, backoff_base_s=0.5, backoff_max_s=0.5, rpc_timeout_s=0.2)
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: _record(c.join, outcome), daemon=True)
    thread.start()
    time.sleep(0.3)
    c.close()
    thread.join(2.0)
    assert not thread.is_alive()
    assert isinstance(outcome[0], FailedPrecondition) and outcome[0].reason == "closed"


def _record(fn: Any, outcome: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:  # the test inspects whatever ended the call
        outcome.append(exc)


def test_a_pushed_base_wakes_wait_for_model() -> None:
    with serving(FakeHome("agg-a")) as (a,):
        with client(a.address, watch=True) as c:
            c.wait_for_model(timeout=5)
            with pytest.raises(Unavailable):
                c.wait_for_model(timeout=0.05)
            nxt, blob = make_model(round_=1, value=2.0)
            a.push_new_base(nxt, blob)
            weights = c.wait_for_model(timeout=5)
            assert c.model_manifest == nxt and c.round == 1 and float(weights["w"][0]) == 2.0


def test_home_changed_on_the_watch_stream_rejoins_on_the_new_home() -> None:
    with serving(FakeHome("agg-a"), FakeHome("agg-b")) as (a, b):
        with client(a.address, watch=True) as c:
            assert c.home_id == "agg-a"
            a.redirect_to = b.address
            a.events.put(pb.ModelEvent(home_changed=pb.Redirect(aggregator_id="agg-b", address=b.address)))
            wait_until(lambda: c.home_address == b.address, 5.0, "the client did not move to agg-b", poll_s=0.01)
            assert c.home_id == "agg-b"


def test_home_changed_in_a_heartbeat_rejoins_on_the_new_home() -> None:
    with serving(FakeHome("agg-a"), FakeHome("agg-b")) as (a, b):
        a.heartbeat_interval_s = 0.05
        with client(a.address, watch=True) as c:
            a.redirect_to = b.address
            a.heartbeat_home_changed = pb.Redirect(aggregator_id="agg-b", address=b.address)
            wait_until(lambda: c.home_address == b.address, 5.0, "the client did not move to agg-b", poll_s=0.01)
        assert a.calls["Heartbeat"] >= 1


def test_the_client_heartbeats_at_the_interval_its_home_hands_out() -> None:
    with serving(FakeHome("agg-a")) as (a,):
        a.heartbeat_interval_s = 0.05  # Join's interval: the first heartbeat comes quickly
        a.next_interval_s = 7.5  # then the home asks for fewer, as a busy aggregator does
        with client(a.address, watch=True) as c:
            wait_until(lambda: a.calls["Heartbeat"] >= 1, 5.0, "no heartbeat arrived", poll_s=0.01)
            wait_until(lambda: c.heartbeat_interval_s == 7.5, 5.0, "the client kept its old interval")


def test_a_home_that_goes_away_is_replaced_by_another_known_aggregator() -> None:
    b = FakeHome("agg-b")
    with serving(b):
        with serving(FakeHome("agg-a")) as (a,):
            c = client([a.address, b.address], watch=True).connect()
            assert c.home_id == "agg-a"
        try:
            wait_until(lambda: c.home_address == b.address, 20.0, "the client did not re-home on agg-b", poll_s=0.01)
        finally:
            c.close()


def test_a_watch_stream_that_ends_empty_is_not_reopened_in_a_tight_loop() -> None:
    class EmptyWatch(FakeHome):
        def WatchModels(self, request: pb.WatchModelsRequest, context: Any) -> Any:
            self.calls["WatchModels"] += 1
            return iter(())

    with serving(EmptyWatch("agg-a")) as (a,):
        with client(a.address, watch=True, backoff_base_s=0.05, backoff_max_s=0.1):
            time.sleep(0.5)
    # full jitter over waits capped at 0.1 s: a few dozen streams at most, never thousands
    assert 1 <= a.calls["WatchModels"] < 60


def test_calls_on_a_closed_client_say_closed_rather_than_crash_its_threads() -> None:
    # close() shuts the channels under whatever a thread is doing (a relay stopping mid-fetch); grpc
    # raises ValueError for a call on a closed channel, which killed the relay's upstream thread
    with serving(FakeHome("agg-a")) as (a,):
        c = client(a.address)
        c.join()
        _, weights = c.download()
        c.close()
        calls = {
            "fetch_model_bytes": lambda: c.fetch_model_bytes(),
            "revocations": lambda: c.revocations(),
            "submit": lambda: c.submit({name: w + 1 for name, w in weights.items()}, 10),
        }
        for name, call in calls.items():
            with pytest.raises(FailedPrecondition) as info:
                call()
            assert info.value.reason == "closed", name
