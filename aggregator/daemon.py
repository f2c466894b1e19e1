"""The aggregator daemon: wires store, journal, rounds, ring and services, and runs the round ticker.

`AggregatorDaemon` is a context manager; `start`/`stop` are idempotent, and stop
drains in-flight calls within a bound.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aggregator.agents import AgentRegistry
from aggregator.config import AggregatorConfig
from aggregator.journal import Journal
from aggregator.membership import RingView, static_ring
from aggregator.rounds import BaseModel, RoundManager, Synthesizer
from aggregator.service import AgentServicer
from aggregator.strategies import make_strategy
from coordinator.ring import Member
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import ConfigError, StrataError
from proto.wire import ServerHandle, create_server
from storage.cid import is_cid
from storage.keys import KeyPair
from storage.manifest import Manifest
from storage.store import ContentStore, default_store_path, open_store

log = logging.getLogger("strata.aggregator")

# how often the ticker checks quorum and deadlines
TICK_S = 0.2

InitialModelFactory = Callable[[ContentStore, KeyPair], str]


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
        self.store = open_store(config.store or f"local:{default_store_path()}")
        self.key = KeyPair.load_or_create(self.state_dir / "aggregator.key")
        self.journal = Journal(self.state_dir / "journal.sqlite")
        self.agents = AgentRegistry(timeout_s=config.round.agent_timeout_s)
        self._initial_model_factory = initial_model_factory
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self._server: ServerHandle | None = None
        self._started = False
        self.rounds = RoundManager(
            aggregator_id=self.id,
            federation=config.federation,
            settings=config.round,
            store=self.store,
            journal=self.journal,
            strategy=make_strategy(config.strategy),
            key=self.key,
            initial_base=self._initial_base,
            synthesize=synthesizer,
            on_new_base=self._announce_base,
        )
        self.ring_view: RingView | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> AggregatorDaemon:
        if self._started:
            return self
        self._started = True
        base = self.rounds.start()
        self._server = create_server(self.config.listen)
        advertise = self.config.advertise or f"{self._server.host}:{self._server.port}"
        self.ring_view = RingView(static_ring(Member(id=self.id, address=advertise), self.config.peers))
        pb_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(
                aggregator_id=self.id,
                rounds=self.rounds,
                agents=self.agents,
                ring=self.ring_view,
                store=self.store,
                heartbeat_interval_s=self.config.heartbeat_interval_s,
                round_config=dict(self.config.round_config),
                stopping=self._stopping,
            ),
            self._server.server,
        )
        self._server.start()
        self._ticker = threading.Thread(target=self._tick_loop, name="strata-round-ticker", daemon=True)
        self._ticker.start()
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
        if self._server is not None:
            self._server.stop(grace)
        if self._ticker is not None:
            self._ticker.join(timeout=grace + TICK_S * 5)
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

    def _initial_base(self) -> str:
        spec = self.config.initial_model
        if is_cid(spec):
            Manifest.from_bytes(self.store.get(spec))  # must exist and be a model
            return spec
        if spec.startswith("task:") and self._initial_model_factory is not None:
            return self._initial_model_factory(self.store, self.key)
        raise ConfigError(
            f"initial_model must be a model CID in the store or task:NAME, got {spec!r}", reason="bad_config"
        )

    def _announce_base(self, base: BaseModel) -> None:
        log.info("new_base", extra={"fields": {"round": base.round, "model": base.model_cid}})

    def _tick_loop(self) -> None:
        while not self._stopping.wait(TICK_S):
            try:
                self.rounds.maybe_close(self.agents.active_trainers())
            except StrataError as exc:
                log.error("round_close_failed", extra={"fields": {"reason": exc.reason, "error": str(exc)}})
            except Exception:
                log.exception("round_close_crashed")
                time.sleep(1.0)
