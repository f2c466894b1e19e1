"""The aggregator daemon: wires store, journal, rounds, ring and services, and runs the round ticker.

`AggregatorDaemon` is a context manager; `start`/`stop` are idempotent, and stop
drains in-flight calls within a bound.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from prometheus_client.core import Metric

from aggregator.config import AggregatorConfig
from aggregator.coordination import CoordinatorLink
from aggregator.home import AggregatorHome
from aggregator.journal import Journal
from aggregator.peers import (
    GrpcPeerAccess,
    PeerServicer,
    Published,
    device_update_lookup,
    pointer_for,
)
from aggregator.privacy import PrivacyGuard
from aggregator.ringview import RingView, static_ring
from aggregator.rounds import RoundManager, Synthesizer
from aggregator.rules import make_strategy
from aggregator.selection import Selector
from aggregator.synthesis import SemiGlobalSynthesizer
from coordinator.client import AggregatorInfo, CoordinatorClient
from coordinator.ring import Member
from intake.agents import AgentInfo, AgentRegistry
from intake.home import BaseModel
from intake.service import AgentServicer
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import ConfigError, InvalidInput, NotFound, StrataError
from proto.metrics import MetricsEndpoint, MetricSpec, serve_metrics
from proto.serving import ServerHandle, create_server
from storage.cid import is_cid
from storage.control import scaffold_enabled
from storage.encodings import parse_encoding
from storage.keys import KeyPair
from storage.manifest import Manifest
from storage.models import load_manifest
from storage.open import open_store
from storage.store import ContentStore, default_store_path
from trust.distribution import RevocationFollower
from trust.revocation import RevocationList
from trust.security import Security, channel_factory

log = logging.getLogger("strata.aggregator")

# how often the ticker checks quorum and deadlines
TICK_S = 0.2
# how often the ticker lists the active agents (for invitations and the quorum)
ACTIVE_LIST_S = 1.0
# the revocation list this aggregator enforces, as last installed, in its state_dir
REVOCATIONS_FILE = "revocations.json"

InitialModelFactory = Callable[[ContentStore, KeyPair], str]

# what /metrics serves; the README's metrics catalogue is generated from this list
_A = "strata_aggregator_"
UPDATES_ACCEPTED = MetricSpec(_A + "updates_accepted", "counter", "updates accepted and journaled")
UPDATES_REFUSED = MetricSpec(_A + "updates_refused", "counter", "updates refused, by refusal reason", ("reason",))
UPDATE_BYTES_RECEIVED = MetricSpec(_A + "update_bytes_received", "counter", "weight bytes of the accepted updates (ingress)")
ROUNDS_CLOSED = MetricSpec(_A + "rounds_closed", "counter", "rounds closed")
MODEL_BYTES_SERVED = MetricSpec(_A + "model_bytes_served", "counter", "model bytes streamed to agents (egress)")
MODEL_DOWNLOADS = MetricSpec(_A + "model_downloads", "counter", "model downloads served to agents")
ROUND = MetricSpec(_A + "round", "gauge", "the current round")
ROUND_OPENED = MetricSpec(_A + "round_opened_timestamp_seconds", "gauge", "when the current round opened (Unix time)")
ROUND_DEADLINE = MetricSpec(_A + "round_deadline_seconds", "gauge", "the configured round deadline (round.deadline_s)")
PRIVACY_EPSILON = MetricSpec(
    _A + "privacy_epsilon", "gauge", "cumulative ε of the released cluster models (with central DP only)"
)
PRIVACY_BUDGET_SPENT = MetricSpec(_A + "privacy_budget_spent", "gauge", "1 once the ε budget stopped training (with privacy only)")
ROUND_UPDATES = MetricSpec(_A + "round_updates", "gauge", "updates accepted in the current round")
JOINS = MetricSpec(_A + "joins", "counter", "Joins answered with this aggregator as home")
ACTIVE_AGENTS = MetricSpec(_A + "active_agents", "gauge", "agents (and relays) heard from within the timeout")
RING_MEMBERS = MetricSpec(_A + "ring_members", "gauge", "members of the ring this aggregator follows")
RING_VERSION = MetricSpec(_A + "ring_version", "gauge", "version of that ring")
SYNTHESIS_PEERS_USED = MetricSpec(
    _A + "synthesis_peers_used", "counter", "peers' cluster models used in semi-global models (with synthesis)"
)
SYNTHESIS_PEERS_REFUSED = MetricSpec(
    _A + "synthesis_peers_refused", "counter", "peers' cluster models synthesis refused, by reason", ("reason",)
)
BASE_METRIC = MetricSpec(
    _A + "base_metric",
    "gauge",
    "the latest closed round's base model as its agents evaluated it on their own data, sample-weighted "
    "(e.g. accuracy, loss)",
    ("metric",),
)
TRAIN_METRIC = MetricSpec(
    _A + "train_metric", "gauge", "the training metrics the latest closed round's agents reported, sample-weighted", ("metric",)
)
MODEL = MetricSpec(
    _A + "model",
    "info",
    "the latest closed round's cluster and semi-global model CIDs, and the base now training (empty: none yet)",
    ("federation", "round", "cluster_cid", "semi_global_cid", "base_cid"),
)
METRICS = (
    UPDATES_ACCEPTED, UPDATES_REFUSED, UPDATE_BYTES_RECEIVED, ROUNDS_CLOSED, MODEL_BYTES_SERVED, MODEL_DOWNLOADS,
    ROUND, ROUND_OPENED, ROUND_DEADLINE, ROUND_UPDATES, PRIVACY_EPSILON, PRIVACY_BUDGET_SPENT, JOINS, ACTIVE_AGENTS,
    RING_MEMBERS, RING_VERSION, SYNTHESIS_PEERS_USED, SYNTHESIS_PEERS_REFUSED, BASE_METRIC, TRAIN_METRIC, MODEL,
)  # fmt: skip


def default_aggregator_id() -> str:
    return f"agg-{socket.gethostname()}"


class AggregatorDaemon:
    def __init__(
        self,
        config: AggregatorConfig,
        *,
        initial_model_factory: InitialModelFactory | None = None,
        synthesizer: Synthesizer | None = None,
    ) -> None:
        self.config = config
        self.id = config.id or default_aggregator_id()
        self.state_dir = Path(
            os.path.expanduser(config.state_dir or f"~/.strata/aggregator/{self.id}")
        )
        self.store = open_store(config.store or str(default_store_path()))
        self.shared_store = open_store(config.shared_store) if config.shared_store else self.store
        self.security = Security.configure(
            config.tls, listen=config.listen, who=self.id, fair_share=config.serving.fair_share()
        )
        # with TLS, manifests are signed with the key the certificate certifies: one identity, one key
        self.key = self.security.manifest_key if self.security else KeyPair.load_or_create(self.state_dir / "aggregator.key")
        if self.security is not None:
            # the last revocation list enforced is enforced again from the first call after a restart
            self.security.keep_revocations(self.state_dir / REVOCATIONS_FILE)
        self.journal = Journal(self.state_dir / "journal.sqlite")
        self.agents = AgentRegistry(
            timeout_s=config.round.agent_timeout_s,
            heartbeat_interval_s=config.serving.heartbeat_interval_s,
            heartbeat_budget_per_s=config.serving.heartbeat_budget_per_s,
        )
        self._initial_model_factory = initial_model_factory
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self._server: ServerHandle | None = None
        self._agent_service: AgentServicer | None = None
        self.home: AggregatorHome | None = None
        self._started = False
        self._metrics: MetricsEndpoint | None = None
        self.published = Published()
        self.peer_access = GrpcPeerAccess(channel_factory(self.security))
        self.ring_view: RingView | None = None
        self.synthesizer: Synthesizer | None = synthesizer
        self.link: CoordinatorLink | None = None
        self._last_models: dict[str, str] = {}
        self.privacy = PrivacyGuard(config.privacy, federation=config.federation) if config.privacy.enabled else None
        self.rounds = RoundManager(
            aggregator_id=self.id,
            federation=config.federation,
            settings=config.round,
            store=self.store,
            journal=self.journal,
            strategy=make_strategy(
                config.strategy,
                config.strategy_params,
                server_opt=config.server_opt,
                server_opt_params=config.server_opt_params,
            ),
            key=self.key,
            initial_base=self._initial_base,
            synthesize=self._synthesize,
            on_new_base=self._announce_base,
            on_model=self._on_model,
            selector=Selector(config.selection),
            privacy=self.privacy,
            encoding=parse_encoding(config.encoding),
            scaffold=scaffold_enabled(config.round_config),
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> AggregatorDaemon:
        if self._started:
            return self
        self._started = True
        self._server = create_server(
            self.config.listen,
            workers=self.config.serving.workers,
            credentials=self.security.server_credentials() if self.security else None,
            interceptors=self.security.interceptors() if self.security else (),
        )
        advertise = self.config.advertise or f"{self._server.host}:{self._server.port}"
        self.ring_view = RingView(
            static_ring(Member(id=self.id, address=advertise), self.config.peers), on_change=self._agents_changed
        )
        if self.synthesizer is None and self.config.synthesis.enabled:
            self.synthesizer = SemiGlobalSynthesizer(
                aggregator_id=self.id,
                federation=self.config.federation,
                settings=self.config.synthesis,
                store=self.store,
                shared_store=self.shared_store,
                key=self.key,
                ring=lambda: self.ring_view.ring,
                peers=self.peer_access,
                # with TLS, a peer's cluster model counts only if a certified ring member signed it
                signers=self.security.signers if self.security else None,
            )
        base = self.rounds.start()
        self._recover_published()
        if self.config.coordinator:
            client = CoordinatorClient(self.config.coordinator, channel_factory=channel_factory(self.security))
            # each lease names the fleet's revocation list version; a newer one is fetched and enforced at once
            follower = (
                RevocationFollower(self.security, client.revocations, upstream=self.config.coordinator)
                if self.security is not None
                else None
            )
            self.link = CoordinatorLink(
                client,
                info=AggregatorInfo(id=self.id, address=advertise, federations=(self.config.federation,)),
                ring_view=self.ring_view,
                status_fn=self._status,
                agents_fn=self.agents.active,
                state_dir=self.state_dir,
                on_lease=(lambda lease: follower.announced(lease.revocations_version)) if follower else None,
            )
        self.home = AggregatorHome(
            aggregator_id=self.id,
            rounds=self.rounds,
            ring=self.ring_view,
            store=self.store,
            # local DP and the update encoding travel to agents with the rest of the round config
            round_config={
                **self.config.round_config,
                **self.config.privacy.round_config(),
                **({"encoding": self.config.encoding} if self.config.encoding != "float32" else {}),
            },
        )
        self._agent_service = AgentServicer(
            home=self.home,
            agents=self.agents,
            stream_idle_s=self.config.serving.stream_idle_s,
            offload=self._server.offload,
            stopping=self._stopping,
            # the relays below this home fetch the revocation list it enforces
            revocations=self._revocations,
        )
        pb_grpc.add_AgentServiceServicer_to_server(self._agent_service, self._server.server)
        pb_grpc.add_PeerServiceServicer_to_server(
            PeerServicer(
                aggregator_id=self.id,
                federation=self.config.federation,
                published=self.published,
                store=self.shared_store,
                offload=self._server.offload,
                # auditors may fetch the device updates this aggregator accepted (logged)
                private_store=self.store,
                device_update=device_update_lookup(self.journal),
            ),
            self._server.server,
        )
        self._server.start()
        self._ticker = threading.Thread(target=self._tick_loop, name="strata-round-ticker", daemon=True)
        self._ticker.start()
        if self.link is not None:
            self.link.start()
        if self.config.metrics_port > 0:
            self._metrics = serve_metrics(self._collect_metrics, host=self._server.host, port=self.config.metrics_port)
        log.info(
            "aggregator_started",
            extra={
                "fields": {
                    "id": self.id,
                    "address": self.address,
                    "federation": self.config.federation,
                    "round": base.round,
                    "base": base.model_cid,
                    "state_dir": str(self.state_dir),
                }
            },
        )
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._agents_changed()  # watch streams see the stop at once
        if self.link is not None:
            self.link.stop()
        if self._metrics is not None:
            self._metrics.stop()
        if self._server is not None:
            self._server.stop(grace)
        if self._ticker is not None:
            self._ticker.join(timeout=grace + TICK_S * 5)
        self.peer_access.close()
        self.rounds.close()
        self.journal.close()
        log.info("aggregator_stopped", extra={"fields": {"id": self.id}})

    def __enter__(self) -> AggregatorDaemon:
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

    # ------------------------------------------------------------------ internals

    def _revocations(self) -> RevocationList | None:
        return self.security.revocations if self.security is not None else None

    def _initial_base(self) -> str:
        spec = self.config.initial_model
        if is_cid(spec):
            try:
                Manifest.from_bytes(self.store.get(spec))  # must exist and be a model
            except (NotFound, InvalidInput) as exc:
                raise ConfigError(
                    f"initial_model {spec} is not a model in the store {self.store}: {exc}", reason="bad_config"
                ) from None
            return spec
        if spec.startswith("task:") and self._initial_model_factory is not None:
            return self._initial_model_factory(self.store, self.key)
        raise ConfigError(
            f"initial_model must be a model CID in the store or task:NAME, got {spec!r}", reason="bad_config"
        )

    def _synthesize(self, cluster: Manifest, tensors: Mapping[str, np.ndarray]) -> Manifest:
        """The next base: a semi-global model when the ring has peers, else the cluster model."""
        ring = self.ring_view.ring if self.ring_view is not None else None
        if self.synthesizer is None or ring is None or len(ring) < 2:
            return cluster
        return self.synthesizer(cluster, tensors)

    def _collect_metrics(self) -> Iterator[Metric]:
        yield UPDATES_ACCEPTED(self.journal.accepted_count())
        yield UPDATES_REFUSED(by=self.journal.refusal_counts())
        yield UPDATE_BYTES_RECEIVED(self.journal.accepted_bytes())
        yield ROUNDS_CLOSED(self.journal.closed_round_count())
        if self.home is not None:
            yield MODEL_BYTES_SERVED(self.home.bytes_served)
            yield MODEL_DOWNLOADS(self.home.downloads_served)
        base = self.rounds.current
        yield ROUND(base.round)
        yield ROUND_OPENED(self.rounds.opened_at)
        yield ROUND_DEADLINE(self.config.round.deadline_s)
        if self.privacy is not None:
            if self.config.privacy.central.enabled:
                # +Inf when there is no noise: clipping alone promises nothing
                yield PRIVACY_EPSILON(self.privacy.central_epsilon)
            yield PRIVACY_BUDGET_SPENT(float(self.privacy.exhausted))
        yield ROUND_UPDATES(self.rounds.accepted_count)
        yield JOINS(self.agents.joins)
        yield ACTIVE_AGENTS(len(self.agents.active()))
        ring = self.ring_view.ring if self.ring_view is not None else None
        yield RING_MEMBERS(len(ring) if ring else 0)
        yield RING_VERSION(ring.version if ring else 0)
        if self.synthesizer is not None:
            yield SYNTHESIS_PEERS_USED(self.synthesizer.peers_used)
            yield SYNTHESIS_PEERS_REFUSED(by=dict(self.synthesizer.peers_refused))
        latest = self.journal.latest_closed_round()
        yield BASE_METRIC(by=latest.base_metrics if latest else {})
        yield TRAIN_METRIC(by=latest.metrics if latest else {})
        cluster = (latest.cluster_cid or "") if latest else ""
        # the next base is the semi-global model when synthesis ran, else the cluster model itself
        semi_global = latest.next_base_cid if latest and latest.next_base_cid not in (None, cluster) else ""
        yield MODEL.info(
            {
                "federation": self.config.federation,
                "round": str(latest.round) if latest else "",
                "cluster_cid": cluster,
                "semi_global_cid": semi_global or "",
                "base_cid": base.model_cid,
            }
        )

    def _status(self) -> dict[str, object]:
        return {
            "round": self.rounds.current.round,
            "agent_count": len(self.agents.active()),
            "last_cluster_cid": self._last_models.get("cluster", ""),
            "last_semi_global_cid": self._last_models.get("semi-global", ""),
        }

    def _on_model(self, manifest: Manifest) -> None:
        self._last_models[manifest.kind] = manifest.cid
        if self.link is not None:
            refused = manifest.extra.get("refused_peers") if manifest.kind == "semi-global" else None
            notes = {"refused_peers": json.dumps(refused, sort_keys=True)} if refused else None
            self.link.announce(manifest.to_bytes(), notes)
        if manifest.kind in ("cluster", "semi-global"):
            self._publish(manifest)
            if manifest.kind == "cluster":
                self.published.set_latest(pointer_for(manifest, time.time()))

    def _publish(self, manifest: Manifest) -> None:
        """Make a model fetchable by peers: in the shared store, pinned, and served by FetchBlob."""
        if self.shared_store is not self.store:
            self.shared_store.put(self.store.iter_chunks(manifest.weights))
            self.shared_store.put(manifest.to_bytes())
        self.shared_store.pin(manifest.weights)
        self.shared_store.pin(manifest.cid)
        self.published.add(manifest)

    def _recover_published(self) -> None:
        """Rebuild the published set and the latest cluster pointer from the journal after a restart."""
        for record in self.rounds.closed_rounds():
            for cid in (record.cluster_cid, record.next_base_cid):
                if cid and self.store.has(cid):
                    manifest = load_manifest(self.store, cid)
                    self.published.add(manifest)
                    if manifest.kind == "cluster":
                        self.published.set_latest(pointer_for(manifest, record.closed_at or time.time()))

    def _announce_base(self, base: BaseModel) -> None:
        log.info("new_base", extra={"fields": {"round": base.round, "model": base.model_cid}})
        self._agents_changed()

    def _agents_changed(self) -> None:
        """The base, the ring or the daemon's state changed: wake the agents' watch streams."""
        if self._agent_service is not None:
            self._agent_service.changed()

    def _tick_loop(self) -> None:
        # the active agents are listed once a second (and right after a round closes), not every tick:
        # at 10,000 agents a listing is a pass over the registry under the lock every heartbeat needs
        active: list[AgentInfo] = []
        listed_at, listed_round = float("-inf"), -1
        while not self._stopping.wait(TICK_S):
            try:
                round_ = self.rounds.current.round
                if time.monotonic() - listed_at >= ACTIVE_LIST_S or round_ != listed_round:
                    active, listed_at, listed_round = self.agents.active(), time.monotonic(), round_
                    if self.rounds.invite(active):
                        self._agents_changed()  # the newly invited learn it on their watch stream
                self.rounds.maybe_close(self.rounds.expected_trainers(active))
            except StrataError as exc:
                log.error("round_close_failed", extra={"fields": {"reason": exc.reason, "error": str(exc)}})
            except Exception:
                log.exception("round_close_crashed")
                time.sleep(1.0)
