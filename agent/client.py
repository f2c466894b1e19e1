"""The client library: what an agent (or your own training loop) uses to talk to its home aggregator.

    with Client(["127.0.0.1:7070"], federation="digits") as client:
        weights = client.wait_for_model()
        client.submit(weights, num_samples, {"loss": 0.3})

The client joins through any known aggregator and follows redirects to its home
on the ring, retrying with exponential backoff and jitter while aggregators are
unreachable. New base models arrive by push (WatchModels); a heartbeat polls as
a fallback for networks that kill long streams. When the home moves (ring
change) or stops answering, the client joins again and lands on the new owner.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from agent.state import AgentState, PendingUpdate
from agent.telemetry import read_telemetry
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.convert import CAPABILITIES
from proto.errors import FailedPrecondition, IntegrityError, InvalidInput, StrataError, Unavailable
from proto.wire import (
    DEFAULT_TIMEOUT_S,
    STREAM_TIMEOUT_S,
    create_channel,
    error_from_rpc,
    is_retryable,
    read_header_stream,
    stream_with_header,
)
from storage.cid import cid_of
from storage.codec import decode_tensors, encode_tensors, summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, now_rfc3339

log = logging.getLogger("strata.agent.client")

_MAX_REDIRECTS = 8
_MAX_MODEL_BYTES = 4 << 30
# consecutive failed heartbeats after which the home counts as gone
_HOME_LOST_AFTER = 3


class SubmitRefused(InvalidInput):
    """The aggregator refused an update; `reason` is its machine-readable code."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    model_cid: str
    round: int
    weights_cid: str = ""


@dataclass(frozen=True, kw_only=True)
class SubmitReceipt:
    update_cid: str
    round: int
    duplicate: bool


