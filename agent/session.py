"""Where an agent's home is: joining through any known aggregator, following redirects, re-joining.

A `Session` owns what every other part of the client shares: the gRPC channels,
the home (its id, address, round config and heartbeat interval), the latest base
model the home announced, and the `closed` event that ends every wait. Downloads
(`agent.transfer`), submits (`agent.submit`) and the background loops
(`agent.loops`) all reach the home through it, and ask it to re-join when the
home moved or stopped answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from agent.telemetry import read_telemetry
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import FailedPrecondition, StrataError, Unavailable
from proto.retry import RetryPolicy, retry_call
from proto.wire import error_from_rpc, is_retryable

log = logging.getLogger("strata.agent.session")

MAX_REDIRECTS = 8
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A base model as the home announces it: its model CID, round and weights CID, and whether
    this agent is invited to train on it (a home with selection invites a sample each round)."""

    model_cid: str
    round: int
    weights_cid: str = ""
    invited: bool = True
    check_back_s: float = 0.0

    @classmethod
    def from_ref(cls, ref: pb.ModelRef) -> ModelInfo:
        return cls(
            model_cid=ref.model_cid,
            round=ref.round,
            weights_cid=ref.weights_cid,
            invited=not ref.not_invited,
            check_back_s=ref.check_back_s,
        )


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who joins: what the Join request says about this agent."""

    agent_id: str
    federation: str
    capability: int
    display_name: str = ""
    trainable_tensors: tuple[str, ...] = ()

    def join_request(self) -> pb.JoinRequest:
        return pb.JoinRequest(
            agent_id=self.agent_id,
            display_name=self.display_name or self.agent_id,
            capability=self.capability,
            telemetry=read_telemetry(),
            federation=self.federation,
            trainable_tensors=list(self.trainable_tensors),
        )


class Session:
    """One agent's link to its home aggregator (or relay)."""

    def __init__(
        self,
        seeds: Sequence[str],
        identity: Identity,
        *,
        channel_factory: Callable[[str], grpc.Channel],
        retry: RetryPolicy,
        rpc_timeout_s: float,
        join_timeout_s: float,
    ) -> None:
        self.identity = identity
        self.retry = retry
        self.rpc_timeout_s = rpc_timeout_s
        self._join_policy = RetryPolicy(base_s=retry.base_s, max_s=retry.max_s, deadline_s=join_timeout_s)
        self._channel_factory = channel_factory
        self._channels: dict[str, grpc.Channel] = {}
        # channels dropped by drop_channels() whose calls may still be in flight
        self._retired: list[grpc.Channel] = []
        self._channels_lock = threading.Lock()
        self._known_addresses: list[str] = list(dict.fromkeys(seeds))
        self.cond = threading.Condition()
        self.closed = threading.Event()
        self.home_id = ""
        self.home_address = ""
        self.round_config: dict[str, str] = {}
        self.heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self.latest: ModelInfo | None = None
        # the version of the revocation list the home enforces, as its last heartbeat reply said
        self.revocations_version = 0
        self._rejoin_lock = threading.Lock()

    # ------------------------------------------------------------------ wire

    def stub(self, address: str = "") -> pb_grpc.AgentServiceStub:
        """A stub on `address` (default: the home), over one cached channel per address."""
        return pb_grpc.AgentServiceStub(self.channel(address))

    def channel(self, address: str = "") -> grpc.Channel:
        """The cached channel to `address` (default: the home), dialled on first use."""
        address = address or self.home_address
        with self._channels_lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = self._channel_factory(address)
            return channel

    def drop_channels(self) -> None:
        """Dial anew from now on: e.g. after a certificate renewal, so new connections present the new
        certificate. Calls already in flight finish on the old channels, which are closed at the next
        drop or at close()."""
        with self._channels_lock:
            dropped, self._channels = list(self._channels.values()), {}
            finished, self._retired = self._retired, dropped
        for channel in finished:
            channel.close()

    def close(self) -> None:
        """End every wait and close every channel; idempotent."""
        self.closed.set()
        with self.cond:
            self.cond.notify_all()
        with self._channels_lock:
            channels = list(self._channels.values()) + self._retired
            self._retired = []
        for channel in channels:
            channel.close()

    @contextmanager
    def unless_closed(self) -> Iterator[None]:
        """Around a call on this session's channels. close() may shut a channel under the call (or
        before it), which grpc reports as a ValueError; that becomes FailedPrecondition (reason
        "closed"), what every wait here raises once closed, so callers stop instead of crashing."""
        try:
            yield
        except ValueError as exc:
            if self.closed.is_set():
                raise FailedPrecondition("client closed", reason="closed") from exc
            raise

    # ------------------------------------------------------------------ joining

    def learn(self, address: str) -> None:
        """Remember an aggregator address (from a redirect or a home_changed notice)."""
        if address and address not in self._known_addresses:
            self._known_addresses.append(address)

    def candidates(self) -> list[str]:
        """Where to join next: the current home first, then every known address."""
        ordered = ([self.home_address] if self.home_address else []) + self._known_addresses
        return list(dict.fromkeys(a for a in ordered if a))

    def join(self) -> None:
        """Join through any known aggregator, following redirects, backing off while none answers.

        Raises Unavailable (reason "no_aggregator") once the join timeout passes, and
        FailedPrecondition (reason "closed") when the session is closed meanwhile.
        """
        if self.closed.is_set():
            raise FailedPrecondition("client closed", reason="closed")
        try:
            retry_call(
                self._join_any,
                policy=self._join_policy,
                retryable=lambda error: is_retryable(error, idempotent=True),
                stop=self.closed,
                before_retry=lambda error: log.info(
                    "join_retry", extra={"fields": {"agent": self.identity.agent_id, "error": str(error)}}
                ),
            )
        except Exception as exc:
            # close() may shut the channel under an attempt in flight (grpc raises ValueError then)
            if self.closed.is_set() and not isinstance(exc, FailedPrecondition):
                raise FailedPrecondition("client closed", reason="closed") from exc
            raise

    def _join_any(self) -> None:
        """One pass over the candidates; Unavailable (reason "no_aggregator") when none answered."""
        last_error: StrataError | None = None
        for address in self.candidates():
            try:
                self._join_via(address)
                return
            except StrataError as exc:
                if not is_retryable(exc, idempotent=True):
                    raise
                last_error = exc
                log.debug("join_failed", extra={"fields": {"address": address, "error": str(exc)}})
        raise Unavailable(f"no aggregator answered (tried {self.candidates()}): {last_error}", reason="no_aggregator")

    def _join_via(self, address: str) -> None:
        for _ in range(MAX_REDIRECTS):
            try:
                reply = self.stub(address).Join(self.identity.join_request(), timeout=self.rpc_timeout_s)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from exc
            if reply.WhichOneof("outcome") == "redirect":
                log.info(
                    "join_redirected",
                    extra={"fields": {"agent": self.identity.agent_id, "to": reply.redirect.aggregator_id, "address": reply.redirect.address}},
                )
                address = reply.redirect.address
                self.learn(address)
                continue
            self._settle_home(reply.home, address)
            return
        raise Unavailable(f"more than {MAX_REDIRECTS} redirects joining via {address}", reason="redirect_loop")

    def _settle_home(self, home: pb.Home, address: str) -> None:
        with self.cond:
            self.home_id, self.home_address = home.aggregator_id, address
            self.round_config = dict(home.round_config)
            self.heartbeat_interval_s = home.heartbeat_interval_s or DEFAULT_HEARTBEAT_INTERVAL_S
            self.latest = ModelInfo.from_ref(home.base)
            self.cond.notify_all()
        log.info(
            "joined",
            extra={"fields": {"agent": self.identity.agent_id, "home": home.aggregator_id, "address": address, "round": home.base.round}},
        )

    def rejoin(self, why: str) -> None:
        """Join again (the home moved or stopped answering); a failure is logged, not raised.

        Several threads may notice a lost home at once: one re-join is enough, so the
        others return at once instead of queueing behind it.
        """
        if not self._rejoin_lock.acquire(blocking=False):
            return
        try:
            log.info("rejoining", extra={"fields": {"agent": self.identity.agent_id, "why": why, "old_home": self.home_id}})
            self.join()
        except StrataError as exc:
            log.warning("rejoin_failed", extra={"fields": {"agent": self.identity.agent_id, "error": str(exc)}})
        finally:
            self._rejoin_lock.release()

    # ------------------------------------------------------------------ the announced base

    def current(self) -> ModelInfo:
        """The home's current base model: its CID and round."""
        with self.cond:
            if self.latest is None:
                raise FailedPrecondition("not joined yet", reason="not_joined")
            return self.latest

    def announce(self, ref: pb.ModelRef) -> None:
        """Record a base the home announced (by push or poll) and wake whoever waits for one."""
        if not ref.model_cid:
            return
        announced = ModelInfo.from_ref(ref)
        with self.cond:
            if self.latest is None or (self.latest.model_cid, self.latest.invited) != (announced.model_cid, announced.invited):
                self.latest = announced
                self.cond.notify_all()

    def wait_for_base_other_than(self, model_cid: str, timeout: float | None, *, invited_only: bool = False) -> ModelInfo:
        """Block until the home announces a base other than `model_cid` (with `invited_only`, one
        this agent is invited to train on); Unavailable (reason "timeout") after `timeout` seconds,
        FailedPrecondition (reason "closed") once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not self.closed.is_set():
                latest = self.latest
                if latest is not None and latest.model_cid != model_cid and (latest.invited or not invited_only):
                    return latest
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Unavailable("no new model before the timeout", reason="timeout")
                self.cond.wait(timeout=1.0 if remaining is None else min(1.0, remaining))
        raise FailedPrecondition("client closed", reason="closed")
