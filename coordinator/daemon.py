"""The coordinator process: CoordinatorService on gRPC plus a ticker that expires leases.

    with CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=d)) as daemon:
        print(daemon.address)
        daemon.wait()

State (ring version, last known members, model index, agent directory) lives in
`state_dir`, so a new daemon on the same directory carries on where the last
one stopped. With static `members`, the ring is those members, version 1, forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import Metric

from coordinator.config import CoordinatorConfig
from coordinator.index import ModelIndex
from coordinator.membership import Membership
from coordinator.service import SERVICE_NAME, CoordinatorServicer
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import FailedPrecondition
from proto.metrics import MetricsEndpoint, gauge, serve_metrics
from proto.serving import ServerHandle, create_server
from trust.security import Security

__all__ = ["EXPIRY_TICK_S", "CoordinatorDaemon"]

log = logging.getLogger("strata.coordinator")

EXPIRY_TICK_S = 0.5
MEMBERSHIP_DB = "membership.db"
INDEX_DB = "index.db"


class CoordinatorDaemon:
    def __init__(
        self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._clock = clock
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._handle: ServerHandle | None = None
        self._servicer: CoordinatorServicer | None = None
        self.security: Security | None = None
        self._ticker: threading.Thread | None = None
        self.membership: Membership | None = None
        self.index: ModelIndex | None = None
        self._metrics: MetricsEndpoint | None = None

    @property
    def port(self) -> int:
        if self._handle is None:
            raise FailedPrecondition("the coordinator is not started", reason="not_started")
        return self._handle.port

    @property
    def address(self) -> str:
        if self._handle is None:
            raise FailedPrecondition("the coordinator is not started", reason="not_started")
        return self._handle.address

    def start(self) -> CoordinatorDaemon:
        with self._lock:
            if self._stopping.is_set():
                raise FailedPrecondition(
                    "a stopped coordinator cannot be restarted", reason="daemon_stopped"
                )
            if self._started:
                return self
            state = self.config.state_path
            state.mkdir(parents=True, exist_ok=True)
            self.membership = Membership(
                ttl_s=self.config.lease_ttl_s,
                heartbeat_interval_s=self.config.heartbeat_interval_s,
                clock=self._clock,
                store=state / MEMBERSHIP_DB,
                static_members=self.config.static_members(),
            )
            self.index = ModelIndex(state / INDEX_DB)
            try:
                self.security = Security.configure(self.config.tls, listen=self.config.listen, who="coordinator")
                handle = create_server(
                    self.config.listen,
                    credentials=self.security.server_credentials() if self.security else None,
                    interceptors=self.security.interceptors() if self.security else (),
                )
            except Exception:
                self._close_stores()
                raise
            servicer = CoordinatorServicer(
                self.membership, self.index, offload=handle.offload, stopping=self._stopping
            )
            self._servicer = servicer
            pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, handle.server)
            handle.start()
            handle.set_serving(SERVICE_NAME, True)
            self._handle = handle
            self._ticker = threading.Thread(
                target=self._tick, name="coordinator-expiry", daemon=True
            )
            self._ticker.start()
            if self.config.metrics_port > 0:
                self._metrics = serve_metrics(self._collect_metrics, host=handle.host, port=self.config.metrics_port)
            self._started = True
            ring = self.membership.ring()
            log.info(
                "coordinator_started",
                extra={
                    "fields": {
                        "address": handle.address,
                        "state_dir": str(state),
                        "ring_version": ring.version,
                        "members": [m.id for m in ring.members],
                        "static": bool(self.config.members),
                    }
                },
            )
            return self

    def _tick(self) -> None:
        assert self.membership is not None
        while not self._stopping.wait(EXPIRY_TICK_S):
            try:
                expired = self.membership.expire()
            except Exception:  # noqa: BLE001 - the ticker must outlive one bad tick
                log.exception("expiry_failed")
                continue
            if not expired:
                continue
            for aggregator_id in expired:
                log.warning("aggregator_expired", extra={"fields": {"aggregator": aggregator_id}})
            ring = self.membership.ring()
            log.info(
                "ring_changed",
                extra={
                    "fields": {
                        "ring_version": ring.version,
                        "members": [m.id for m in ring.members],
                    }
                },
            )

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds) and close the stores. Idempotent."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            if self._servicer is not None:
                self._servicer.changed()  # watch streams see the stop at once
            if self._handle is not None:
                self._handle.stop(grace)
            if self._metrics is not None:
                self._metrics.stop()
            if self._ticker is not None:
                self._ticker.join(timeout=EXPIRY_TICK_S * 4)
            self._close_stores()
            self._stopped.set()
            if self._started:
                log.info("coordinator_stopped", extra={"fields": {}})

    def _collect_metrics(self) -> Iterator[Metric]:
        assert self.membership is not None and self.index is not None
        ring = self.membership.ring()
        statuses = self.membership.status()
        yield gauge("strata_coordinator_ring_version", "current ring version", ring.version)
        yield gauge("strata_coordinator_ring_members", "aggregators on the ring", len(ring))
        yield gauge("strata_coordinator_aggregators_alive", "aggregators with a live lease", sum(s.alive for s in statuses))
        yield gauge("strata_coordinator_models_indexed", "manifests in the model index", self.index.count())

    def _close_stores(self) -> None:
        if self.membership is not None:
            self.membership.close()
        if self.index is not None:
            self.index.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `stop()` has finished; False if `timeout` passed first."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> CoordinatorDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
