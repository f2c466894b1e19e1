"""The coordinator process: CoordinatorService on gRPC plus a ticker that expires leases.

    with CoordinatorDaemon(CoordinatorConfig(listen="127.0.0.1:0", state_dir=d)) as daemon:
        print(daemon.address)
        daemon.wait()

State (ring version, last known members, model index, agent directory) lives in
`state_dir`, so a new daemon on the same directory carries on where the last
one stopped. With static `members`, the ring is those members, version 1, forever.

With `ca_dir` (the fleet CA directory) the coordinator also issues certificates:
agents enroll with a bootstrap token on the TLS-only `enroll_listen` port and renew
on the main port, and the CA's revocation list (re-read whenever `strata certs
revoke` rewrites it) is enforced here, named in every lease and served to the
aggregators.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from prometheus_client.core import Metric

from coordinator.config import CoordinatorConfig
from coordinator.hub import Hub
from coordinator.index import ModelIndex
from coordinator.membership import Membership
from coordinator.service import SERVICE_NAME, CoordinatorServicer, EnrollmentServicer
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import ConfigError, FailedPrecondition
from proto.metrics import MetricsEndpoint, MetricSpec, serve_metrics
from proto.serving import ServerHandle, create_server
from trust.ca import REVOCATIONS_FILE, FleetCA
from trust.distribution import RevocationFile
from trust.enroll import Enrollment
from trust.messages import version_of
from trust.revocation import RevocationList
from trust.security import Security
from trust.tokens import TokenStore

__all__ = ["EXPIRY_TICK_S", "METRICS", "CoordinatorDaemon"]

log = logging.getLogger("strata.coordinator")

EXPIRY_TICK_S = 0.5
MEMBERSHIP_DB = "membership.db"
INDEX_DB = "index.db"
HUB_DB = "hub.db"
# in the CA directory, where `strata certs token` writes them
TOKENS_DB = "tokens.db"

# what /metrics serves; the README's metrics catalogue is generated from this list
RING_VERSION = MetricSpec("strata_coordinator_ring_version", "gauge", "current ring version")
RING_MEMBERS = MetricSpec("strata_coordinator_ring_members", "gauge", "aggregators on the ring")
AGGREGATORS_ALIVE = MetricSpec("strata_coordinator_aggregators_alive", "gauge", "aggregators with a live lease")
LEASE_CHANGES = MetricSpec(
    "strata_coordinator_lease_changes", "counter", "leases granted, moved (new address) or expired", ("change",)
)
MODELS_INDEXED = MetricSpec("strata_coordinator_models_indexed", "gauge", "manifests in the model index")
REVOCATIONS_VERSION = MetricSpec(
    "strata_coordinator_revocations_version", "gauge", "version of the fleet's revocation list (with a CA only)"
)
METRICS = (RING_VERSION, RING_MEMBERS, AGGREGATORS_ALIVE, LEASE_CHANGES, MODELS_INDEXED, REVOCATIONS_VERSION)


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
        self.hub: Hub | None = None
        self._metrics: MetricsEndpoint | None = None
        self.ca: FleetCA | None = None
        self.tokens: TokenStore | None = None
        self.revocation_file: RevocationFile | None = None
        self.enrollment: Enrollment | None = None
        self._enroll_handle: ServerHandle | None = None

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

    @property
    def enroll_address(self) -> str:
        """host:port of the enrollment port; FailedPrecondition if there is none."""
        if self._enroll_handle is None:
            raise FailedPrecondition("the coordinator serves no enrollment port", reason="not_started")
        return self._enroll_handle.address

    def revocations(self) -> RevocationList | None:
        """The CA directory's revocation list as last read (None without ca_dir)."""
        return self.revocation_file.current() if self.revocation_file is not None else None

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
            self.hub = Hub(state / HUB_DB, self.index)
            try:
                self.security = Security.configure(self.config.tls, listen=self.config.listen, who="coordinator")
                self._open_ca()
                handle = create_server(
                    self.config.listen,
                    credentials=self.security.server_credentials() if self.security else None,
                    interceptors=self.security.interceptors() if self.security else (),
                )
            except Exception:
                self._close_stores()
                raise
            servicer = CoordinatorServicer(
                self.membership,
                self.index,
                offload=handle.offload,
                stopping=self._stopping,
                revocations=self.revocations,
                enrollment=self.enrollment,
                renew_address=handle.address,
                hub=self.hub,
            )
            self._servicer = servicer
            pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, handle.server)
            try:
                self._enroll_handle = self._enrollment_server(handle.address)
            except Exception:
                handle.stop(0)
                self._close_stores()
                raise
            handle.start()
            handle.set_serving(SERVICE_NAME, True)
            self._handle = handle
            if self._enroll_handle is not None:
                self._enroll_handle.start()
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
                        "ca_dir": str(self.ca.directory) if self.ca is not None else None,
                        "enroll_address": self._enroll_handle.address if self._enroll_handle is not None else None,
                        "revocations_version": version_of(self.revocations()),
                    }
                },
            )
            return self

    def _open_ca(self) -> None:
        """With ca_dir: the CA, its tokens, its revocation list (enforced here too) and the enrollment core."""
        ca_path = self.config.ca_path
        if ca_path is None:
            return
        self.ca = FleetCA.load(ca_path)
        if self.security is not None and self.security.bundle.current().ca_pem != self.ca.cert_pem:
            raise ConfigError(
                f"ca_dir {ca_path} holds another CA than the one tls.bundle trusts: "
                "the coordinator would issue certificates its own fleet refuses"
            )
        self.tokens = TokenStore(ca_path / TOKENS_DB)
        self.revocation_file = RevocationFile(ca_path / REVOCATIONS_FILE, self.ca.cert)
        self.enrollment = Enrollment(
            self.ca,
            self.tokens,
            revocations=self.revocation_file.current,
            validity=timedelta(seconds=self.config.enroll_validity_s),
        )
        self._enforce_revocations()

    def _enrollment_server(self, renew_address: str) -> ServerHandle | None:
        """The TLS-only port serving Enroll (bound, not started); None without enroll_listen."""
        if not self.config.enroll_listen:
            return None
        assert self.security is not None and self.enrollment is not None  # the config insists on both
        handle = create_server(
            self.config.enroll_listen,
            # server TLS with the coordinator's certificate; callers present none (they enroll to get one)
            credentials=self.security.bundle.server_credentials(require_client_auth=False),
            interceptors=self.security.interceptors(),
        )
        pb_grpc.add_CoordinatorServiceServicer_to_server(
            EnrollmentServicer(self.enrollment, offload=handle.offload, renew_address=renew_address), handle.server
        )
        return handle

    def _enforce_revocations(self) -> None:
        """Install the CA directory's list on this coordinator's own port when it is newer."""
        if self.security is None or self.revocation_file is None:
            return
        revocations = self.revocation_file.current()
        if revocations is not None and revocations.version > self.security.revocations_version:
            self.security.set_revocations(revocations)

    def _tick(self) -> None:
        assert self.membership is not None
        while not self._stopping.wait(EXPIRY_TICK_S):
            try:
                self._enforce_revocations()
            except Exception:  # noqa: BLE001 - the ticker must outlive one bad tick
                log.exception("revocations_failed")
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
            if self._enroll_handle is not None:
                self._enroll_handle.stop(grace)
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
        yield RING_VERSION(ring.version)
        yield RING_MEMBERS(len(ring))
        yield AGGREGATORS_ALIVE(sum(s.alive for s in statuses))
        yield LEASE_CHANGES(by=dict(self.membership.lease_changes))
        yield MODELS_INDEXED(self.index.count())
        if self.revocation_file is not None:
            yield REVOCATIONS_VERSION(self.revocation_file.version)

    def _close_stores(self) -> None:
        if self.membership is not None:
            self.membership.close()
        if self.hub is not None:
            self.hub.close()
        if self.index is not None:
            self.index.close()
        if self.tokens is not None:
            self.tokens.close()
        if self.ca is not None:
            self.ca.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `stop()` has finished; False if `timeout` passed first."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> CoordinatorDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
