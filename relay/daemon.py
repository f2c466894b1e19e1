"""The relay daemon: wires store, journal, cache, core, upstream client and service, and runs three loops.

- the upstream link joins the home aggregator (through the seeds, following
  redirects; the Client re-homes on ring changes) and adopts each new upstream base;
- the window ticker closes windows;
- the forwarder sends combined updates upstream, holding them while it is down.

`RelayDaemon` is a context manager; `start`/`stop` are idempotent. It starts (and
serves devices the last base it knew) even while upstream is unreachable.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
from prometheus_client.core import Metric

from agent.client import Client
from intake.agents import AgentRegistry
from intake.service import AgentServicer
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import FailedPrecondition, StrataError, Unavailable
from proto.metrics import MetricsEndpoint, MetricSpec, serve_metrics
from proto.retry import RetryPolicy
from proto.serving import ServerHandle, create_server
from relay.cache import ModelCache
from relay.config import RelayConfig
from relay.core import Relay
from relay.forward import Forwarder
from relay.home import RelayHome
from relay.journal import RelayJournal
from storage.control import SCAFFOLD
from storage.encodings import federation_encoding
from storage.keys import KeyPair
from storage.manifest import Manifest
from storage.open import open_store
from trust.distribution import RevocationFollower
from trust.revocation import RevocationList
from trust.security import Security
from trust.security import channel_factory as security_channels

log = logging.getLogger("strata.relay")

# how often the ticker checks the window and the upstream base
TICK_S = 0.2
# the revocation list this relay enforces, as last installed, in its state_dir
REVOCATIONS_FILE = "revocations.json"

# what /metrics serves; the README's metrics catalogue is generated from this list
_R = "strata_relay_"
BYTES_SERVED = MetricSpec(_R + "bytes_served", "counter", "model bytes devices downloaded from the relay (egress)")
BYTES_FETCHED_UPSTREAM = MetricSpec(_R + "bytes_fetched_upstream", "counter", "model bytes the relay fetched upstream (ingress)")
BYTES_SAVED = MetricSpec(_R + "bytes_saved", "gauge", "upstream bytes the cache saved")
DOWNLOADS_SERVED = MetricSpec(_R + "downloads_served", "counter", "model downloads served to devices")
CACHE_HITS = MetricSpec(
    _R + "cache_hits",
    "counter",
    "model loads the cache answered from its store, without going upstream (repeat downloads of a loaded model "
    "are served from memory and count in downloads_served only)",
)
CACHE_FETCHES = MetricSpec(_R + "cache_fetches", "counter", "models fetched upstream (cache misses, and each new base)")
CACHE_MODELS = MetricSpec(_R + "cache_models", "gauge", "models in the cache")
CACHE_BYTES = MetricSpec(_R + "cache_bytes", "gauge", "bytes the cache holds")
WINDOWS = MetricSpec(_R + "windows", "gauge", "combined updates by status (pending, forwarded, dropped)", ("status",))
FORWARD_QUEUE = MetricSpec(_R + "forward_queue", "gauge", "combined updates waiting to be forwarded upstream")
HELD_UPDATES = MetricSpec(_R + "held_updates", "gauge", "device updates held in the open window")
UPSTREAM_CONNECTED = MetricSpec(_R + "upstream_connected", "gauge", "1 once the relay has joined its upstream aggregator")
ACTIVE_DEVICES = MetricSpec(_R + "active_devices", "gauge", "devices heard from within the timeout")
METRICS = (
    BYTES_SERVED, BYTES_FETCHED_UPSTREAM, BYTES_SAVED, DOWNLOADS_SERVED, CACHE_HITS, CACHE_FETCHES, CACHE_MODELS, CACHE_BYTES, WINDOWS,
    FORWARD_QUEUE, HELD_UPDATES, UPSTREAM_CONNECTED, ACTIVE_DEVICES,
)  # fmt: skip


def default_relay_id() -> str:
    return f"relay-{socket.gethostname()}"


class _ClientUpstream:
    """The forwarder's view of the upstream Client."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upstream_round(self) -> int | None:
        try:
            return self._client.current().round
        except FailedPrecondition:
            return None

    def submit_signed(
        self, manifest: Manifest, blob: bytes, *, tensors: Sequence[str] = (), base_metrics: Mapping[str, float] | None = None
    ) -> object:
        return self._client.submit_signed(manifest, blob, tensors=tensors, base_metrics=base_metrics)


