"""The agent daemon: join, download the base, train, upload, wait for the next base; repeat.

It persists its identity and progress under its state directory, so a restarted
agent resends an unacknowledged update (the aggregator answers "duplicate")
instead of training and counting twice, and skips a base it already trained on.

Under TLS with `enroll` configured, the agent first makes sure it holds a valid
certificate (enrolling with its bootstrap token if not: `agent.enrollment`), then
renews it in the background while it trains.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import Metric

from agent.client import Client, SubmitRefused
from agent.config import AgentConfig
from agent.enrollment import Renewer, ensure_bundle, renew_address
from agent.trainer import (
    SCAFFOLD_CORRECTION,
    Trainer,
    has_evaluate,
    load_trainer,
    unsupported_algorithms,
)
from proto.errors import StrataError
from proto.metrics import MetricSpec
from proto.retry import RetryPolicy
from trust.security import Security, channel_factory

log = logging.getLogger("strata.agent")

# how long wait_for_model blocks before re-checking for shutdown
_WAIT_SLICE_S = 1.0

# what an agent process's /metrics serves (one sample per agent it runs); the README's
# metrics catalogue is generated from this list
UPDATES_SUBMITTED = MetricSpec("strata_agent_updates_submitted", "counter", "updates acknowledged by the aggregator", ("agent",))
BYTES_DOWNLOADED = MetricSpec("strata_agent_bytes_downloaded", "counter", "model bytes downloaded", ("agent",))
BASE_ROUND = MetricSpec("strata_agent_base_round", "gauge", "round of the latest base model seen (-1: none yet)", ("agent",))
METRICS = (UPDATES_SUBMITTED, BYTES_DOWNLOADED, BASE_ROUND)


def enroll_if_needed(config: AgentConfig, *, stop: threading.Event | None = None) -> bool:
    """Enroll when `config.enroll` has a token and `tls.bundle` holds no valid bundle yet; True if it enrolled.

    An enrollment port that is not up yet is waited for like an aggregator (join_timeout_s);
    a refusal (a bad token, say) is raised at once."""
    if not (config.tls.bundle and config.enroll.has_token):
        return False
    return ensure_bundle(
        config.enroll,
        config.tls.bundle,
        agent_id=config.id,
        state_dir=config.state_dir,
        timeout_s=config.rpc_timeout_s,
        retry=RetryPolicy(base_s=config.backoff_base_s, max_s=config.backoff_max_s, deadline_s=config.join_timeout_s),
        stop=stop,
    )


class AgentDaemon:
    def __init__(self, config: AgentConfig, trainer: Trainer | None = None, *, stop: threading.Event | None = None) -> None:
        self.config = config
        self.trainer = trainer if trainer is not None else load_trainer(config.task, config.task_options)
        self._stop = stop or threading.Event()
        self.rounds_done = 0
        self.client: Client | None = None
        self.security: Security | None = None
        self.renewer: Renewer | None = None
        self._warned_algorithms: set[str] = set()

    def stop(self) -> None:
        self._stop.set()

    def ensure_identity(self) -> Security | None:
        """The agent's security, enrolling first when `enroll` is configured and there is no valid bundle yet.

        Raises the enrollment's refusal (a bad token, say) as a StrataError; idempotent."""
        config = self.config
        if self.security is None and config.tls.bundle:
            enroll_if_needed(config, stop=self._stop)
            self.security = Security.configure(config.tls, who=config.id or "agent")
        return self.security

    def _start_renewer(self, security: Security, client: Client) -> None:
        if not self.config.enroll.coordinator and not self.config.enroll.renew_address:
            return  # not an enrolled agent: its bundle is renewed by whoever issued it
        address = renew_address(self.config.enroll, self.config.tls.bundle)
        if not address:
            log.warning(
                "no_renew_address",
                extra={"fields": {"agent": client.agent_id, "hint": "set enroll.renew_address to the coordinator's mTLS port"}},
            )
            return
        self.renewer = Renewer(
            security.bundle,
            address=address,
            channel_factory=security.channel,
            on_renewed=client.drop_channels,
            timeout_s=self.config.rpc_timeout_s,
            retry=RetryPolicy(base_s=self.config.backoff_base_s, max_s=max(self.config.backoff_max_s, 30.0)),
        ).start()

    def _trainable(self) -> list[str] | None:
        getter = getattr(self.trainer, "trainable_tensors", None)
        return getter() if callable(getter) else None

    def run(self) -> int:
        """Run until stopped (or max_rounds updates); returns the number of updates submitted."""
        config = self.config
        trainable = self._trainable() if config.capability != "inference" else None
        capability = "partial_train" if trainable and config.capability == "train" else config.capability
        security = self.ensure_identity()
        agent_id = security.identity.id if security else config.id
        state_dir = config.state_dir or os.path.join("~", ".strata", "agent", agent_id or "default")
        self.client = client = Client(
            config.seeds,
            federation=config.federation,
            # with TLS the agent is who its certificate says, and signs with the key it certifies
            agent_id=agent_id,
            display_name=config.name,
            capability=capability,
            trainable_tensors=trainable,
            state_dir=state_dir,
            rpc_timeout_s=config.rpc_timeout_s,
            join_timeout_s=config.join_timeout_s,
            backoff_base_s=config.backoff_base_s,
            backoff_max_s=config.backoff_max_s,
            start_jitter_s=config.start_jitter_s,
            key=security.manifest_key if security else None,
            channel_factory=channel_factory(security),
        )
        # a failed download is tried again under the same policy as every other retry
        download_retry = RetryPolicy(base_s=config.backoff_base_s, max_s=config.backoff_max_s).backoff(stop=self._stop)
        if security is not None:
            self._start_renewer(security, client)
        try:
            client.connect()
            self._resend_pending(client)
            while not self._stop.is_set():
                try:
                    weights = client.wait_for_model(timeout=_WAIT_SLICE_S)
                except StrataError as exc:
                    if exc.reason in ("timeout", "closed"):
                        continue
                    log.warning("download_failed", extra={"fields": {"agent": client.agent_id, "error": str(exc)}})
                    download_retry.wait()
                    continue
                download_retry.reset()
                if self._train_round(client, weights) and config.max_rounds and self.rounds_done >= config.max_rounds:
                    break
        finally:
            client.close()
            if self.renewer is not None:
                self.renewer.stop()
        log.info("agent_stopped", extra={"fields": {"agent": client.agent_id, "updates": self.rounds_done}})
        return self.rounds_done

    def _resend_pending(self, client: Client) -> None:
        try:
            receipt = client.resend_pending()
        except SubmitRefused as refusal:
            log.info("pending_update_refused", extra={"fields": {"agent": client.agent_id, "reason": refusal.reason}})
            return
        if receipt is not None:
            log.info(
                "pending_update_resent",
                extra={"fields": {"agent": client.agent_id, "update": receipt.update_cid, "duplicate": receipt.duplicate}},
            )

    def _warn_unsupported(self, client: Client, round_config: dict[str, Any]) -> None:
        """Once per algorithm: the federation asks for one this trainer does not declare, so its
        updates are plain FedAvg (training goes on: the federation still gets them)."""
        try:
            missing = unsupported_algorithms(self.trainer, round_config) - self._warned_algorithms
        except StrataError as exc:  # a malformed value: the trainer's own parsing reports it
            log.warning("round_config_invalid", extra={"fields": {"agent": client.agent_id, "error": str(exc)}})
            return
        for algorithm in sorted(missing):
            self._warned_algorithms.add(algorithm)
            log.warning("trainer_ignores_algorithm", extra={"fields": {"agent": client.agent_id, "algorithm": algorithm}})

    def _train_round(self, client: Client, weights: dict[str, Any]) -> bool:
        info = client.current()
        base_metrics = self.trainer.evaluate(weights) if has_evaluate(self.trainer) else {}
        if base_metrics:
            log.info(
                "base_evaluated",
                extra={"fields": {"agent": client.agent_id, "round": info.round, **{k: round(v, 4) for k, v in base_metrics.items()}}},
            )
        if self.config.capability == "inference":
            return False
        if client.already_submitted(info.model_cid):
            # trained and acknowledged before a restart: wait for the next base
            return False
        started = time.perf_counter()
        round_config: dict[str, Any] = {**client.round_config, "round": info.round}
        self._warn_unsupported(client, round_config)
        try:
            correction = client.scaffold_correction()
        except StrataError as exc:
            log.warning("scaffold_variate_unavailable", extra={"fields": {"agent": client.agent_id, "error": str(exc)}})
            return False
        if correction is not None:
            round_config[SCAFFOLD_CORRECTION] = correction
        new_weights, num_samples, metrics = self.trainer.train(weights, round_config)
        train_s = time.perf_counter() - started
        if self._stop.is_set():
            return False
        try:
            receipt = client.submit(new_weights, num_samples, metrics, base_metrics=base_metrics)
        except SubmitRefused as refusal:
            log.warning(
                "update_refused",
                extra={"fields": {"agent": client.agent_id, "round": info.round, "reason": refusal.reason, "message": refusal.message}},
            )
            return False
        except StrataError as exc:
            log.warning("submit_failed", extra={"fields": {"agent": client.agent_id, "error": str(exc)}})
            return False
        self.rounds_done += 1
        log.info(
            "round_trained",
            extra={
                "fields": {
                    "agent": client.agent_id,
                    "round": info.round,
                    "num_samples": num_samples,
                    "train_s": round(train_s, 3),
                    "update": receipt.update_cid,
                    **{k: round(float(v), 4) for k, v in metrics.items()},
                }
            },
        )
        return True


