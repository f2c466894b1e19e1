"""One virtual device: an agent daemon's protocol, as coroutines on the simulator's loop.

It does what `agent.client.Client` and `agent.daemon.AgentDaemon` do, in the same
order, with the same messages:

- join through any known address, following redirects (at most
  `agent.session.MAX_REDIRECTS`), retrying with the agent's full-jitter backoff;
- a WatchModels stream (reopened on its deadline, backed off on failures,
  re-joining on UNAVAILABLE or home_changed) and a Heartbeat at the interval the
  home hands out: first at a random point of the first interval, then every
  `next_interval_s` of the last reply; `agent.loops.HOME_LOST_AFTER` failures in
  a row re-join;
- for each new base it is invited to train on (a home with selection invites a
  sample of its agents each round): GetModel by CID, checked (`agent.sim.models`), evaluated and
  trained (in the thread pool), then a signed `local` update built by
  `agent.submit.local_update` with `agent.submit.update_header`, streamed in
  ~1 MiB chunks, retried `agent.submit.SUBMIT_ATTEMPTS` times (re-joining first)
  while the home is unavailable.

And what the fleet options add: churn (the device leaves at random and comes back
as the same agent), uploads that break off mid-stream (the device then resends
exactly the same update, as an agent resends its pending update after a restart),
stragglers (an extra delay before submitting), and devices behind a relay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from agent.loops import HOME_LOST_AFTER
from agent.privacy import apply_local_dp
from agent.session import MAX_REDIRECTS
from agent.sim.attacks import FleetAttack
from agent.sim.connections import Connections
from agent.sim.models import ModelCache, SharedModel
from agent.sim.options import SimOptions
from agent.sim.schedule import (
    DevicePlan,
    backoff_s,
    device_rng,
    first_heartbeat_s,
    offline_s,
    online_s,
)
from agent.sim.stats import FleetStats, Receipt
from agent.sim.trainers import DeviceTrainer, FleetTrainer
from agent.submit import SUBMIT_ATTEMPTS, encode_weights, local_update, update_header
from agent.transfer import MAX_MODEL_BYTES
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import FINAL_REFUSALS, StrataError, Unavailable
from proto.retry import RetryPolicy
from proto.serving import receive_header_stream
from proto.wire import STREAM_TIMEOUT_S, error_from_rpc, is_retryable, stream_with_header
from storage.encodings import federation_encoding
from storage.keys import KeyPair
from storage.manifest import Manifest

log = logging.getLogger("strata.sim.device")

_NETWORKS = ("wifi", "cellular", "ethernet")
# trainer metrics the round ledger averages (a task's loss and accuracy, of the update and of its base)
_ROUND_METRICS = ("loss", "accuracy")


@dataclass(kw_only=True)
class Fleet:
    """What every device of one simulation shares."""

    options: SimOptions
    stats: FleetStats
    models: ModelCache
    connections: Connections
    trainer: FleetTrainer
    executor: Executor
    retry: RetryPolicy
    clock: Callable[[], float] = time.monotonic
    # what hostile devices do to their updates (None: no attack)
    attack: FleetAttack | None = None
    # home id -> indices of the devices there now
    homes: dict[str, set[int]] = field(default_factory=dict)
    online: int = 0
    joined: set[int] = field(default_factory=set)

    def arrive(self, home: str, index: int, previous: str = "") -> None:
        if previous and previous != home:
            self.homes.get(previous, set()).discard(index)
        members = self.homes.setdefault(home, set())
        members.add(index)
        self.stats.ledger.devices_at(home, len(members))

    def depart(self, home: str, index: int) -> None:
        self.homes.get(home, set()).discard(index)


@dataclass(frozen=True, kw_only=True)
class _Base:
    model_cid: str
    round: int
    # a home with selection invites a sample of its agents each round; the rest stay idle
    invited: bool = True


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _being_cancelled() -> bool:
    """Whether this task is being cancelled (rather than a gRPC call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _CutOff(Exception):
    """A call ended because its channel was closed under it: the device re-homed meanwhile.

    grpc.aio raises asyncio.CancelledError in the coroutine awaiting such a call, not an
    AioRpcError; left alone it would end the task that made the call (a device that
    never trains again, while its heartbeats keep it counted in its home's quorum)."""


class VirtualDevice:
    def __init__(self, plan: DevicePlan, fleet: Fleet) -> None:
        self.plan = plan
        self.fleet = fleet
        self.agent_id = plan.agent_id
        self._options = fleet.options
        self._stats = fleet.stats
        self._rng = device_rng(fleet.options, plan.index)
        self._telemetry = pb.Telemetry(
            cpu_percent=self._rng.uniform(5, 60),
            memory_mb=self._rng.uniform(200, 2000),
            battery_percent=self._rng.uniform(10, 100),
            charging=self._rng.random() < 0.3,
            network=self._rng.choice(_NETWORKS),
        )
        self._key: KeyPair | None = None
        self._trainer: DeviceTrainer | None = None
        self._known: list[str] = list(dict.fromkeys(plan.seeds))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.home_id = ""
        self.home_address = ""
        self._interval = 5.0
        self._round_config: dict[str, str] = {}
        # top-k's error-feedback residual (storage.encodings), kept in memory as a stateless device would
        self._residual: dict[str, np.ndarray] = {}
        self._latest: _Base | None = None
        self._latest_at = 0.0
        self._invited_to: tuple[str, int] | None = None
        self._base_changed = asyncio.Event()
        self._rejoining: asyncio.Task[None] | None = None
        self._watch_call: Any = None
        self._trained_cid = ""
        # an update whose upload broke off: sent again, byte for byte, before anything new
        self._pending: tuple[pb.UpdateHeader, bytes, float] | None = None

    # ------------------------------------------------------------------ lifetime

    async def live(self) -> None:
        """The device's whole life: online sessions and, with churn, time away between them."""
        await asyncio.sleep(self.plan.start_s)
        while True:
            if await self._session(online_s(self._rng, self._options.leave_rate)):
                self._stats.counts["leaves"] += 1
            await asyncio.sleep(offline_s(self._rng, self._options.join_rate))
            self._stats.counts["returns"] += 1

    async def _session(self, online_s: float) -> bool:
        """Online for `online_s` seconds (inf: until cancelled); everything is dropped on leaving.

        False when the device could not join at all."""
        fleet = self.fleet
        tasks: list[asyncio.Task[None]] = []
        counted = False
        try:
            try:
                await self._join()
            except StrataError as exc:  # nothing answered within join_timeout_s, or a final refusal
                self._stats.counts["join_gave_up"] += 1
                log.debug("join_gave_up", extra={"fields": {"agent": self.agent_id, "error": str(exc)}})
                return False
            fleet.online += 1
            counted = True
            fleet.joined.add(self.plan.index)
            tasks = [asyncio.ensure_future(self._watch()), asyncio.ensure_future(self._heartbeat())]
            if fleet.trainer.trains:
                tasks.append(asyncio.ensure_future(self._work()))
            timeout = None if math.isinf(online_s) else online_s
            done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                # a trainer that cannot train (e.g. a partition too small), or a bug: the run ends with it
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return True
        finally:
            for task in tasks:
                task.cancel()
            if self._rejoining is not None:
                self._rejoining.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if counted:
                fleet.online -= 1
            if self.home_id:
                fleet.depart(self.home_id, self.plan.index)
            self.home_id = self.home_address = ""
            await self._close_channels()

    async def _close_channels(self, keep: str = "") -> None:
        for address in [a for a in self._channels if a != keep]:
            await self.fleet.connections.release(self._channels.pop(address))

    def _stub(self, address: str = "") -> pb_grpc.AgentServiceStub:
        address = address or self.home_address
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.fleet.connections.open(address)
        return pb_grpc.AgentServiceStub(channel)

    # ------------------------------------------------------------------ joining

    def _learn(self, address: str) -> None:
        if address and address not in self._known:
            self._known.append(address)

    def _candidates(self) -> list[str]:
        ordered = ([self.home_address] if self.home_address else []) + self._known
        return list(dict.fromkeys(a for a in ordered if a))

    async def _join(self) -> None:
        """Join through any known address, backing off while none answers; Unavailable after join_timeout_s."""
        give_up = self.fleet.clock() + self._options.join_timeout_s
        retry = 0
        while True:
            last: StrataError | None = None
            for address in self._candidates():
                try:
                    await self._join_via(address)
                    return
                except StrataError as exc:
                    if not is_retryable(exc, idempotent=True):
                        raise
                    last = exc
            delay = backoff_s(self._rng, self.fleet.retry, retry)
            retry += 1
            if self.fleet.clock() + delay >= give_up:
                raise Unavailable(f"no aggregator answered: {last}", reason="no_aggregator")
            await asyncio.sleep(delay)

    async def _join_via(self, address: str) -> None:
        request = pb.JoinRequest(
            agent_id=self.agent_id,
            display_name=self.agent_id,
            capability=pb.TRAIN if self.fleet.trainer.trains else pb.INFERENCE,
            telemetry=self._telemetry,
            federation=self._options.federation,
        )
        for _ in range(MAX_REDIRECTS):
            started = self.fleet.clock()
            try:
                reply = await self._stub(address).Join(request, timeout=self._options.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                self._stats.error("join", exc.code())
                raise error_from_rpc(exc) from exc
            self._stats.latency["join"].add(self.fleet.clock() - started)
            if reply.WhichOneof("outcome") == "redirect":
                self._stats.counts["redirects"] += 1
                address = reply.redirect.address
                self._learn(address)
                continue
            self._settle(reply.home, address)
            return
        raise Unavailable(f"more than {MAX_REDIRECTS} redirects joining via {address}", reason="redirect_loop")

    def _settle(self, home: pb.Home, address: str) -> None:
        previous = self.home_id
        self.home_id, self.home_address = home.aggregator_id, address
        self._interval = home.heartbeat_interval_s or self._interval
        self._round_config = dict(home.round_config)
        self._stats.counts["joins"] += 1
        self.fleet.arrive(home.aggregator_id, self.plan.index, previous)
        self._announce(home.base)

    async def _rejoin(self, why: str) -> None:
        """Join again; callers that notice a lost home at the same time share one re-join."""
        if self._rejoining is None or self._rejoining.done():
            self._rejoining = asyncio.ensure_future(self._do_rejoin(why))
        await asyncio.shield(self._rejoining)

    async def _do_rejoin(self, why: str) -> None:
        self._stats.counts[f"rejoin:{why}"] += 1
        old = self.home_address
        try:
            await self._join()
        except StrataError as exc:
            log.debug("rejoin_failed", extra={"fields": {"agent": self.agent_id, "error": str(exc)}})
            return
        if self.home_address != old:
            if self._watch_call is not None:
                self._watch_call.cancel()  # reopened at the new home
            await self._close_channels(keep=self.home_address)

    # ------------------------------------------------------------------ the announced base

    def _announce(self, ref: pb.ModelRef) -> None:
        """The home told this device its base (as agent.session.Session.announce records it)."""
        if not ref.model_cid:
            return
        fleet = self.fleet
        ledger = fleet.stats.ledger
        ledger.base_seen(
            self.home_id, ref.round, ref.model_cid, now=fleet.clock(), devices=len(fleet.homes.get(self.home_id, ()))
        )
        announced = _Base(model_cid=ref.model_cid, round=ref.round, invited=not ref.not_invited)
        if self._latest is None or (self._latest.model_cid, self._latest.invited) != (announced.model_cid, announced.invited):
            self._latest = announced
            self._latest_at = fleet.clock()
            self._base_changed.set()
            if announced.invited and self._invited_to != (self.home_id, ref.round):
                self._invited_to = (self.home_id, ref.round)
                ledger.invited(self.home_id, ref.round)

    async def _base_other_than(self, model_cid: str) -> tuple[_Base, float]:
        """The next base other than `model_cid` this device is invited to train on."""
        while self._latest is None or self._latest.model_cid == model_cid or not self._latest.invited:
            self._base_changed.clear()
            await self._base_changed.wait()
        return self._latest, self._latest_at

    # ------------------------------------------------------------------ watch and heartbeat

    async def _watch(self) -> None:
        retry = 0
        while True:
            moved = self.home_address
            call = self._stub().WatchModels(
                pb.WatchModelsRequest(
                    agent_id=self.agent_id,
                    federation=self._options.federation,
                    known_cid=self._latest.model_cid if self._latest else "",
                ),
                timeout=STREAM_TIMEOUT_S,
            )
            self._watch_call = call
            saw_events = False
            try:
                async for event in call:
                    saw_events, retry = True, 0
                    if event.WhichOneof("event") == "new_base":
                        self._announce(event.new_base)
                        continue
                    self._stats.counts["home_changed"] += 1
                    call.cancel()
                    self._learn(event.home_changed.address)
                    await self._rejoin("home_changed")
                    break
            except asyncio.CancelledError:
                if _being_cancelled():
                    raise
                continue  # grpc.aio raises this for a call cancelled here: a re-join moved the device
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.CANCELLED and self.home_address != moved:
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the stream's own deadline: open the next one at once
                self._stats.error("watch", code)
                await asyncio.sleep(backoff_s(self._rng, self.fleet.retry, retry))
                retry += 1
                if code == grpc.StatusCode.UNAVAILABLE:
                    await self._rejoin("home_unreachable")
                continue
            finally:
                self._watch_call = None
            if not saw_events:
                await asyncio.sleep(backoff_s(self._rng, self.fleet.retry, retry))
                retry += 1

    async def _heartbeat(self) -> None:
        await asyncio.sleep(first_heartbeat_s(self._rng, self._interval))
        failures = 0
        while True:
            interval = self._interval
            started = self.fleet.clock()
            try:
                reply = await self._stub().Heartbeat(
                    pb.HeartbeatRequest(
                        agent_id=self.agent_id,
                        telemetry=self._telemetry,
                        federation=self._options.federation,
                        known_cid=self._latest.model_cid if self._latest else "",
                    ),
                    timeout=min(self._options.rpc_timeout_s, interval * 2),
                )
            except asyncio.CancelledError:
                if _being_cancelled():
                    raise
                # a re-join closed the old home's channel under this heartbeat: send it to the new home now
                self._stats.error("heartbeat", "CUT_OFF")
                continue
            except grpc.aio.AioRpcError as exc:
                self._stats.error("heartbeat", exc.code())
                failures += 1
                if failures >= HOME_LOST_AFTER:
                    failures = 0
                    await self._rejoin("home_unreachable")
                await asyncio.sleep(interval)
                continue
            self._stats.latency["heartbeat"].add(self.fleet.clock() - started)
            self._stats.counts["heartbeats"] += 1
            failures = 0
            self._announce(reply.current_base)
            if reply.HasField("home_changed") and reply.home_changed.address:
                self._stats.counts["home_changed"] += 1
                self._learn(reply.home_changed.address)
                await self._rejoin("home_changed")
            if reply.next_interval_s > 0:
                self._interval = reply.next_interval_s
            await asyncio.sleep(self._interval)

    # ------------------------------------------------------------------ training

    async def _work(self) -> None:
        if self._pending is not None:
            await self._send(*self._pending)
        retry = 0
        while True:
            base, seen_at = await self._base_other_than(self._trained_cid)
            try:
                model = await self._download(base.model_cid)
            except StrataError as exc:
                self._stats.counts["download_failed"] += 1
                log.debug("download_failed", extra={"fields": {"agent": self.agent_id, "error": str(exc)}})
                await asyncio.sleep(backoff_s(self._rng, self.fleet.retry, retry))
                retry += 1
                continue
            retry = 0
            round_config = {**self._round_config, "round": base.round}
            trained = await asyncio.get_running_loop().run_in_executor(
                self.fleet.executor, self._train, model, round_config
            )
            if self.plan.straggler:
                self._stats.counts["straggler_waits"] += 1
                await asyncio.sleep(self._options.straggler_delay.draw(self._rng))
            header, blob = await asyncio.get_running_loop().run_in_executor(
                self.fleet.executor, self._signed_update, model, base.round, *trained
            )
            self._trained_cid = model.cid
            await self._send(header, blob, seen_at)

    async def _download(self, model_cid: str) -> SharedModel:
        """GetModel by CID from the home, checked like an agent checks it."""
        request = pb.GetModelRequest(model_cid=model_cid, federation=self._options.federation, agent_id=self.agent_id)
        started = self.fleet.clock()
        try:
            call = self._stub().GetModel(request, timeout=STREAM_TIMEOUT_S)
            header, weights = await receive_header_stream(
                call, size_of=lambda h: h.weights_size, max_size=MAX_MODEL_BYTES, idle_timeout_s=STREAM_TIMEOUT_S, offload=_inline
            )
        except grpc.aio.AioRpcError as exc:
            self._stats.error("download", exc.code())
            raise error_from_rpc(exc) from exc
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            self._stats.error("download", "CUT_OFF")
            raise Unavailable("the download was cut off: the device re-homed", reason="cut_off") from None
        model = self.fleet.models.admit(header, weights, asked_for=model_cid)
        self._stats.latency["download"].add(self.fleet.clock() - started)
        self._stats.counts["downloads"] += 1
        self._stats.bytes["downloaded"] += len(weights)
        return model

    def _train(self, model: SharedModel, round_config: dict[str, Any]) -> tuple[dict, int, dict, dict]:
        """Evaluate the base and train on it, as the agent daemon does (in the thread pool)."""
        if self._trainer is None:
            self._trainer = self.fleet.trainer.for_device(self.plan)
        base_metrics = self._trainer.evaluate(model.tensors)
        weights, num_samples, metrics = self._trainer.train(model.tensors, round_config)
        if self.plan.hostile and self.fleet.attack is not None:
            weights, num_samples = self.fleet.attack.apply(
                index=self.plan.index, base_cid=model.cid, base=model.tensors, weights=weights, num_samples=num_samples
            )
        return weights, num_samples, metrics, base_metrics

    def _signed_update(
        self, model: SharedModel, base_round: int, weights: dict, num_samples: int, metrics: dict, base_metrics: dict
    ) -> tuple[pb.UpdateHeader, bytes]:
        """The signed local update and its SubmitUpdate header, exactly as agent.client.Client builds them."""
        if self._key is None:
            self._key = KeyPair.generate()
        # the round the home announced this base for: its manifest names the round that made it
        weights, dp = apply_local_dp(model.tensors, weights, self._round_config)
        encoding = federation_encoding(self._round_config)
        encoded = None
        if encoding.is_delta:  # as the client library does; top-k's residual lives in memory here
            blob, left = encode_weights(weights, base_tensors=model.tensors, encoding=encoding, residual=self._residual)
            self._residual, encoded = left, (blob, encoding)
        pending, blob = local_update(
            weights,
            base=model.manifest,
            federation=self._options.federation,
            round=base_round,
            agent_id=self.agent_id,
            key=self._key,
            num_samples=num_samples,
            metrics=metrics,
            base_metrics=base_metrics,
            dp=dp,
            encoded=encoded,
        )
        header = update_header(
            Manifest.from_bytes(pending.manifest.encode()),
            blob,
            agent_id=self.agent_id,
            federation=self._options.federation,
            base_metrics=pending.base_metrics,
        )
        return header, blob

    # ------------------------------------------------------------------ submitting

    async def _send(self, header: pb.UpdateHeader, blob: bytes, seen_at: float) -> None:
        """SubmitUpdate until answered: resent after a dropout, retried while the home is unavailable."""
        self._pending = (header, blob, seen_at)
        attempt = 0
        while True:
            if self._rng.random() < self._options.dropout:
                await self._upload_and_drop(header, blob)
                # the connection is gone; the device comes back after a backoff and resends the same bytes
                await asyncio.sleep(backoff_s(self._rng, self.fleet.retry, 0))
                continue
            started = self.fleet.clock()
            # the home this upload goes to: a re-home while it is in flight must not relabel its answer
            sent_to = self.home_id
            try:
                reply = await self._upload(header, blob)
            except _CutOff:
                # the device re-homed while this upload was in flight: send it to the new home
                self._stats.error("submit", "CUT_OFF")
                if attempt + 1 < SUBMIT_ATTEMPTS:
                    attempt += 1
                    continue
                self._pending = None
                return
            except grpc.aio.AioRpcError as exc:
                self._stats.error("submit", exc.code())
                if is_retryable(exc) and attempt + 1 < SUBMIT_ATTEMPTS:
                    await asyncio.sleep(backoff_s(self._rng, self.fleet.retry, attempt))
                    attempt += 1
                    await self._rejoin("submit_unavailable")
                    continue
                self._pending = None
                return
            now = self.fleet.clock()
            self._stats.latency["submit"].add(now - started)
            self._settle_reply(header, reply, now - seen_at, home=sent_to)
            return

    def _settle_reply(self, header: pb.UpdateHeader, reply: pb.SubmitUpdateReply, update_s: float, *, home: str) -> None:
        stats = self._stats
        self._pending = None
        if reply.accepted:
            stats.counts["acknowledged"] += 1
            stats.latency["update"].add(update_s)
            metrics = {name: value for name, value in header.metrics.items() if name in _ROUND_METRICS}
            metrics.update({f"base_{n}": v for n, v in header.base_metrics.items() if n in _ROUND_METRICS})
            stats.ledger.accepted(home, reply.round, duplicate=reply.duplicate, metrics=metrics)
            stats.receipts.append(
                Receipt(
                    agent_id=self.agent_id,
                    home=home,
                    base_cid=header.base_cid,
                    update_cid=reply.update_cid,
                    round=reply.round,
                    duplicate=reply.duplicate,
                )
            )
            return
        stats.refusals[reply.reason] += 1
        stats.ledger.refused(home, header.round, reply.reason)
        if reply.reason not in FINAL_REFUSALS:
            log.debug("update_refused", extra={"fields": {"agent": self.agent_id, "reason": reply.reason}})

    async def _upload(self, header: pb.UpdateHeader, blob: bytes) -> pb.SubmitUpdateReply:
        call = self._stub().SubmitUpdate(timeout=STREAM_TIMEOUT_S)
        try:
            try:
                for message in stream_with_header(pb.UpdateChunk, header, blob):
                    await call.write(message)
                await call.done_writing()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                # the call ended before the last chunk went: the home answered early (a refusal on the header
                # alone), or the channel was closed under it. grpc.aio fails the write with InvalidStateError
                # or an INTERNAL "Failed execute_batch"; the call's own outcome says what happened
                pass
            reply = await call
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            raise _CutOff() from None
        self._stats.bytes["uploaded"] += len(blob)
        return reply

    async def _upload_and_drop(self, header: pb.UpdateHeader, blob: bytes) -> None:
        """Send the header and part of the chunks, then break the call off, as a device losing its link."""
        messages = list(stream_with_header(pb.UpdateChunk, header, blob))
        cut = self._rng.randint(1, max(1, len(messages) - 1))
        call = self._stub().SubmitUpdate(timeout=STREAM_TIMEOUT_S)
        try:
            for message in messages[:cut]:
                await call.write(message)
                if message.WhichOneof("part") == "chunk":
                    self._stats.bytes["uploaded_then_dropped"] += len(message.chunk.data)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended under the writes (an early answer, a closed channel): dropped all the same
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
        call.cancel()
        self._stats.counts["dropouts"] += 1
