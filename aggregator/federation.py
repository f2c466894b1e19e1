"""One federation inside an aggregator process: its rounds, journal, agents, ring view and synthesis.

`AggregatorDaemon` holds one `FederationCore` per federation it serves and routes
every RPC to one of them by the request's federation (`aggregator.routing`).
Nothing here is shared between federations except what the process owns: the
gRPC server, the stores, the signing key and the coordinator link. So a
federation's rounds close on their own ticker, its journal is its own file, its
agents and ring membership are its own, and its agents are served only its own
models.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.evaluation import Evaluate
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
from coordinator.client import CALL_TIMEOUT_S, CoordinatorClient
from coordinator.ring import Member
from intake.agents import AgentInfo, AgentRegistry
from intake.home import BaseModel
from intake.service import AgentServicer
from proto.errors import ConfigError, InvalidInput, NotFound, StrataError
from proto.serving import ServerHandle
from storage.cid import is_cid
from storage.control import scaffold_enabled
from storage.encodings import parse_encoding
from storage.keys import KeyPair
from storage.manifest import Manifest
from storage.models import load_manifest
from storage.store import ContentStore
from trust.revocation import RevocationList
from trust.security import Security, channel_factory

log = logging.getLogger("strata.aggregator")

# how often the ticker checks quorum and deadlines
TICK_S = 0.2
# how often the ticker lists the active agents (for invitations and the quorum)
ACTIVE_LIST_S = 1.0

InitialModelFactory = Callable[[ContentStore, KeyPair], str]
# (manifest bytes, notes) to the coordinator's model index
Announce = Callable[[bytes, Mapping[str, str] | None], None]


def coordinator_client(address: str, security: Security | None, *, timeout_s: float = CALL_TIMEOUT_S) -> CoordinatorClient:
    """A client of the coordinator at `address`, over mutual TLS when this aggregator has it; the caller closes it."""
    return CoordinatorClient(address, timeout_s=timeout_s, channel_factory=channel_factory(security))


class FederationCore:
    """Everything one federation needs inside an aggregator; `config` is that federation's effective config."""

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        aggregator_id: str,
        state_dir: Path,
        store: ContentStore,
        shared_store: ContentStore,
        key: KeyPair,
        security: Security | None,
        initial_model_factory: InitialModelFactory | None = None,
        synthesizer: Synthesizer | None = None,
        evaluate: Evaluate | None = None,
        one_of_several: bool = False,
    ) -> None:
        """`one_of_several`: the process serves other federations too, so an initial model CID must be
        this federation's own. `evaluate`: a model's metrics on the held-out split (config `evaluation`)."""
        self.config = config
        self._evaluate = evaluate
        self._one_of_several = one_of_several
        self.federation = config.federation
        self.id = aggregator_id
        self.state_dir = state_dir
        self.store = store
        self.shared_store = shared_store
        self.key = key
        self.security = security
        self.journal = Journal(state_dir / "journal.sqlite")
        self.agents = AgentRegistry(
            timeout_s=config.round.agent_timeout_s,
            heartbeat_interval_s=config.serving.heartbeat_interval_s,
            heartbeat_budget_per_s=config.serving.heartbeat_budget_per_s,
        )
        self._initial_model_factory = initial_model_factory
        self.published = Published()
        # asks peers for this federation's pointer: a peer serving several answers per federation
        self.peer_access = GrpcPeerAccess(channel_factory(security), federation=self.federation)
        self.ring_view: RingView | None = None
        self.synthesizer: Synthesizer | None = synthesizer
        self.home: AggregatorHome | None = None
        self.agent_service: AgentServicer | None = None
        self.peer_service: PeerServicer | None = None
        self.announce: Announce | None = None
        self.last_models: dict[str, str] = {}
        self._ticker: threading.Thread | None = None
        self.privacy = PrivacyGuard(config.privacy, federation=config.federation) if config.privacy.enabled else None
        self.rounds = RoundManager(
            aggregator_id=aggregator_id,
            federation=config.federation,
            settings=config.round,
            store=store,
            journal=self.journal,
            strategy=make_strategy(
                config.strategy,
                config.strategy_params,
                server_opt=config.server_opt,
                server_opt_params=config.server_opt_params,
            ),
            key=key,
            initial_base=self._initial_base,
            synthesize=self._synthesize,
            on_new_base=self._announce_base,
            on_model=self._on_model,
            selector=Selector(config.selection),
            privacy=self.privacy,
            encoding=parse_encoding(config.encoding),
            synthesis_every_steps=config.synthesis.every_steps,
            synthesis_every_s=config.synthesis.every_s,
            evaluate=evaluate,
            scaffold=scaffold_enabled(config.round_config),
        )

    # ------------------------------------------------------------------ lifecycle

    def start(
        self,
        server: ServerHandle,
        *,
        advertise: str,
        stopping: threading.Event,
        revocations: Callable[[], RevocationList | None],
    ) -> BaseModel:
        """Open the first round and build the services; the daemon registers them behind its routers."""
        self.ring_view = RingView(
            static_ring(Member(id=self.id, address=advertise), self.config.peers), on_change=self.agents_changed
        )
        if self.synthesizer is None and self.config.synthesis.enabled:
            self.synthesizer = SemiGlobalSynthesizer(
                aggregator_id=self.id,
                federation=self.federation,
                settings=self.config.synthesis,
                store=self.store,
                shared_store=self.shared_store,
                key=self.key,
                ring=lambda: self.ring_view.ring,
                peers=self.peer_access,
                # with TLS, a peer's cluster model counts only if a certified ring member signed it
                signers=self.security.signers if self.security else None,
                # buffered peers step at their own cadences: blend what they last made, without waiting
                wait_for_peers=self.config.round.mode == "sync",
                evaluate=self._evaluate,
            )
        base = self.rounds.start()
        self._recover_published()
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
        self.agent_service = AgentServicer(
            home=self.home,
            agents=self.agents,
            stream_idle_s=self.config.serving.stream_idle_s,
            offload=server.offload,
            stopping=stopping,
            # the relays below this home fetch the revocation list it enforces
            revocations=revocations,
        )
        self.peer_service = PeerServicer(
            aggregator_id=self.id,
            federation=self.federation,
            published=self.published,
            store=self.shared_store,
            offload=server.offload,
            # auditors may fetch the device updates this aggregator accepted (logged)
            private_store=self.store,
            device_update=device_update_lookup(self.journal),
        )
        return base

    def start_ticker(self, stopping: threading.Event) -> None:
        # one ticker per federation: a slow close in one never delays another's rounds
        self._ticker = threading.Thread(
            target=self._tick_loop, args=(stopping,), name=f"strata-round-ticker-{self.federation}", daemon=True
        )
        self._ticker.start()

    def join_ticker(self, timeout: float) -> None:
        if self._ticker is not None:
            self._ticker.join(timeout=timeout)

    def close(self) -> None:
        self.peer_access.close()
        self.rounds.close()
        self.journal.close()

    # ------------------------------------------------------------------ what the daemon reads

    def status(self) -> dict[str, object]:
        return {
            "round": self.rounds.current.round,
            "agent_count": len(self.agents.active()),
            "last_cluster_cid": self.last_models.get("cluster", ""),
            "last_semi_global_cid": self.last_models.get("semi-global", ""),
        }

    def agents_changed(self) -> None:
        """The base, the ring or the daemon's state changed: wake the agents' watch streams."""
        if self.agent_service is not None:
            self.agent_service.changed()

    # ------------------------------------------------------------------ internals

    def _initial_base(self) -> str:
        spec = self.config.initial_model
        if "@" in spec:  # a release (NAME@1.2.0, NAME@latest, NAME@^1.0): the coordinator's hub names its CID
            spec = self._released_model(spec)
        if is_cid(spec):
            try:
                manifest = Manifest.from_bytes(self.store.get(spec))  # must exist and be a model
            except (NotFound, InvalidInput) as exc:
                raise ConfigError(
                    f"initial_model {spec} is not a model in the store {self.store}: {exc}", reason="bad_config"
                ) from None
            if self._one_of_several and manifest.federation != self.federation:
                # agents of one federation are never handed another's model, not even as a base
                raise ConfigError(
                    f"initial_model {spec} is a {manifest.federation!r} model, not {self.federation!r}",
                    reason="bad_config",
                )
            return spec
        if spec.startswith("task:") and self._initial_model_factory is not None:
            return self._initial_model_factory(self.store, self.key)
        raise ConfigError(
            f"initial_model must be a model CID in the store, NAME@VERSION or task:NAME, got {spec!r}", reason="bad_config"
        )

    def _released_model(self, ref: str) -> str:
        """The CID a release reference resolves to now (resolved once, at the first start: the journal keeps it)."""
        if not self.config.coordinator:
            raise ConfigError(
                f"initial_model {ref} names a release: set coordinator, whose hub resolves it", reason="bad_config"
            )
        with coordinator_client(self.config.coordinator, self.security) as client:
            cid, _ = client.resolve(ref)
        log.info("initial_model_resolved", extra={"fields": {"release": ref, "model": cid, "federation": self.federation}})
        return cid

    def _synthesize(self, cluster: Manifest, tensors: Mapping[str, np.ndarray]) -> Manifest:
        """The next base: a semi-global model when the ring has peers, else the cluster model."""
        ring = self.ring_view.ring if self.ring_view is not None else None
        if self.synthesizer is None or ring is None or len(ring) < 2:
            return cluster
        return self.synthesizer(cluster, tensors)

    def _on_model(self, manifest: Manifest) -> None:
        self.last_models[manifest.kind] = manifest.cid
        # peers first: the next base is fetched by them; the announcement only tells the index about it
        if manifest.kind in ("cluster", "semi-global"):
            self._publish(manifest)
            if manifest.kind == "cluster":
                self.published.set_latest(pointer_for(manifest, time.time()))
        if self.announce is not None:
            refused = manifest.extra.get("refused_peers") if manifest.kind == "semi-global" else None
            notes = {"refused_peers": json.dumps(refused, sort_keys=True)} if refused else None
            self.announce(manifest.to_bytes(), notes)

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
        log.info("new_base", extra={"fields": {"federation": self.federation, "round": base.round, "model": base.model_cid}})
        self.agents_changed()

    def _tick_loop(self, stopping: threading.Event) -> None:
        # the active agents are listed once a second (and right after a round closes), not every tick:
        # at 10,000 agents a listing is a pass over the registry under the lock every heartbeat needs
        active: list[AgentInfo] = []
        listed_at, listed_round = float("-inf"), -1
        while not stopping.wait(TICK_S):
            try:
                round_ = self.rounds.current.round
                if time.monotonic() - listed_at >= ACTIVE_LIST_S or round_ != listed_round:
                    active, listed_at, listed_round = self.agents.active(), time.monotonic(), round_
                    if self.rounds.invite(active):
                        self.agents_changed()  # the newly invited learn it on their watch stream
                self.rounds.maybe_close(self.rounds.expected_trainers(active))
            except StrataError as exc:
                log.error(
                    "round_close_failed",
                    extra={"fields": {"federation": self.federation, "reason": exc.reason, "error": str(exc)}},
                )
            except Exception:
                log.exception("round_close_crashed", extra={"fields": {"federation": self.federation}})
                time.sleep(1.0)