class AgentGroup:
    """Several agents in one process (one thread each), stopped together."""

    def __init__(self, configs: Sequence[AgentConfig], stop: threading.Event) -> None:
        self.configs = list(configs)
        self.daemons = [AgentDaemon(config, stop=stop) for config in self.configs]
        self.results = [0] * len(self.daemons)

    def _run_one(self, index: int) -> None:
        try:
            self.results[index] = self.daemons[index].run()
        except StrataError as exc:
            log.error("agent_failed", extra={"fields": {"agent": self.configs[index].id, "error": str(exc)}})
        except Exception:
            log.exception("agent_crashed")

    def run(self) -> list[int]:
        """Run every agent until `stop` is set or each reached its max_rounds; returns updates per agent."""
        threads = [
            threading.Thread(target=self._run_one, args=(i,), name=f"agent-{i}", daemon=True)
            for i in range(len(self.daemons))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
        return self.results

    def collect_metrics(self) -> Iterator[Metric]:
        updates = {}
        rounds = {}
        downloaded = {}
        for daemon in self.daemons:
            client = daemon.client
            agent = client.agent_id if client is not None else daemon.config.id
            updates[agent] = daemon.rounds_done
            downloaded[agent] = client.bytes_downloaded if client is not None else 0
            latest = client.describe()["round"] if client is not None else None
            rounds[agent] = latest if latest is not None else -1
        yield UPDATES_SUBMITTED(by=updates)
        yield BYTES_DOWNLOADED(by=downloaded)
        yield BASE_ROUND(by=rounds)


def run_agents(configs: Sequence[AgentConfig], stop: threading.Event) -> list[int]:
    """Run several agents in one process (one thread each) until `stop` is set."""
    return AgentGroup(configs, stop).run()
