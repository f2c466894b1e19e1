"""The client's background threads: WatchModels (push) and Heartbeat (poll).

New base models arrive by push on a WatchModels stream; a heartbeat polls as a
fallback for networks that kill long streams. Either one re-joins when the home
says it moved (home_changed) or stops answering, which lands the agent on the
ring's new owner. The watch loop backs off under the client's `RetryPolicy`
between failed or empty streams; a stream that delivered events starts the
ladder again.
"""

from __future__ import annotations

import logging
import threading

import grpc

from agent.session import Session
from agent.telemetry import read_telemetry
from proto import strata_pb2 as pb
from proto.retry import Backoff
from proto.wire import STREAM_TIMEOUT_S

log = logging.getLogger("strata.agent.loops")

# consecutive failed heartbeats after which the home counts as gone
HOME_LOST_AFTER = 3


class BackgroundLoops:
    """The watch and heartbeat threads of one session; they end when the session closes."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start both threads (once)."""
        if self._threads:
            return
        for target, name in ((self._watch, "watch"), (self._heartbeat, "heartbeat")):
            thread = threading.Thread(target=target, name=f"strata-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float = 2.0) -> None:
        for thread in self._threads:
            thread.join(timeout=timeout)

    def _known_cid(self) -> str:
        latest = self._session.latest
        return latest.model_cid if latest else ""

    def _watch(self) -> None:
        session = self._session
        backoff = session.retry.backoff(stop=session.closed)
        while not session.closed.is_set():
            try:
                saw_events = self._watch_once(backoff)
            except ValueError:
                # the channel was closed under us by close(): the client is shutting down
                if session.closed.is_set():
                    return
                raise
            except grpc.RpcError as exc:
                if session.closed.is_set():
                    return
                code = exc.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the stream's own deadline ran out: open the next one at once
                if not backoff.wait():
                    return
                if code == grpc.StatusCode.UNAVAILABLE:
                    # the home is gone (or restarting): join again, which walks to the ring's next live owner
                    session.rejoin("home_unreachable")
                continue
            if not saw_events and not backoff.wait():
                return  # a stream that ended with nothing in it is not reopened at once either

    def _watch_once(self, backoff: Backoff) -> bool:
        """Follow one WatchModels stream until it ends or the home moves; whether it carried any event.

        Each event restarts `backoff`: the home answered."""
        session = self._session
        identity = session.identity
        stream = session.stub().WatchModels(
            pb.WatchModelsRequest(agent_id=identity.agent_id, federation=identity.federation, known_cid=self._known_cid()),
            timeout=STREAM_TIMEOUT_S,
        )
        saw_events = False
        for event in stream:
            saw_events = True
            backoff.reset()
            if event.WhichOneof("event") == "new_base":
                session.announce(event.new_base)
            else:
                log.info("home_changed", extra={"fields": {"agent": identity.agent_id, "to": event.home_changed.aggregator_id}})
                stream.cancel()
                session.learn(event.home_changed.address)
                session.rejoin("home_changed")
                return saw_events
            if session.closed.is_set():
                stream.cancel()
                return saw_events
        return saw_events

    def _heartbeat(self) -> None:
        session = self._session
        failures = 0
        while not session.closed.wait(session.heartbeat_interval_s):
            identity = session.identity
            try:
                reply = session.stub().Heartbeat(
                    pb.HeartbeatRequest(
                        agent_id=identity.agent_id,
                        telemetry=read_telemetry(),
                        federation=identity.federation,
                        known_cid=self._known_cid(),
                    ),
                    timeout=min(session.rpc_timeout_s, session.heartbeat_interval_s * 2),
                )
            except ValueError:
                if session.closed.is_set():  # the channel was closed by close()
                    return
                raise
            except grpc.RpcError as exc:
                if session.closed.is_set():
                    return
                failures += 1
                log.debug("heartbeat_failed", extra={"fields": {"agent": identity.agent_id, "code": str(exc.code())}})
                if failures >= HOME_LOST_AFTER:
                    failures = 0
                    session.rejoin("home_unreachable")
                continue
            failures = 0
            session.revocations_version = reply.revocations_version
            if reply.next_interval_s > 0:
                # the home spreads its heartbeat load: follow the interval it hands out
                session.heartbeat_interval_s = reply.next_interval_s
            session.announce(reply.current_base)
            if reply.HasField("home_changed") and reply.home_changed.address:
                session.learn(reply.home_changed.address)
                session.rejoin("home_changed")
