"""The aggregator daemon: wires store, key, server and coordinator link around one core per federation.

Each federation it serves is a `FederationCore` (rounds, journal, agents, ring view,
synthesis, its own round ticker); one gRPC server routes every call to one of them
by the federation the request names (`aggregator.routing`). A single-federation
config (no `federations` key) is the one-core case, with its journal where it always was.
With a coordinator, each federation's config first takes the round-policy and strategy
defaults the coordinator's hub registered for it (`AggregatorDaemon._with_hub_defaults`).

`AggregatorDaemon` is a context manager; `start`/`stop` are idempotent, and stop
drains in-flight calls within a bound. The attributes `rounds`, `journal`, `agents`,
`home`, `published`, `synthesizer`, `ring_view` and `privacy` are the default
federation's (the top-level `federation`, else the first configured).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import Metric

from aggregator.config import AggregatorConfig, with_federation_defaults
from aggregator.coordination import CoordinatorLink
from aggregator.evaluation import Evaluate
from aggregator.federation import (
    ACTIVE_LIST_S,
    TICK_S,
    FederationCore,
    InitialModelFactory,
    coordinator_client,
)
from aggregator.home import AggregatorHome
from aggregator.journal import Journal
from aggregator.peers import GrpcPeerAccess, Published
from aggregator.privacy import PrivacyGuard
from aggregator.ringview import RingView
from aggregator.rounds import RoundManager, Synthesizer
from aggregator.routing import AgentServiceRouter, FederationTable, PeerServiceRouter
from coordinator.client import AggregatorInfo
from intake.agents import AgentInfo, AgentRegistry
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import NotFound, StrataError, Unavailable
from proto.metrics import MetricsEndpoint, MetricSpec, serve_metrics
from proto.serving import ServerHandle, create_server
from storage.keys import KeyPair
from storage.open import open_store
from storage.store import default_store_path
from trust.distribution import RevocationFollower
from trust.revocation import RevocationList
from trust.security import Security

log = logging.getLogger("strata.aggregator")

# the revocation list this aggregator enforces, as last installed, in its state_dir
REVOCATIONS_FILE = "revocations.json"

# builds a federation's initial model factory from its effective config (strata.wiring.initial_model_factory)
FederationModelFactory = Callable[[AggregatorConfig], InitialModelFactory | None]
# a federation's held-out evaluator, built from its config's `evaluation` key (strata.wiring)
FederationEvaluator = Callable[[AggregatorConfig], Evaluate | None]
# a multi-federation aggregator keeps each federation's journal under state_dir/federations/NAME
FEDERATIONS_DIR = "federations"
__all__ = [
    "ACTIVE_LIST_S",
    "TICK_S",
    "AggregatorDaemon",
    "FederationEvaluator",
    "FederationModelFactory",
    "InitialModelFactory",
]

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
# every federation this aggregator serves (the families above are the default federation's)
FEDERATION_ROUND = MetricSpec(_A + "federation_round", "gauge", "the current round of each federation served", ("federation",))
FEDERATION_ROUNDS_CLOSED = MetricSpec(
    _A + "federation_rounds_closed", "counter", "rounds closed, by federation served", ("federation",)
)
FEDERATION_UPDATES_ACCEPTED = MetricSpec(
    _A + "federation_updates_accepted", "counter", "updates accepted and journaled, by federation served", ("federation",)
)
METRICS = (
    UPDATES_ACCEPTED, UPDATES_REFUSED, UPDATE_BYTES_RECEIVED, ROUNDS_CLOSED, MODEL_BYTES_SERVED, MODEL_DOWNLOADS,
    ROUND, ROUND_OPENED, ROUND_DEADLINE, ROUND_UPDATES, PRIVACY_EPSILON, PRIVACY_BUDGET_SPENT, JOINS, ACTIVE_AGENTS,
    RING_MEMBERS, RING_VERSION, SYNTHESIS_PEERS_USED, SYNTHESIS_PEERS_REFUSED, BASE_METRIC, TRAIN_METRIC, MODEL,
    FEDERATION_ROUND, FEDERATION_ROUNDS_CLOSED, FEDERATION_UPDATES_ACCEPTED,
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
        federation_model_factory: FederationModelFactory | None = None,
        federation_evaluator: FederationEvaluator | None = None,
    ) -> None:
        """`initial_model_factory` makes every federation's task:NAME initial model; with several
        federations give `federation_model_factory` instead, which builds one per federation's config.
        `synthesizer` replaces the default federation's semi-global synthesis (tests)."""
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
        per_federation = self._with_hub_defaults(config.per_federation())
        self.default_federation = config.federation if config.federation in per_federation else next(iter(per_federation))
        self.federations: dict[str, FederationCore] = {}
        for name, federation_config in per_federation.items():
            factory = federation_model_factory(federation_config) if federation_model_factory else initial_model_factory
            self.federations[name] = FederationCore(
                federation_config,
                aggregator_id=self.id,
                # one federation keeps its journal where a single-federation aggregator always had it
                state_dir=self.state_dir / FEDERATIONS_DIR / name if config.multi_federation else self.state_dir,
                store=self.store,
                shared_store=self.shared_store,
                key=self.key,
                security=self.security,
                initial_model_factory=factory,
                synthesizer=synthesizer if name == self.default_federation else None,
                evaluate=federation_evaluator(federation_config) if federation_evaluator else None,
                one_of_several=config.multi_federation,
            )
        self._default = self.federations[self.default_federation]
        self._table = FederationTable(self.federations, default=config.federation, aggregator_id=self.id)
        self._stopping = threading.Event()
        self._server: ServerHandle | None = None
        self._started = False
        self._metrics: MetricsEndpoint | None = None
        self.link: CoordinatorLink | None = None

    # the default federation's parts, under the names a single-federation aggregator always had
    @property
    def journal(self) -> Journal:
        return self._default.journal

    @property
    def agents(self) -> AgentRegistry:
        return self._default.agents

    @property
    def rounds(self) -> RoundManager:
        return self._default.rounds

    @property
    def privacy(self) -> PrivacyGuard | None:
        return self._default.privacy

    @property
    def published(self) -> Published:
        return self._default.published

    @property
    def synthesizer(self) -> Synthesizer | None:
        return self._default.synthesizer

    @property
    def ring_view(self) -> RingView | None:
        return self._default.ring_view

    @property
    def home(self) -> AggregatorHome | None:
        return self._default.home

    @property
    def peer_access(self) -> GrpcPeerAccess:
        return self._default.peer_access

    def federation(self, name: str) -> FederationCore:
        """The core serving federation `name`; InvalidInput `unknown_federation` otherwise."""
        return self.federations[self._table.get(name).federation]

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
        bases = {
            name: core.start(self._server, advertise=advertise, stopping=self._stopping, revocations=self._revocations)
            for name, core in self.federations.items()
        }
        if self.config.coordinator:
            client = coordinator_client(self.config.coordinator, self.security)
            # each lease names the fleet's revocation list version; a newer one is fetched and enforced at once
            follower = (
                RevocationFollower(self.security, client.revocations, upstream=self.config.coordinator)
                if self.security is not None
                else None
            )
            # one registration naming every federation: the coordinator places this aggregator on each
            # federation's ring, and each federation's view follows its own ring
            self.link = CoordinatorLink(
                client,
                info=AggregatorInfo(id=self.id, address=advertise, federations=tuple(self.federations)),
                ring_view=self._default.ring_view,
                ring_views={name: core.ring_view for name, core in self.federations.items()},
                status_fn=self._status,
                agents_fn=self._active_agents,
                state_dir=self.state_dir,
                on_lease=(lambda lease: follower.announced(lease.revocations_version)) if follower else None,
            )
            for core in self.federations.values():
                core.announce = self.link.announce
        if len(self.federations) == 1:
            # one federation: its services answer directly, exactly as before routing existed
            pb_grpc.add_AgentServiceServicer_to_server(self._default.agent_service, self._server.server)
            pb_grpc.add_PeerServiceServicer_to_server(self._default.peer_service, self._server.server)
        else:
            router = AgentServiceRouter(self._table, stream_idle_s=self.config.serving.stream_idle_s)
            pb_grpc.add_AgentServiceServicer_to_server(router, self._server.server)
            pb_grpc.add_PeerServiceServicer_to_server(PeerServiceRouter(self._table), self._server.server)
        self._server.start()
        for core in self.federations.values():
            core.start_ticker(self._stopping)
        if self.link is not None:
            self.link.start()
        if self.config.metrics_port > 0:
            self._metrics = serve_metrics(self._collect_metrics, host=self._server.host, port=self.config.metrics_port)
        for name, base in bases.items():
            log.info(
                "aggregator_started",
                extra={
                    "fields": {
                        "id": self.id,
                        "address": self.address,
                        "federation": name,
                        "round": base.round,
                        "base": base.model_cid,
                        "state_dir": str(self.federations[name].state_dir),
                    }
                },
            )
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._agents_changed()  # watch streams see the stop at once
        if self._metrics is not None:
            self._metrics.stop()
        if self._server is not None:
            self._server.stop(grace)
        for core in self.federations.values():
            core.join_ticker(timeout=grace + TICK_S * 5)
        # the link goes last: a round that closes while the server drains still announces its models
        # (a closed announcer outbox made the close skip publishing the model to the shared store)
        if self.link is not None:
            self.link.stop()
        for core in self.federations.values():
            core.close()
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

    def _with_hub_defaults(self, per_federation: dict[str, AggregatorConfig]) -> dict[str, AggregatorConfig]:
        """Each federation's config with the round-policy and strategy defaults the coordinator's hub
        registered for it (`with_federation_defaults`: the keys its config leaves at their built-in default).

        A federation the hub does not know gets none. A coordinator that cannot be asked costs one warning
        per federation and the local config: aggregators run while the coordinator is down. A registered
        default this aggregator cannot honour is a ConfigError: it does not start."""
        if not self.config.coordinator:
            return per_federation
        out: dict[str, AggregatorConfig] = {}
        unreachable: StrataError | None = None
        with coordinator_client(self.config.coordinator, self.security) as client:
            for name, federation_config in per_federation.items():
                out[name] = federation_config
                try:
                    if unreachable is not None:
                        raise unreachable  # one coordinator: not asked again once it could not be reached
                    registered = client.federation(name)
                except NotFound:
                    continue
                except StrataError as exc:
                    # Unavailable (down, or the deadline passed), or a coordinator that refuses the read
                    unreachable = exc if isinstance(exc, Unavailable) else None
                    log.warning(
                        "hub_defaults_unavailable",
                        extra={"fields": {"federation": name, "coordinator": self.config.coordinator, "error": str(exc)}},
                    )
                    continue
                out[name], applied = with_federation_defaults(
                    federation_config, registered.round_policy, registered.strategy
                )
                if applied:
                    log.info("hub_defaults_applied", extra={"fields": {"federation": name, "applied": applied}})
        return out

    def _revocations(self) -> RevocationList | None:
        return self.security.revocations if self.security is not None else None

    def _active_agents(self) -> list[AgentInfo]:
        # the coordinator's agent listing: every federation's agents (an agent joins one federation)
        return [agent for core in self.federations.values() for agent in core.agents.active()]

    def _collect_metrics(self) -> Iterator[Metric]:
        # the default federation's figures, then a few of every federation's, labelled
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
        yield ROUND_DEADLINE(self._default.config.round.deadline_s)
        if self.privacy is not None:
            if self._default.config.privacy.central.enabled:
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
                "federation": self.default_federation,
                "round": str(latest.round) if latest else "",
                "cluster_cid": cluster,
                "semi_global_cid": semi_global or "",
                "base_cid": base.model_cid,
            }
        )
        cores = self.federations.values()
        yield FEDERATION_ROUND(by={core.federation: core.rounds.current.round for core in cores})
        yield FEDERATION_ROUNDS_CLOSED(by={core.federation: core.journal.closed_round_count() for core in cores})
        yield FEDERATION_UPDATES_ACCEPTED(by={core.federation: core.journal.accepted_count() for core in cores})

    def _status(self) -> dict[str, object]:
        # the heartbeat's own fields are the default federation's round and models and every agent;
        # serving several federations, it lists each one's progress too
        status = self._default.status()
        status["agent_count"] = len(self._active_agents())
        if len(self.federations) > 1:
            status["federations"] = [{"federation": name, **core.status()} for name, core in self.federations.items()]
        return status

    def _agents_changed(self) -> None:
        """The daemon's state changed: wake every federation's watch streams."""
        for core in self.federations.values():
            core.agents_changed()
