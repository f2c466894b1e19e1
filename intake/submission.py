"""An update as it arrives, the header checks every receiver makes first, and its manifest.

A `Submission` is what the service hands the intake: the SubmitUpdate header's
fields plus the weight bytes. `check_header` refuses a malformed header before
anything is hashed twice or stored; `update_manifest` checks the sender's own
signed manifest against the header (or, for a sender that sent none, records
one under the receiver's key). Pure functions: no store, no journal, no grpc.

With TLS the service also hands over the caller's certificate and how the server
judges signers (`trust.interceptor.caller_certificate()` and `current_signers()`,
read on the event loop: they do not follow the work into the thread pool). A
sender's manifest then counts only if its producer is the caller (role and id;
refused ``not_producer``) and it is signed by the caller's certified manifest key
with that certificate embedded, issued by the fleet CA, valid at its
``created_at`` and not revoked (refused ``uncertified_signer``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from intake.validation import UpdateLimits, check_size
from proto.errors import Refusal, StrataError, UpdateRefused
from storage.cid import cid_of, is_cid
from storage.codec import CodecError, summarize
from storage.control import MANIFEST_KEY as SCAFFOLD_KEY
from storage.control import delta_control_cid
from storage.keys import KeyPair
from storage.manifest import MAX_METRIC_NAME_CHARS, MAX_METRICS, Manifest, Producer, rfc3339
from storage.store import StagedWrite
from trust.identity import Certified
from trust.signers import SignerError, Signers

# SQLite integers are signed 64-bit; a larger claim is refused as a malformed header, not an overflow
MAX_NUM_SAMPLES = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class Submission:
    """An update as the service hands it over: header fields plus the weight bytes."""

    agent_id: str
    round: int
    base_cid: str
    num_samples: int
    weights: bytes
    federation: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    base_metrics: Mapping[str, float] = field(default_factory=dict)
    tensors: tuple[str, ...] = ()
    weights_cid: str = ""
    kind: str = "local"
    parents: tuple[str, ...] = ()
    manifest: bytes = b""
    # how `weights` are encoded (storage.encodings): "" or "float32" is the weights themselves
    encoding: str = ""
    # the CID the receiving service computed from these bytes as they arrived (saves a pass)
    received_cid: str = ""
    # the same bytes, already written to the store as they arrived (saves the write after)
    staged: StagedWrite | None = None
    # with TLS: who sent it (their certificate) and how this server judges manifest signers
    caller: Certified | None = None
    signers: Signers | None = None
    # SCAFFOLD: the agent's control-variate update delta_c (float32 safetensors) and the header's CID for it
    control: bytes = b""
    control_cid: str = ""


@dataclass(frozen=True, kw_only=True)
class SubmitResult:
    update_cid: str
    round: int
    duplicate: bool


def check_header(sub: Submission, limits: UpdateLimits, *, kinds: tuple[str, ...]) -> str:
    """The header checks every receiver of updates makes first; returns the weights' CID."""
    if not sub.agent_id:
        raise UpdateRefused("agent_id is empty", reason=Refusal.BAD_HEADER)
    if not is_cid(sub.base_cid):
        raise UpdateRefused(f"base_cid is not a CID: {sub.base_cid[:80]!r}", reason=Refusal.BAD_HEADER)
    if not 0 < sub.num_samples <= MAX_NUM_SAMPLES:
        raise UpdateRefused(f"num_samples must be in 1..2^63-1, got {sub.num_samples}", reason=Refusal.BAD_HEADER)
    for field_name, metrics in (("metrics", sub.metrics), ("base_metrics", sub.base_metrics)):
        if len(metrics) > MAX_METRICS:
            raise UpdateRefused(f"{field_name} has {len(metrics)} entries; at most {MAX_METRICS}", reason=Refusal.BAD_METRICS)
        longest = max(map(len, metrics), default=0)
        if longest > MAX_METRIC_NAME_CHARS:
            raise UpdateRefused(
                f"{field_name} has a name of {longest} characters; at most {MAX_METRIC_NAME_CHARS}", reason=Refusal.BAD_METRICS
            )
    if sub.kind not in kinds:
        raise UpdateRefused(f"update kind must be one of {list(kinds)}, got {sub.kind!r}", reason=Refusal.BAD_HEADER)
    check_size(len(sub.weights), limits)
    weights_cid = sub.received_cid or cid_of(sub.weights)
    if sub.weights_cid and sub.weights_cid != weights_cid:
        raise UpdateRefused(f"weights hash to {weights_cid}, header says {sub.weights_cid}", reason=Refusal.HASH_MISMATCH)
    return weights_cid