class RelayDaemon:
    def __init__(self, config: RelayConfig, *, channel_factory: Callable[[str], grpc.Channel] | None = None) -> None:
        self.config = config
        self.id = config.id or default_relay_id()
        self.state_dir = Path(os.path.expanduser(config.state_dir or f"~/.strata/relay/{self.id}"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(config.store or str(self.state_dir / "store"))
        self.security = Security.configure(
            config.tls, listen=config.listen, who=self.id, fair_share=config.serving.fair_share()
        )
        # with TLS, the relay signs its combined updates with the key its certificate certifies
        self.key = self.security.manifest_key if self.security else KeyPair.load_or_create(self.state_dir / "relay.key")
        if self.security is not None:
            # the last revocation list enforced is enforced again from the first call after a restart
            self.security.keep_revocations(self.state_dir / REVOCATIONS_FILE)
        self.journal = RelayJournal(self.state_dir / "journal.sqlite")
        self.agents = AgentRegistry(
            timeout_s=config.agent_timeout_s,
            heartbeat_interval_s=config.serving.heartbeat_interval_s,
            heartbeat_budget_per_s=config.serving.heartbeat_budget_per_s,
        )
        upstream = config.upstream
        self.client = Client(
            config.seeds,
            federation=config.federation,
            agent_id=self.id,
            display_name=self.id,
            capability="train",
            rpc_timeout_s=upstream.rpc_timeout_s,
            join_timeout_s=upstream.join_timeout_s,
            backoff_base_s=upstream.backoff_base_s,
            backoff_max_s=upstream.backoff_max_s,
            key=self.key,
            channel_factory=channel_factory or security_channels(self.security),
        )
        # the home's heartbeat names the revocation list it enforces; a newer one is fetched and enforced here
        self._revocation_follower = (
            RevocationFollower(self.security, self.client.revocations, upstream="home")
            if self.security is not None
            else None
        )
        self.cache = ModelCache(self.store, self._fetch_upstream, max_bytes=config.cache.max_bytes)
        self.relay = Relay(
            relay_id=self.id,
            config=config,
            store=self.store,
            journal=self.journal,
            cache=self.cache,
            key=self.key,
            encoding=lambda: federation_encoding(self.client.round_config),
        )
        self.forwarder = Forwarder(
            journal=self.journal,
            store=self.store,
            upstream=_ClientUpstream(self.client),
            max_staleness=config.forward.max_staleness,
            retry_s=config.forward.retry_s,
        )
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: ServerHandle | None = None
        self._device_service: AgentServicer | None = None
        self._metrics: MetricsEndpoint | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> RelayDaemon:
        if self._started:
            return self
        self._started = True
        self._server = create_server(
            self.config.listen,
            workers=self.config.serving.workers,
            credentials=self.security.server_credentials() if self.security else None,
            interceptors=self.security.interceptors() if self.security else (),
        )
        base = self.relay.start()
        self._device_service = AgentServicer(
            # SCAFFOLD's variates do not pass a relay yet (its combined update carries no delta_c): its
            # devices train plain FedAvg updates rather than send a delta_c it would refuse
            home=RelayHome(
                relay=self.relay,
                round_config=lambda: {k: v for k, v in self.client.round_config.items() if k != SCAFFOLD},
            ),
            agents=self.agents,
            stream_idle_s=self.config.serving.stream_idle_s,
            offload=self._server.offload,
            stopping=self._stopping,
            # devices (and relays below this one) fetch the revocation list it enforces
            revocations=self._revocations,
        )
        pb_grpc.add_AgentServiceServicer_to_server(self._device_service, self._server.server)
        self._server.start()
        for target, name in (
            (self._upstream_loop, "upstream"),
            (self._tick_loop, "window"),
            (lambda: self.forwarder.run(self._stopping), "forward"),
        ):
            thread = threading.Thread(target=target, name=f"strata-relay-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.config.metrics_port > 0:
            self._metrics = serve_metrics(self._collect_metrics, host=self._server.host, port=self.config.metrics_port)
        log.info(
            "relay_started",
            extra={
                "fields": {
                    "id": self.id,
                    "address": self.address,
                    "federation": self.config.federation,
                    "seeds": list(self.config.seeds),
                    "round": base.round if base else None,
                    "base": base.model_cid if base else None,
                    "state_dir": str(self.state_dir),
                }
            },
        )
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self._stopping.is_set() or not self._started:
            return
        self._stopping.set()
        self._devices_changed()  # watch streams see the stop at once
        self.forwarder.wake()
        self.client.close()
        if self._server is not None:
            self._server.stop(grace)
        if self._metrics is not None:
            self._metrics.stop()
        for thread in self._threads:
            thread.join(timeout=grace + 5 * TICK_S)
        self._write_status()
        self.journal.close()
        log.info("relay_stopped", extra={"fields": {"id": self.id, **self.cache.stats().to_json()}})

    def __enter__(self) -> RelayDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() (e.g. from a signal handler); True if stopped."""
        return self._stopping.wait(timeout)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.port

    @property
    def address(self) -> str:
        assert self._server is not None, "not started"
        return f"{self._server.host}:{self._server.port}"

    def _collect_metrics(self) -> Iterator[Metric]:
        cache = self.cache.stats()
        status = self.relay.status()
        windows = status["windows"]
        assert isinstance(windows, dict)
        yield BYTES_SERVED(cache.bytes_served)
        yield BYTES_FETCHED_UPSTREAM(cache.bytes_fetched_upstream)
        yield BYTES_SAVED(cache.bytes_saved)
        yield DOWNLOADS_SERVED(cache.downloads_served)
        yield CACHE_HITS(cache.hits)
        yield CACHE_FETCHES(cache.upstream_fetches)
        yield CACHE_MODELS(cache.models)
        yield CACHE_BYTES(cache.cached_bytes)
        yield WINDOWS(by=dict(windows))
        yield FORWARD_QUEUE(windows.get("pending", 0))
        yield HELD_UPDATES(float(status["held_updates"]))  # type: ignore[arg-type]
        yield UPSTREAM_CONNECTED(float(self._joined.is_set()))
        yield ACTIVE_DEVICES(len(self.agents.active()))

    def status(self) -> dict[str, object]:
        return {
            **self.relay.status(),
            "address": self.address if self._server else None,
            "upstream": {"home": self.client.home_id, "address": self.client.home_address},
        }

    # ------------------------------------------------------------------ loops

    def _fetch_upstream(self, model_cid: str) -> tuple[Manifest, bytes]:
        if not self._joined.is_set():
            raise Unavailable("the relay has not joined upstream yet", reason="no_upstream")
        return self.client.fetch_model_bytes(model_cid)

    def _upstream_loop(self) -> None:
        retry_s = self.config.forward.retry_s
        backoff = RetryPolicy(base_s=retry_s, max_s=8 * retry_s).backoff(stop=self._stopping)
        while not self._stopping.is_set():
            if not self._joined.is_set():
                try:
                    self.client.connect()
                    self._joined.set()
                    log.info(
                        "upstream_joined",
                        extra={"fields": {"home": self.client.home_id, "address": self.client.home_address}},
                    )
                except StrataError as exc:
                    if self._stopping.is_set() or exc.reason == "closed":
                        return
                    log.warning("upstream_join_failed", extra={"fields": {"error": str(exc)}})
                    backoff.wait()
                    continue
            try:
                info = self.client.current()
                if not self.relay.has_base or info.model_cid != self.relay.current.model_cid:
                    self.relay.adopt_base(info.model_cid, info.round)
                    self._devices_changed()
                    self.forwarder.wake()
            except StrataError as exc:
                if self._stopping.is_set():  # stop() closed the client under the fetch
                    return
                log.warning("base_adoption_failed", extra={"fields": {"reason": exc.reason, "error": str(exc)}})
                backoff.wait()
                continue
            backoff.reset()
            if self._revocation_follower is not None:
                self._revocation_follower.announced(self.client.revocations_version)
            self._stopping.wait(TICK_S)

    def _revocations(self) -> RevocationList | None:
        return self.security.revocations if self.security is not None else None

    def _devices_changed(self) -> None:
        """A new base, or the relay stopping: wake the devices' watch streams."""
        if self._device_service is not None:
            self._device_service.changed()

    def _tick_loop(self) -> None:
        while not self._stopping.wait(TICK_S):
            try:
                if self.relay.maybe_close(self.agents.active_trainers()) is not None:
                    self._write_status()
                    self.forwarder.wake()
            except StrataError as exc:
                log.error("window_close_failed", extra={"fields": {"reason": exc.reason, "error": str(exc)}})
            except Exception:
                log.exception("window_close_crashed")
                self._stopping.wait(1.0)

    def _write_status(self) -> None:
        """status.json beside the journal, for operators and `strata` commands: counters included."""
        try:
            path = self.state_dir / "status.json"
            temp = path.with_suffix(".tmp")
            temp.write_text(json.dumps(self.status(), indent=2, sort_keys=True, default=str))
            os.replace(temp, path)
        except (OSError, StrataError):
            log.exception("status_write_failed")
