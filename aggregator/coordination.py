"""The aggregator's link to the coordinator: lease, ring, model announcements, agent reports.

`CoordinatorLink.start()` never blocks and never fails because the coordinator
is away. Background threads:

- lease: register (retrying with backoff), then heartbeat every interval the
  lease names, carrying the registration so a coordinator that lost its state
  re-registers us; on NotFound it registers again. Agents are reported here too.
- ring: follow WatchRing and feed `RingView.update`; when the stream breaks,
  poll GetRing with backoff until it can watch again. The view keeps the last
  ring it saw, so the aggregator goes on placing agents while the coordinator is down.
- announcements: `announce()` appends to a durable backlog (SQLite under
  `state_dir`); a sender delivers it in order and deletes what was delivered, so
  after an outage (of either side) the coordinator's index catches up.

Imports `proto`, `storage` and `coordinator.ring` only.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from aggregator.membership import RingView
from coordinator.ring import Member, Ring
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import capability_value, telemetry_from_dict
from proto.errors import InvalidInput, NotFound
from proto.wire import create_channel, error_from_rpc, is_retryable

__all__ = ["BACKLOG_FILE", "CoordinatorLink", "Registration", "ring_from_pb"]

log = logging.getLogger("strata.aggregator.coordination")

BACKLOG_FILE = "coordinator-backlog.db"


@dataclass(frozen=True, kw_only=True)
class Registration:
    """What this aggregator registers with the coordinator."""

    id: str
    address: str
    federations: tuple[str, ...] = ()
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.id or ":" not in self.address or not (self.weight > 0):
            raise InvalidInput(
                f"bad registration {self!r}: need an id, host:port and weight > 0",
                reason="bad_aggregator",
            )
        object.__setattr__(self, "federations", tuple(self.federations))

    def to_pb(self) -> pb.AggregatorInfo:
        return pb.AggregatorInfo(
            id=self.id, address=self.address, federations=list(self.federations), weight=self.weight
        )


def ring_from_pb(message: pb.Ring) -> Ring:
    return Ring(
        [Member(id=m.id, address=m.address, weight=m.weight or 1.0) for m in message.members],
        version=message.version,
    )


class _Backoff:
    """Full-jitter exponential backoff between `base_s` and `max_s`."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self._base_s, self._max_s, self._attempt = base_s, max_s, 0

    def next(self) -> float:
        ceiling = min(self._max_s, self._base_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return ceiling / 2 + random.random() * ceiling / 2

    def reset(self) -> None:
        self._attempt = 0


class _Backlog:
    """Announcements not yet delivered, oldest first; durable when given a path."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            ":memory:" if path is None else str(path), check_same_thread=False
        )
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS backlog (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " manifest BLOB NOT NULL, notes TEXT NOT NULL, enqueued_at REAL NOT NULL)"
        )
        self._db.commit()

    def push(self, manifest: bytes, notes: Mapping[str, str]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO backlog (manifest, notes, enqueued_at) VALUES (?, ?, ?)",
                (manifest, json.dumps(dict(notes)), time.time()),
            )

    def oldest(self) -> tuple[int, bytes, dict[str, str]] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT seq, manifest, notes FROM backlog ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else (row[0], bytes(row[1]), json.loads(row[2]))

    def remove(self, seq: int) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM backlog WHERE seq = ?", (seq,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM backlog").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CoordinatorLink:
    """Keeps this aggregator registered, its ring view current and the coordinator's index fed.

    `status_fn()` returns {"round", "agent_count", "last_cluster_cid",
    "last_semi_global_cid"} (missing keys count as empty); `agents_fn()` returns
    objects or dicts with agent_id, display_name, capability ("train",
    "partial_train", "inference"), telemetry (dict) and last_seen.
    """

    def __init__(
        self,
        address: str,
        *,
        info: Registration,
        ring_view: RingView,
        status_fn: Callable[[], Mapping[str, Any]],
        agents_fn: Callable[[], Iterable[Any]] | None = None,
        state_dir: str | Path | None = None,
        channel_factory: Callable[[str], grpc.Channel] = create_channel,
        rpc_timeout_s: float = 5.0,
        agents_interval_s: float = 10.0,
        retry_max_s: float = 5.0,
        watch_timeout_s: float = 300.0,
    ) -> None:
        self.address = address
        self.info = info
        # follow the ring of the (first) federation this aggregator serves; empty: the whole ring
        self._federation = info.federations[0] if info.federations else ""
        self.ring_view = self._view = ring_view
        self._status_fn = status_fn
        self._agents_fn = agents_fn
        self._timeout = rpc_timeout_s
        self._agents_interval_s = agents_interval_s
        self._retry_max_s = retry_max_s
        self._watch_timeout_s = watch_timeout_s
        self._channel_factory = channel_factory
        backlog_path = None
        if state_dir is not None:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            backlog_path = Path(state_dir) / BACKLOG_FILE
        self._backlog = _Backlog(backlog_path)
        self._stop = threading.Event()
        self._wake_sender = threading.Event()
        self._delivered = threading.Condition()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.CoordinatorServiceStub | None = None
        self._watch_call: Any = None
        self._state = "new"
        self.registered = threading.Event()
        self.lease: pb.Lease | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> CoordinatorLink:
        with self._lock:
            if self._state == "stopped":
                raise InvalidInput(
                    "a stopped CoordinatorLink cannot be restarted", reason="link_stopped"
                )
            if self._state == "started":
                return self
            self._state = "started"
            self._channel = self._channel_factory(self.address)
            self._stub = pb_grpc.CoordinatorServiceStub(self._channel)
            for name, target in (
                ("lease", self._lease_loop),
                ("ring", self._ring_loop),
                ("announce", self._send_loop),
            ):
                thread = threading.Thread(
                    target=self._run, args=(target,), name=f"coordinator-{name}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        log.info(
            "coordinator_link_started",
            extra={"fields": {"coordinator": self.address, "aggregator": self.info.id}},
        )
        return self

    def _run(self, loop: Callable[[], None]) -> None:
        """Run `loop` until stop(), restarting it after an unexpected error."""
        while not self._stop.is_set():
            try:
                loop()
            except Exception:  # noqa: BLE001 - after stop(), a closed channel or backlog is expected
                if self._stop.is_set():
                    return
                log.exception(
                    "coordinator_link_loop_failed", extra={"fields": {"loop": loop.__name__}}
                )
                self._stop.wait(1.0)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop every thread within about `timeout_s`; undelivered announcements stay in the backlog."""
        with self._lock:
            if self._state == "stopped":
                return
            was_started = self._state == "started"
            self._state = "stopped"
            self._stop.set()
            self._wake_sender.set()
            call = self._watch_call
        if call is not None:
            call.cancel()
        if self._channel is not None:
            # cancels calls in flight; an announcement cut off stays in the backlog
            self._channel.close()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._backlog.close()
        if was_started:
            log.info("coordinator_link_stopped", extra={"fields": {"coordinator": self.address}})

    def __enter__(self) -> CoordinatorLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ lease and agents

    def _heartbeat_interval(self) -> float:
        interval = self.lease.heartbeat_interval_s if self.lease is not None else 2.0
        return max(0.05, interval)

    def _lease_loop(self) -> None:
        backoff = _Backoff(0.1, self._retry_max_s)
        last_report = float("-inf")
        wait_s = 0.0
        while not self._stop.wait(wait_s):
            try:
                if not self.registered.is_set():
                    self._register()
                else:
                    self._heartbeat()
                backoff.reset()
                wait_s = self._heartbeat_interval()
            except NotFound:
                self.registered.clear()
                wait_s = 0.0
                continue
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                err = error_from_rpc(e)
                if isinstance(err, NotFound):
                    log.info(
                        "coordinator_forgot_us", extra={"fields": {"aggregator": self.info.id}}
                    )
                    self.registered.clear()
                    wait_s = 0.0
                    continue
                wait_s = (
                    backoff.next() if not self.registered.is_set() else self._heartbeat_interval()
                )
                log.info(
                    "coordinator_unreachable" if is_retryable(e) else "coordinator_refused",
                    extra={
                        "fields": {
                            "coordinator": self.address,
                            "error": str(err),
                            "retry_in_s": round(wait_s, 2),
                        }
                    },
                )
                continue
            if (
                self._agents_fn is not None
                and time.monotonic() - last_report >= self._agents_interval_s
            ):
                if self._report_agents():
                    last_report = time.monotonic()

    def _register(self) -> None:
        assert self._stub is not None
        self.lease = self._stub.RegisterAggregator(self.info.to_pb(), timeout=self._timeout)
        self.registered.set()
        log.info(
            "registered_with_coordinator",
            extra={
                "fields": {"coordinator": self.address, "ring_version": self.lease.ring_version}
            },
        )

    def _status(self) -> Mapping[str, Any]:
        try:
            return self._status_fn() or {}
        except Exception:  # noqa: BLE001 - a heartbeat without progress beats no heartbeat
            log.exception("status_fn_failed")
            return {}

    def _heartbeat(self) -> None:
        assert self._stub is not None
        status = self._status()
        self.lease = self._stub.HeartbeatAggregator(
            pb.AggregatorHeartbeat(
                id=self.info.id,
                round=int(status.get("round") or 0),
                agent_count=int(status.get("agent_count") or 0),
                last_cluster_cid=str(status.get("last_cluster_cid") or ""),
                last_semi_global_cid=str(status.get("last_semi_global_cid") or ""),
                info=self.info.to_pb(),
            ),
            timeout=self._timeout,
        )

    def _report_agents(self) -> bool:
        assert self._stub is not None and self._agents_fn is not None
        try:
            records = [self._agent_record(a) for a in self._agents_fn()]
            self._stub.ReportAgents(
                pb.ReportAgentsRequest(aggregator_id=self.info.id, agents=records),
                timeout=self._timeout,
            )
            return True
        except grpc.RpcError as e:
            log.info("report_agents_failed", extra={"fields": {"error": str(error_from_rpc(e))}})
        except Exception:  # noqa: BLE001 - a bad agent list must not stop heartbeats
            log.exception("agents_fn_failed")
        return False

    def _agent_record(self, agent: Any) -> pb.AgentRecord:
        def get(name: str, default: Any = None) -> Any:
            return (
                agent.get(name, default)
                if isinstance(agent, Mapping)
                else getattr(agent, name, default)
            )

        telemetry = get("telemetry") or {}
        return pb.AgentRecord(
            agent_id=str(get("agent_id")),
            home_aggregator=str(get("home") or self.info.id),
            last_seen=float(get("last_seen") or 0.0),
            telemetry=telemetry_from_dict(telemetry),
            capability=capability_value(str(get("capability") or "train")),
            display_name=str(get("display_name") or ""),
        )

    # ------------------------------------------------------------ ring

    def _adopt(self, message: pb.Ring, *, authoritative: bool = False) -> None:
        if not message.members:
            # An empty ring places no one; keep the last useful one.
            return
        ring = ring_from_pb(message)
        if self._view.update(ring, authoritative=authoritative):
            log.info(
                "ring_adopted",
                extra={
                    "fields": {
                        "ring_version": ring.version,
                        "members": [m.id for m in ring.members],
                    }
                },
            )

    def _ring_loop(self) -> None:
        assert self._stub is not None
        backoff = _Backoff(0.1, self._retry_max_s)
        watch_supported = True
        while not self._stop.is_set():
            try:
                # The coordinator's answers are authoritative, even with a lower version than the
                # view holds: a coordinator that lost its state restarts its count. One stream
                # never goes backwards, and the stream opens only after this answer.
                self._adopt(self._stub.GetRing(pb.GetRingRequest(federation=self._federation), timeout=self._timeout), authoritative=True)
                backoff.reset()
                if not watch_supported:
                    self._stop.wait(self._heartbeat_interval())
                    continue
                # known_version 0: the first message is the current ring, which confirms the stream is live
                call = self._stub.WatchRing(
                    pb.WatchRingRequest(known_version=0, federation=self._federation), timeout=self._watch_timeout_s
                )
                with self._lock:
                    if self._stop.is_set():
                        call.cancel()
                        return
                    self._watch_call = call
                for message in call:
                    self._adopt(message, authoritative=True)
                    backoff.reset()
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                code = e.code() if hasattr(e, "code") else None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the watch's own deadline: open a new one
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    watch_supported = False
                    continue
                delay = backoff.next()
                log.info(
                    "ring_follow_interrupted",
                    extra={
                        "fields": {"error": str(error_from_rpc(e)), "retry_in_s": round(delay, 2)}
                    },
                )
                self._stop.wait(delay)
            finally:
                with self._lock:
                    self._watch_call = None

    # ------------------------------------------------------------ announcements

    def announce(self, manifest_bytes: bytes, notes: Mapping[str, str] | None = None) -> None:
        """Queue a model manifest for the coordinator's index; returns at once."""
        self._backlog.push(
            bytes(manifest_bytes), {str(k): str(v) for k, v in (notes or {}).items()}
        )
        self._wake_sender.set()

    def pending_announcements(self) -> int:
        return len(self._backlog)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued announcement is delivered (or refused); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._delivered:
            while len(self._backlog):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._delivered.wait(min(remaining, 0.1))
        return True

    def _send_loop(self) -> None:
        assert self._stub is not None
        backoff = _Backoff(0.1, self._retry_max_s)
        while not self._stop.is_set():
            item = self._backlog.oldest()
            if item is None:
                self._wake_sender.wait(1.0)
                self._wake_sender.clear()
                continue
            seq, manifest, notes = item
            try:
                reply = self._stub.AnnounceModel(
                    pb.AnnounceModelRequest(manifest=manifest, notes=notes), timeout=self._timeout
                )
                log.debug("model_announced", extra={"fields": {"model": reply.model_cid}})
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                if is_retryable(e):
                    self._stop.wait(backoff.next())
                    continue
                # Refused (bad manifest, bad signature): resending the same bytes cannot help.
                log.warning(
                    "announcement_refused", extra={"fields": {"error": str(error_from_rpc(e))}}
                )
            backoff.reset()
            self._backlog.remove(seq)
            with self._delivered:
                self._delivered.notify_all()