class Client:
    def __init__(
        self,
        seeds: str | Sequence[str],
        *,
        federation: str = "digits",
        agent_id: str = "",
        display_name: str = "",
        capability: str = "train",
        trainable_tensors: Sequence[str] | None = None,
        state_dir: str | None = None,
        rpc_timeout_s: float = DEFAULT_TIMEOUT_S,
        join_timeout_s: float = 300.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
        watch: bool = True,
        channel_factory: Callable[[str], grpc.Channel] = create_channel,
    ) -> None:
        self.seeds = [seeds] if isinstance(seeds, str) else list(seeds)
        if not self.seeds:
            raise InvalidInput("at least one aggregator address is needed", reason="bad_config")
        if capability not in CAPABILITIES:
            raise InvalidInput(f"capability must be one of {sorted(CAPABILITIES)}", reason="bad_config")
        self.federation = federation
        self.capability = capability
        self.display_name = display_name
        self.trainable_tensors = list(trainable_tensors) if trainable_tensors else None
        self._state = AgentState(state_dir, agent_id=agent_id) if state_dir else None
        self.agent_id = self._state.agent_id if self._state else (agent_id or f"agent-{random.getrandbits(32):08x}")
        self._key = self._state.key if self._state else KeyPair.generate()
        self._rpc_timeout_s = rpc_timeout_s
        self._join_timeout_s = join_timeout_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._watch = watch
        self._channel_factory = channel_factory

        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._channels: dict[str, grpc.Channel] = {}
        self._known_addresses: list[str] = list(self.seeds)
        self.home_id = ""
        self.home_address = ""
        self.round_config: dict[str, str] = {}
        self._heartbeat_interval_s = 5.0
        self._latest: ModelInfo | None = None
        self._model: tuple[Manifest, dict[str, np.ndarray]] | None = None
        self._returned_cid = self._state.progress.last_base_cid if self._state else ""
        self._rejoin_needed = threading.Event()
        self._rejoin_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.bytes_downloaded = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> Client:
        self.join()
        if self._watch and not self._threads:
            for target, name in ((self._watch_loop, "watch"), (self._heartbeat_loop, "heartbeat")):
                thread = threading.Thread(target=target, name=f"strata-agent-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        for channel in list(self._channels.values()):
            channel.close()
        for thread in self._threads:
            thread.join(timeout=2.0)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # ------------------------------------------------------------------ joining

    def _stub(self, address: str) -> pb_grpc.AgentServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._channel_factory(address)
        return pb_grpc.AgentServiceStub(channel)

    def _candidates(self) -> list[str]:
        ordered = ([self.home_address] if self.home_address else []) + self._known_addresses
        return list(dict.fromkeys(a for a in ordered if a))

    def join(self) -> None:
        """Join through any known aggregator, following redirects, with backoff while none answers."""
        give_up_at = time.monotonic() + self._join_timeout_s
        attempt = 0
        last_error: Exception | None = None
        while not self._closed.is_set():
            for address in self._candidates():
                try:
                    if self._join_via(address):
                        return
                except StrataError as exc:
                    if exc.status != "UNAVAILABLE" and exc.status != "DEADLINE_EXCEEDED":
                        raise
                    last_error = exc
                    log.debug("join_failed", extra={"fields": {"address": address, "error": str(exc)}})
            delay = random.random() * min(self._backoff_max_s, self._backoff_base_s * 2**attempt)
            attempt += 1
            if time.monotonic() + delay > give_up_at:
                raise Unavailable(
                    f"no aggregator answered within {self._join_timeout_s:.0f}s (tried {self._candidates()}): "
                    f"{last_error}",
                    reason="no_aggregator",
                )
            log.info("join_retry", extra={"fields": {"agent": self.agent_id, "in_s": round(delay, 2)}})
            self._closed.wait(delay)
        raise FailedPrecondition("client closed", reason="closed")

    def _join_via(self, address: str) -> bool:
        for _ in range(_MAX_REDIRECTS):
            request = pb.JoinRequest(
                agent_id=self.agent_id,
                display_name=self.display_name or self.agent_id,
                capability=CAPABILITIES[self.capability],
                telemetry=read_telemetry(),
                federation=self.federation,
                trainable_tensors=self.trainable_tensors or [],
            )
            try:
                reply = self._stub(address).Join(request, timeout=self._rpc_timeout_s)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from exc
            if reply.WhichOneof("outcome") == "redirect":
                log.info(
                    "join_redirected",
                    extra={"fields": {"agent": self.agent_id, "to": reply.redirect.aggregator_id, "address": reply.redirect.address}},
                )
                address = reply.redirect.address
                if address not in self._known_addresses:
                    self._known_addresses.append(address)
                continue
            home = reply.home
            with self._cond:
                self.home_id, self.home_address = home.aggregator_id, address
                self.round_config = dict(home.round_config)
                self._heartbeat_interval_s = home.heartbeat_interval_s or 5.0
                self._latest = ModelInfo(
                    model_cid=home.base.model_cid, round=home.base.round, weights_cid=home.base.weights_cid
                )
                self._cond.notify_all()
            self._rejoin_needed.clear()
            log.info(
                "joined",
                extra={"fields": {"agent": self.agent_id, "home": home.aggregator_id, "address": address, "round": home.base.round}},
            )
            return True
        raise Unavailable(f"more than {_MAX_REDIRECTS} redirects joining via {address}", reason="redirect_loop")

    def _rejoin(self, why: str) -> None:
        # the watch and heartbeat threads may both notice a lost home: one rejoin is enough
        if not self._rejoin_lock.acquire(blocking=False):
            return
        try:
            log.info("rejoining", extra={"fields": {"agent": self.agent_id, "why": why, "old_home": self.home_id}})
            self.join()
        except StrataError as exc:
            log.warning("rejoin_failed", extra={"fields": {"agent": self.agent_id, "error": str(exc)}})
        finally:
            self._rejoin_lock.release()

    # ------------------------------------------------------------------ models

    def current(self) -> ModelInfo:
        """The home's current base model: its CID and round."""
        with self._cond:
            if self._latest is None:
                raise FailedPrecondition("not joined yet", reason="not_joined")
            return self._latest

    @property
    def round(self) -> int:
        return self.current().round

    @property
    def model_cid(self) -> str:
        return self.current().model_cid

    @property
    def model_manifest(self) -> Manifest | None:
        return self._model[0] if self._model else None

    def wait_for_model(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Wait for a base model this client has not handed out yet, download it, and return its tensors."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed.is_set():
                if self._latest is not None and self._latest.model_cid != self._returned_cid:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Unavailable("no new model before the timeout", reason="timeout")
                self._cond.wait(timeout=1.0 if remaining is None else min(1.0, remaining))
            else:
                raise FailedPrecondition("client closed", reason="closed")
            target = self._latest
        assert target is not None
        manifest, tensors = self.download(target.model_cid)
        self._returned_cid = target.model_cid
        if self._state is not None:
            self._state.progress.last_base_cid = target.model_cid
            self._state.save()
        return tensors

    def download(self, model_cid: str = "") -> tuple[Manifest, dict[str, np.ndarray]]:
        """Fetch a model (default: the current base) unless it is the one already held; verify both CIDs."""
        held = self._model
        if held is not None and model_cid and held[0].cid == model_cid:
            return held
        fetched = self._fetch(model_cid, if_none_match=held[0].cid if held else "")
        if fetched is None:
            assert held is not None
            return held
        manifest, weights = fetched
        self._model = (manifest, decode_tensors(weights))
        return self._model

    def fetch_model_bytes(self, model_cid: str = "") -> tuple[Manifest, bytes]:
        """A model's verified manifest and raw weight bytes (default: the current base), without
        keeping it as this client's model: for callers that store models themselves (a relay's cache)."""
        fetched = self._fetch(model_cid, if_none_match="")
        assert fetched is not None
        return fetched

    def _fetch(self, model_cid: str, *, if_none_match: str) -> tuple[Manifest, bytes] | None:
        """GetModel from the home, both CIDs and the signature verified; None when not modified."""
        request = pb.GetModelRequest(
            model_cid=model_cid, if_none_match=if_none_match, federation=self.federation, agent_id=self.agent_id
        )
        try:
            stream = self._stub(self.home_address).GetModel(request, timeout=STREAM_TIMEOUT_S)
            header, weights = read_header_stream(stream, size_of=lambda h: h.weights_size, max_size=_MAX_MODEL_BYTES)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        if header.not_modified:
            return None
        if cid_of(header.manifest) != header.model_cid:
            raise IntegrityError(f"manifest bytes do not hash to {header.model_cid}", reason="hash_mismatch")
        manifest = Manifest.from_bytes(header.manifest)
        if cid_of(weights) != manifest.weights:
            raise IntegrityError(f"weights of {header.model_cid} do not hash to {manifest.weights}", reason="hash_mismatch")
        manifest.verify_signature()
        self.bytes_downloaded += len(weights)
        return manifest, weights

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        weights: Mapping[str, np.ndarray],
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
        *,
        base_metrics: Mapping[str, float] | None = None,
    ) -> SubmitReceipt:
        """Upload an update trained from the model last returned by `wait_for_model`.

        With `trainable_tensors` set, only those tensors are sent (a partial update).
        Raises SubmitRefused with the aggregator's reason code when it is refused.
        """
        if self._model is None:
            raise FailedPrecondition("no base model downloaded yet: call wait_for_model() first", reason="no_base")
        base = self._model[0]
        names = self.trainable_tensors or sorted(weights)
        missing = [n for n in names if n not in weights]
        if missing:
            raise InvalidInput(f"weights lack tensors {missing[:5]}", reason="bad_update")
        blob = encode_tensors({name: weights[name] for name in names})
        manifest = Manifest(
            kind="local",
            federation=self.federation,
            round=base.round if self._latest is None or base.cid != self._latest.model_cid else self._latest.round,
            producer=Producer(role="agent", id=self.agent_id),
            weights=cid_of(blob),
            tensors=summarize(blob),
            base=base.cid,
            num_samples=int(num_samples),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            extra={"base_metrics": {k: float(v) for k, v in (base_metrics or {}).items()}},
            created_at=now_rfc3339(),
        ).signed(self._key)
        pending = PendingUpdate(
            round=manifest.round,
            base_cid=base.cid,
            num_samples=int(num_samples),
            metrics=dict(manifest.metrics),
            base_metrics=dict(manifest.extra["base_metrics"]),
            tensors=list(names) if self.trainable_tensors else [],
            manifest=manifest.to_bytes().decode(),
            weights_file="pending.safetensors",
        )
        if self._state is not None:
            self._state.set_pending(pending, blob)
        return self._send(pending, blob)

    def resend_pending(self) -> SubmitReceipt | None:
        """After a restart: send the update that was written but never acknowledged, if any."""
        if self._state is None or self._state.progress.pending is None:
            return None
        blob = self._state.pending_weights()
        if blob is None:
            self._state.progress.pending = None
            self._state.save()
            return None
        return self._send(self._state.progress.pending, blob)

    def submit_signed(
        self,
        manifest: Manifest,
        blob: bytes,
        *,
        tensors: Sequence[str] = (),
        base_metrics: Mapping[str, float] | None = None,
    ) -> SubmitReceipt:
        """Upload an update whose manifest the caller built and signed (e.g. a relay's combined
        update, kind "relay"): the header is filled from the manifest, which travels with it.

        `tensors` declares a partial update. Not persisted as this client's pending update.
        Raises SubmitRefused with the aggregator's reason code when it is refused.
        """
        header = pb.UpdateHeader(
            agent_id=self.agent_id,
            round=manifest.round,
            base_cid=manifest.base or "",
            num_samples=manifest.num_samples,
            metrics=manifest.metrics,
            tensors=list(tensors),
            weights_size=len(blob),
            weights_cid=manifest.weights,
            base_metrics=dict(base_metrics or {}),
            federation=self.federation,
            kind=manifest.kind,
            parents=list(manifest.parents),
            manifest=manifest.to_bytes(),
        )
        reply = self._submit_stream(header, blob)
        if not reply.accepted:
            raise SubmitRefused(reply.message or reply.reason, reason=reply.reason)
        return SubmitReceipt(update_cid=reply.update_cid, round=reply.round, duplicate=reply.duplicate)

    def _submit_stream(self, header: pb.UpdateHeader, blob: bytes) -> pb.SubmitUpdateReply:
        """SubmitUpdate to the home, retrying (and re-joining) while it is unavailable."""
        attempt = 0
        while True:
            try:
                return self._stub(self.home_address).SubmitUpdate(
                    stream_with_header(pb.UpdateChunk, header, blob), timeout=STREAM_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                if not is_retryable(exc) or attempt >= 4 or self._closed.is_set():
                    raise error_from_rpc(exc) from exc
                attempt += 1
                self._closed.wait(random.random() * min(self._backoff_max_s, self._backoff_base_s * 2**attempt))
                self._rejoin("submit_unavailable")

    def _send(self, pending: PendingUpdate, blob: bytes) -> SubmitReceipt:
        header = pb.UpdateHeader(
            agent_id=self.agent_id,
            round=pending.round,
            base_cid=pending.base_cid,
            num_samples=pending.num_samples,
            metrics=pending.metrics,
            tensors=pending.tensors,
            weights_size=len(blob),
            weights_cid=cid_of(blob),
            base_metrics=pending.base_metrics,
            federation=self.federation,
            kind="local",
            manifest=pending.manifest.encode(),
        )
        reply = self._submit_stream(header, blob)
        if not reply.accepted:
            if self._state is not None and reply.reason in ("stale", "conflict", "unknown_base"):
                # resending can never succeed: drop it rather than retry forever
                self._state.clear_pending(update_cid="")
            raise SubmitRefused(reply.message or reply.reason, reason=reply.reason)
        if self._state is not None:
            self._state.clear_pending(update_cid=reply.update_cid)
        log.info(
            "update_submitted",
            extra={"fields": {"agent": self.agent_id, "round": reply.round, "update": reply.update_cid, "duplicate": reply.duplicate}},
        )
        return SubmitReceipt(update_cid=reply.update_cid, round=reply.round, duplicate=reply.duplicate)

    # ------------------------------------------------------------------ background

    def _set_latest(self, ref: pb.ModelRef) -> None:
        if not ref.model_cid:
            return
        with self._cond:
            if self._latest is None or self._latest.model_cid != ref.model_cid:
                self._latest = ModelInfo(model_cid=ref.model_cid, round=ref.round, weights_cid=ref.weights_cid)
                self._cond.notify_all()

    def _watch_loop(self) -> None:
        failures = 0
        while not self._closed.is_set():
            if self._rejoin_needed.is_set():
                self._rejoin("home_changed")
            try:
                known = self._latest.model_cid if self._latest else ""
                stream = self._stub(self.home_address).WatchModels(
                    pb.WatchModelsRequest(agent_id=self.agent_id, federation=self.federation, known_cid=known),
                    timeout=STREAM_TIMEOUT_S,
                )
                for event in stream:
                    failures = 0
                    if event.WhichOneof("event") == "new_base":
                        self._set_latest(event.new_base)
                    else:
                        log.info(
                            "home_changed",
                            extra={"fields": {"agent": self.agent_id, "to": event.home_changed.aggregator_id}},
                        )
                        self._known_addresses.append(event.home_changed.address)
                        self._rejoin_needed.set()
                        break
                    if self._closed.is_set():
                        stream.cancel()
                        return
            except ValueError:
                # the channel was closed under us by close(): the client is shutting down
                if self._closed.is_set():
                    return
                raise
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # the home is gone (or restarting): join again, which walks to the ring's next live owner
                    failures += 1
                    self._closed.wait(min(self._backoff_max_s, self._backoff_base_s * 2 ** min(failures, 6)) * random.random())
                    self._rejoin("home_unreachable")
                elif exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    failures += 1
                    self._closed.wait(min(self._backoff_max_s, self._backoff_base_s * 2 ** min(failures, 6)) * random.random())

    def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._closed.wait(self._heartbeat_interval_s):
            try:
                reply = self._stub(self.home_address).Heartbeat(
                    pb.HeartbeatRequest(
                        agent_id=self.agent_id,
                        telemetry=read_telemetry(),
                        federation=self.federation,
                        known_cid=self._latest.model_cid if self._latest else "",
                    ),
                    timeout=min(self._rpc_timeout_s, self._heartbeat_interval_s * 2),
                )
                failures = 0
                self._set_latest(reply.current_base)
                if reply.HasField("home_changed") and reply.home_changed.address:
                    self._known_addresses.append(reply.home_changed.address)
                    self._rejoin("home_changed")
            except ValueError:
                if self._closed.is_set():  # the channel was closed by close()
                    return
                raise
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                failures += 1
                log.debug("heartbeat_failed", extra={"fields": {"agent": self.agent_id, "code": str(exc.code())}})
                if failures >= _HOME_LOST_AFTER:
                    failures = 0
                    self._rejoin("home_unreachable")

    def already_submitted(self, model_cid: str) -> bool:
        """True when an update trained on `model_cid` was acknowledged (as remembered across restarts)."""
        return self._state is not None and self._state.progress.last_submitted_base == model_cid

    def describe(self) -> dict[str, Any]:
        latest = self._latest
        return {
            "agent_id": self.agent_id,
            "home": self.home_id,
            "address": self.home_address,
            "round": latest.round if latest else None,
            "model": latest.model_cid if latest else None,
        }
