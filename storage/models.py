"""Whole models in a store: the weights blob plus its signed manifest, addressed by the manifest's CID."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proto.errors import IntegrityError
from storage.codec import summarize
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from storage.store import ContentStore

__all__ = ["load_manifest", "load_model", "save_model"]


def save_model(
    store: ContentStore,
    *,
    weights: bytes,
    kind: str,
    federation: str,
    round: int,
    producer: Producer,
    key: KeyPair | None,
    parents: Iterable[str] = (),
    base: str | None = None,
    num_samples: int = 0,
    metrics: Mapping[str, float] | None = None,
    algorithm: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    created_at: str | None = None,
) -> Manifest:
    """Validate and store `weights` (safetensors bytes) and a manifest for them, signed by
    `key` when given. Returns the manifest; its `.cid` is the model ID.

    The weights are stored first (one hashing pass); if the manifest fields are then
    refused, the blob stays behind unreferenced, which is harmless in a content store.
    """
    tensors = summarize(weights)  # CodecError before anything is stored
    weights_cid = store.put(weights)
    manifest = Manifest(
        kind=kind,
        federation=federation,
        round=round,
        producer=producer,
        weights=weights_cid,
        tensors=tensors,
        parents=tuple(parents),
        base=base,
        num_samples=num_samples,
        metrics=dict(metrics or {}),
        algorithm=dict(algorithm or {}),
        extra=dict(extra or {}),
        **({"created_at": created_at} if created_at is not None else {}),
    )
    if key is not None:
        manifest = manifest.signed(key)
    stored_cid = store.put(manifest.to_bytes())
    if stored_cid != manifest.cid:
        raise IntegrityError(
            f"store {store!r} filed manifest {manifest.cid} as {stored_cid}",
            reason="hash_mismatch",
        )
    return manifest


def load_manifest(store: ContentStore, model_cid: str) -> Manifest:
    """The manifest stored under `model_cid` (hash-verified by the store, schema-validated;
    the signature is not checked here: see Manifest.verify_signature and storage.lineage)."""
    return Manifest.from_bytes(store.get(model_cid))


def load_model(store: ContentStore, model_cid: str) -> tuple[Manifest, bytes]:
    """The manifest and weights of a model. The store verifies both hashes; the weights'
    header must also match the tensors the manifest lists (IntegrityError "weights_mismatch")."""
    manifest = load_manifest(store, model_cid)
    weights = store.get(manifest.weights)
    if summarize(weights) != manifest.tensors:
        raise IntegrityError(
            f"model {model_cid}: weights {manifest.weights} do not hold the tensors its manifest lists",
            reason="weights_mismatch",
        )
    return manifest, weights
