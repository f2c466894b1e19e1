"""This aggregator's lease with the coordinator: register, heartbeat, register again when forgotten.

`LeaseKeeper.run()` registers (retrying with backoff while the coordinator is
away), then heartbeats every interval the lease names. Each heartbeat carries the
registration, so a coordinator that lost its state re-registers us; a NotFound
answer makes us register at once. After a successful heartbeat, every
`agents_interval_s`, the aggregator's agents are reported to the agent directory.
Every lease granted is handed to `on_lease` (e.g. to follow the revocation list
whose version it names).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from coordinator.client import (
    AgentEntry,
    AggregatorInfo,
    CoordinatorClient,
    FederationProgress,
    Lease,
    Progress,
)
from proto.errors import NotFound, StrataError
from proto.retry import RetryPolicy
from proto.wire import is_retryable

log = logging.getLogger("strata.aggregator.lease")

# the heartbeat interval before the coordinator named one, and the shortest it may name
_DEFAULT_INTERVAL_S = 2.0
_MIN_INTERVAL_S = 0.05


class LeaseKeeper:
    """`status_fn()` returns {"round", "agent_count", "last_cluster_cid", "last_semi_global_cid"}
    (missing keys count as empty); `agents_fn()` returns objects or dicts with agent_id,
    display_name, capability ("train", "partial_train", "inference"), telemetry (dict) and last_seen;
    `on_lease(lease)` runs on this thread after each register and heartbeat."""

    def __init__(
        self,
        client: CoordinatorClient,
        *,
        info: AggregatorInfo,
        status_fn: Callable[[], Mapping[str, Any]],
        agents_fn: Callable[[], Iterable[Any]] | None,
        agents_interval_s: float,
        policy: RetryPolicy,
        stop: threading.Event,
        on_lease: Callable[[Lease], None] | None = None,
    ) -> None:
        self._client = client
        self._on_lease = on_lease
        self.info = info
        self._status_fn = status_fn
        self._agents_fn = agents_fn
        self._agents_interval_s = agents_interval_s
        self._policy = policy
        self._stop = stop
        self.registered = threading.Event()
        self._lease: Lease | None = None

    @property
    def heartbeat_interval_s(self) -> float:
        lease = self._lease
        return max(_MIN_INTERVAL_S, lease.heartbeat_interval_s if lease is not None else _DEFAULT_INTERVAL_S)

    def run(self) -> None:
        backoff = self._policy.backoff(stop=self._stop)
        last_report = float("-inf")
        wait_s = 0.0
        while not self._stop.wait(wait_s):
            try:
                if self.registered.is_set():
                    self._heartbeat()
                else:
                    self._register()
            except NotFound:
                log.info("coordinator_forgot_us", extra={"fields": {"aggregator": self.info.id}})
                self.registered.clear()
                wait_s = 0.0
                continue
            except StrataError as err:
                if self._stop.is_set():
                    return
                wait_s = self.heartbeat_interval_s if self.registered.is_set() else backoff.next_delay()
                log.info(
                    "coordinator_unreachable" if is_retryable(err) else "coordinator_refused",
                    extra={
                        "fields": {"coordinator": self._client.address, "error": str(err), "retry_in_s": round(wait_s, 2)}
                    },
                )
                continue
            backoff.reset()
            wait_s = self.heartbeat_interval_s
            self._leased()
            if self._agents_fn is not None and time.monotonic() - last_report >= self._agents_interval_s:
                if self._report_agents():
                    last_report = time.monotonic()

    def _leased(self) -> None:
        if self._on_lease is None or self._lease is None:
            return
        try:
            self._on_lease(self._lease)
        except Exception:  # noqa: BLE001 - whatever the hook does, the lease is kept
            log.exception("on_lease_failed")

    def _register(self) -> None:
        self._lease = self._client.register(self.info)
        self.registered.set()
        log.info(
            "registered_with_coordinator",
            extra={"fields": {"coordinator": self._client.address, "ring_version": self._lease.ring_version}},
        )

    def _heartbeat(self) -> None:
        try:
            status = self._status_fn() or {}
        except Exception:  # noqa: BLE001 - a heartbeat without progress beats no heartbeat
            log.exception("status_fn_failed")
            status = {}
        progress = Progress(
            **_progress_fields(status),
            federations=tuple(
                FederationProgress(federation=str(each["federation"]), **_progress_fields(each))
                for each in status.get("federations") or ()
            ),
        )
        self._lease = self._client.heartbeat(self.info.id, progress, info=self.info)

    def _report_agents(self) -> bool:
        assert self._agents_fn is not None
        try:
            self._client.report_agents(self.info.id, [_agent_entry(a, self.info.id) for a in self._agents_fn()])
            return True
        except StrataError as err:
            log.info("report_agents_failed", extra={"fields": {"error": str(err)}})
        except Exception:  # noqa: BLE001 - a bad agent list must not stop heartbeats
            log.exception("agents_fn_failed")
        return False


def _agent_entry(agent: Any, home: str) -> AgentEntry:
    def get(name: str, default: Any = None) -> Any:
        return agent.get(name, default) if isinstance(agent, Mapping) else getattr(agent, name, default)

    return AgentEntry(
        agent_id=str(get("agent_id")),
        home=str(get("home") or home),
        last_seen=float(get("last_seen") or 0.0),
        telemetry=dict(get("telemetry") or {}),
        capability=str(get("capability") or "train"),
        display_name=str(get("display_name") or ""),
    )


def _progress_fields(status: Mapping[str, Any]) -> dict[str, Any]:
    """A status mapping's round, agent count and model CIDs, as the heartbeat carries them."""
    return {
        "round": int(status.get("round") or 0),
        "agent_count": int(status.get("agent_count") or 0),
        "last_cluster_cid": str(status.get("last_cluster_cid") or ""),
        "last_semi_global_cid": str(status.get("last_semi_global_cid") or ""),
    }