# the header fields a sender's manifest must repeat exactly
_MANIFEST_FIELDS = ("kind", "federation", "round", "weights", "base", "num_samples", "producer.id")


def update_manifest(
    sub: Submission,
    weights_cid: str,
    *,
    federation: str,
    recorder: str,
    key: KeyPair,
    clock: Callable[[], float] = time.time,
) -> Manifest:
    """The sender's own signed manifest, checked against the header; or, when it sent none,
    one recorded under the receiver's key (with `extra.recorded_by`)."""
    if not sub.manifest:
        return Manifest(
            kind=sub.kind,
            federation=federation,
            round=sub.round,
            producer=Producer(role="agent" if sub.kind == "local" else "relay", id=sub.agent_id),
            weights=weights_cid,
            tensors=summarize(sub.weights),
            parents=tuple(sub.parents),
            base=sub.base_cid,
            num_samples=sub.num_samples,
            metrics=dict(sub.metrics),
            extra={
                "recorded_by": recorder,
                **encoding_extra(sub.encoding),
                **({SCAFFOLD_KEY: {"delta_c": cid_of(sub.control)}} if sub.control else {}),
            },
            created_at=rfc3339(clock()),
        ).signed(key)
    try:
        manifest = Manifest.from_bytes(sub.manifest)
        manifest.verify_signature()
    except StrataError as exc:
        raise UpdateRefused(f"update manifest: {exc}", reason=Refusal.BAD_MANIFEST) from None
    if sub.caller is not None:
        _check_certified_signer(manifest, sub.caller, sub.signers)
    expected = (sub.kind, federation, sub.round, weights_cid, sub.base_cid, sub.num_samples, sub.agent_id)
    actual = (
        manifest.kind,
        manifest.federation,
        manifest.round,
        manifest.weights,
        manifest.base,
        manifest.num_samples,
        manifest.producer.id,
    )
    wrong = [name for name, want, got in zip(_MANIFEST_FIELDS, expected, actual, strict=True) if want != got]
    if manifest.parents != tuple(sub.parents):
        wrong.append("parents")
    if manifest.extra.get("encoding", "float32") != (sub.encoding or "float32"):
        wrong.append("extra.encoding")
    if delta_control_cid(manifest.extra) != (cid_of(sub.control) if sub.control else ""):
        wrong.append("extra.scaffold.delta_c")
    try:
        held = summarize(sub.weights)
    except CodecError as exc:
        raise UpdateRefused(str(exc), reason=Refusal.INVALID_SAFETENSORS) from None
    if manifest.tensors != held:  # lineage would later find it naming tensors its weights do not hold
        wrong.append("tensors")
    if wrong:
        raise UpdateRefused(f"update manifest disagrees with the header on {wrong}", reason=Refusal.BAD_MANIFEST)
    return manifest


def encoding_extra(encoding: str) -> dict[str, str]:
    """The manifest `extra` entry that records an update's encoding; none for float32, so the manifests of
    unencoded updates keep the bytes (and CIDs) they always had."""
    return {"encoding": encoding} if encoding and encoding != "float32" else {}


def _check_certified_signer(manifest: Manifest, caller: Certified, signers: Signers | None) -> None:
    """The manifest counts only if the caller produced it and signed it with its certified key."""
    producer, identity = manifest.producer, caller.identity
    if (producer.role, producer.id) != (identity.role.value, identity.id):
        raise UpdateRefused(
            f"update manifest names producer {producer.role}/{producer.id}, but the caller is {identity}",
            reason=Refusal.NOT_PRODUCER,
        )
    assert manifest.signature is not None  # verify_signature passed
    if manifest.signature["public_key"] != caller.manifest_key:
        raise UpdateRefused(
            f"update manifest is signed by a key that is not {identity}'s certified manifest key",
            reason=Refusal.UNCERTIFIED_SIGNER,
        )
    if signers is not None:
        try:
            signer = signers.check(manifest)
        except SignerError as exc:
            raise UpdateRefused(
                f"update manifest's signer does not count ({exc.reason}): {exc}", reason=Refusal.UNCERTIFIED_SIGNER
            ) from None
        if signer.certified.identity != identity:
            raise UpdateRefused(
                f"update manifest embeds the certificate of {signer.certified.identity}, not the caller's ({identity})",
                reason=Refusal.UNCERTIFIED_SIGNER,
            )
