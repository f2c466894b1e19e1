"""Sending updates: the signed update manifest, the pending update kept on disk, SubmitUpdate.

A local update is built and signed here (`local_update`), written to the state
directory as the pending update before it leaves, and cleared once the home
acknowledged it, so an agent killed mid-upload resends exactly the same bytes.
What a refusal does to the pending update is one rule (`settle_pending`): a
refusal in `FINAL_REFUSALS` drops it, any other keeps it for a resend.

SubmitUpdate is retried under the client's `RetryPolicy` while the home is
unavailable, re-joining before each new attempt so a moved home is found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from agent.session import Session
from agent.state import AgentState, PendingUpdate
from proto import strata_pb2 as pb
from proto.errors import FINAL_REFUSALS, InvalidInput
from proto.retry import RetryPolicy, retry_call
from proto.wire import STREAM_TIMEOUT_S, error_from_rpc, is_retryable, stream_with_header
from storage.cid import cid_of
from storage.codec import encode_tensors, summarize
from storage.control import MANIFEST_KEY as SCAFFOLD_KEY
from storage.control import delta_control_cid
from storage.encodings import FLOAT32, Encoding, encode_update
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer, now_rfc3339

log = logging.getLogger("strata.agent.submit")

# SubmitUpdate attempts while the home is unavailable (each after a re-join)
SUBMIT_ATTEMPTS = 5
PENDING_WEIGHTS_FILE = "pending.safetensors"
PENDING_CONTROL_FILE = "pending.delta_c.safetensors"


class SubmitRefused(InvalidInput):
    """The aggregator refused an update; `reason` is its machine-readable code."""


@dataclass(frozen=True, kw_only=True)
class SubmitReceipt:
    update_cid: str
    round: int
    duplicate: bool


def local_update(
    weights: Mapping[str, np.ndarray],
    *,
    base: Manifest,
    federation: str,
    round: int,
    agent_id: str,
    key: KeyPair,
    num_samples: int,
    metrics: Mapping[str, float] | None = None,
    base_metrics: Mapping[str, float] | None = None,
    tensors: Sequence[str] | None = None,
    dp: Mapping[str, Any] | None = None,
    encoded: tuple[bytes, Encoding] | None = None,
    control: bytes = b"",
) -> tuple[PendingUpdate, bytes]:
    """A device update trained from `base`, signed by `key`: (its pending record, its weight bytes).

    `tensors` names a partial update's tensors; None sends every tensor of `weights`. `dp` is the
    local DP already applied to `weights` (agent.privacy), named in the manifest's `extra.dp`.
    `encoded` is (the blob, its encoding) from `encode_weights`, recorded as `extra.encoding`;
    None sends the weights as float32 safetensors. `control` is SCAFFOLD's delta_c blob (float32
    safetensors over the trained tensors), named in the manifest's `extra.scaffold.delta_c`.
    """
    names = list(tensors) if tensors else sorted(weights)
    missing = [n for n in names if n not in weights]
    if missing:
        raise InvalidInput(f"weights lack tensors {missing[:5]}", reason="bad_update")
    blob, encoding = encoded if encoded is not None else (encode_tensors({name: weights[name] for name in names}), FLOAT32)
    manifest = Manifest(
        kind="local",
        federation=federation,
        round=round,
        producer=Producer(role="agent", id=agent_id),
        weights=cid_of(blob),
        tensors=summarize(blob),
        base=base.cid,
        num_samples=int(num_samples),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        extra={
            "base_metrics": {k: float(v) for k, v in (base_metrics or {}).items()},
            **({"dp": dict(dp)} if dp else {}),
            # the CID is of these bytes as encoded; float32 (no entry) keeps old manifests' bytes
            **({"encoding": encoding.name} if encoding.is_delta else {}),
            **({SCAFFOLD_KEY: {"delta_c": cid_of(control)}} if control else {}),
        },
        created_at=now_rfc3339(),
    ).signed(key)
    pending = PendingUpdate(
        round=manifest.round,
        base_cid=base.cid,
        num_samples=manifest.num_samples,
        metrics=dict(manifest.metrics),
        base_metrics=dict(manifest.extra["base_metrics"]),
        tensors=list(names) if tensors else [],
        manifest=manifest.to_bytes().decode(),
        weights_file=PENDING_WEIGHTS_FILE,
        control_file=PENDING_CONTROL_FILE if control else "",
    )
    return pending, blob


def encode_weights(
    weights: Mapping[str, np.ndarray],
    *,
    base_tensors: Mapping[str, np.ndarray],
    encoding: Encoding,
    tensors: Sequence[str] | None = None,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """(The update's bytes in `encoding`, top-k's new residual): see storage.encodings.encode_update."""
    names = list(tensors) if tensors else sorted(weights)
    missing = [n for n in names if n not in weights]
    if missing:
        raise InvalidInput(f"weights lack tensors {missing[:5]}", reason="bad_update")
    return encode_update({name: weights[name] for name in names}, base_tensors, encoding, residual=residual)


def update_header(
    manifest: Manifest,
    blob: bytes,
    *,
    agent_id: str,
    federation: str,
    tensors: Sequence[str] = (),
    base_metrics: Mapping[str, float] | None = None,
    control: bytes = b"",
) -> pb.UpdateHeader:
    """The SubmitUpdate header for an update whose signed manifest travels with it.

    The home hashes `blob` against `manifest.weights`; the client does not hash it again here.
    SCAFFOLD's `control` (delta_c) follows the weights in the stream; its CID is the manifest's.
    """
    return pb.UpdateHeader(
        agent_id=agent_id,
        round=manifest.round,
        base_cid=manifest.base or "",
        num_samples=manifest.num_samples,
        metrics=manifest.metrics,
        tensors=list(tensors),
        weights_size=len(blob),
        weights_cid=manifest.weights,
        base_metrics=dict(base_metrics or {}),
        federation=federation,
        kind=manifest.kind,
        parents=list(manifest.parents),
        manifest=manifest.to_bytes(),
        encoding=str(manifest.extra.get("encoding", "")),
        control_size=len(control),
        control_cid=delta_control_cid(manifest.extra) if control else "",
    )


def settle_pending(state: AgentState, reply: pb.SubmitUpdateReply) -> None:
    """Apply the home's answer to the pending update: acknowledged or finally refused, it is
    cleared (and its base counts as done); any other refusal keeps it for a resend."""
    if reply.accepted:
        state.clear_pending(update_cid=reply.update_cid)
    elif reply.reason in FINAL_REFUSALS:
        # resending can never succeed: drop it rather than retry forever
        state.clear_pending(update_cid="")


class Submitter:
    """Sends updates to the session's home; keeps the pending update in `state` when there is one."""

    def __init__(self, session: Session, *, key: KeyPair, state: AgentState | None, retry: RetryPolicy) -> None:
        self._session = session
        self._key = key
        self._state = state
        self._policy = RetryPolicy(base_s=retry.base_s, max_s=retry.max_s, attempts=SUBMIT_ATTEMPTS)

    @property
    def _agent_id(self) -> str:
        return self._session.identity.agent_id

    def _header(
        self,
        manifest: Manifest,
        blob: bytes,
        tensors: Sequence[str],
        base_metrics: Mapping[str, float] | None,
        control: bytes = b"",
    ) -> pb.UpdateHeader:
        identity = self._session.identity
        return update_header(
            manifest,
            blob,
            agent_id=identity.agent_id,
            federation=identity.federation,
            tensors=tensors,
            base_metrics=base_metrics,
            control=control,
        )

    def submit_local(self, pending: PendingUpdate, blob: bytes, control: bytes = b"") -> SubmitReceipt:
        """Persist `pending` (with a state directory), send it, and settle it by the answer."""
        if self._state is not None:
            self._state.set_pending(pending, blob, control)
        return self._send_pending(pending, Manifest.from_bytes(pending.manifest.encode()), blob, control)

    def resend_pending(self) -> SubmitReceipt | None:
        """Send the update written but never acknowledged before a restart, if any.

        A pending update whose manifest does not parse, or whose weights are gone or do
        not hash to what its manifest names, can never be accepted: it is dropped.
        """
        state = self._state
        if state is None or state.progress.pending is None:
            return None
        pending = state.progress.pending
        blob = state.pending_weights()
        control = state.pending_control()
        manifest = _readable_manifest(pending, blob, control)
        if manifest is None or blob is None or control is None:
            log.warning("pending_update_unreadable", extra={"fields": {"agent": self._agent_id, "round": pending.round}})
            state.progress.pending = None
            state.save()
            return None
        return self._send_pending(pending, manifest, blob, control)

    def send_signed(self, manifest: Manifest, blob: bytes, tensors: Sequence[str], base_metrics: Mapping[str, float] | None) -> SubmitReceipt:
        """Send an update whose manifest the caller built and signed; not kept as pending."""
        return _receipt(self._stream(self._header(manifest, blob, tensors, base_metrics), blob))

    def already_submitted(self, model_cid: str) -> bool:
        """True when an update trained on `model_cid` was acknowledged (as remembered across restarts)."""
        return self._state is not None and self._state.progress.last_submitted_base == model_cid

    def _send_pending(self, pending: PendingUpdate, manifest: Manifest, blob: bytes, control: bytes = b"") -> SubmitReceipt:
        # SCAFFOLD's delta_c travels after the weights in the same stream (header.control_size says where)
        reply = self._stream(self._header(manifest, blob, pending.tensors, pending.base_metrics, control), blob + control)
        if self._state is not None:
            settle_pending(self._state, reply)
        receipt = _receipt(reply)
        log.info(
            "update_submitted",
            extra={"fields": {"agent": self._agent_id, "round": receipt.round, "update": receipt.update_cid, "duplicate": receipt.duplicate}},
        )
        return receipt

    def _stream(self, header: pb.UpdateHeader, blob: bytes) -> pb.SubmitUpdateReply:
        """SubmitUpdate to the home, retried (after a re-join) while it is unavailable."""

        def send() -> pb.SubmitUpdateReply:
            return self._session.stub().SubmitUpdate(stream_with_header(pb.UpdateChunk, header, blob), timeout=STREAM_TIMEOUT_S)

        try:
            with self._session.unless_closed():
                return retry_call(
                    send,
                    policy=self._policy,
                    retryable=is_retryable,
                    stop=self._session.closed,
                    before_retry=lambda _: self._session.rejoin("submit_unavailable"),
                )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc


def _readable_manifest(pending: PendingUpdate, blob: bytes | None, control: bytes | None = b"") -> Manifest | None:
    """The pending update's manifest, if it parses and names exactly `blob` as its weights (and
    `control` as its SCAFFOLD delta_c, when it names one)."""
    if blob is None or control is None:
        return None
    try:
        manifest = Manifest.from_bytes(pending.manifest.encode())
    except InvalidInput:
        return None
    if delta_control_cid(manifest.extra) != (cid_of(control) if control else ""):
        return None
    return manifest if manifest.weights == cid_of(blob) else None


def _receipt(reply: pb.SubmitUpdateReply) -> SubmitReceipt:
    """The receipt of an accepted update; SubmitRefused with the home's reason code otherwise."""
    if not reply.accepted:
        raise SubmitRefused(reply.message or reply.reason, reason=reply.reason)
    return SubmitReceipt(update_cid=reply.update_cid, round=reply.round, duplicate=reply.duplicate)
