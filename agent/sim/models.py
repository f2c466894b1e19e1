"""Models as 10,000 devices receive them: every download checked, each model decoded once.

Every device downloads its base over the wire like an agent does, and nothing it
was served counts unless it is the model asked for. What costs the same for
every device is done once per model CID and shared:

- the first time a model CID is served, `agent.transfer.verify_model` runs in
  full (manifest bytes hash to the model CID, weights hash to the manifest's
  weights CID, the producer's signature verifies), and the weights are decoded
  into read-only arrays that every device trains from;
- after that, a download counts if its manifest and weight bytes are *equal* to
  the bytes already verified for that CID. Equal bytes hash equally, so this is
  the same check as re-hashing, at memcmp speed; anything else is an
  IntegrityError, as it is for an agent.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from agent.transfer import verify_model
from proto import strata_pb2 as pb
from proto.errors import IntegrityError
from storage.codec import decode_tensors
from storage.manifest import Manifest

# models kept decoded; devices still holding an evicted one keep their reference
KEEP_MODELS = 4


@dataclass(frozen=True, eq=False)
class SharedModel:
    """One verified model: its manifest, its exact bytes, and its tensors (read-only, shared)."""

    manifest: Manifest
    manifest_bytes: bytes
    weights: bytes
    tensors: dict[str, np.ndarray]

    @property
    def cid(self) -> str:
        return self.manifest.cid


class ModelCache:
    """Verified, decoded models by model CID."""

    def __init__(self, *, keep: int = KEEP_MODELS) -> None:
        self._keep = keep
        self._models: OrderedDict[str, SharedModel] = OrderedDict()
        self.decodes = 0  # models verified in full and decoded
        self.hits = 0  # downloads matched against a model already verified

    def admit(self, header: pb.ModelHeader, weights: bytes, *, asked_for: str = "") -> SharedModel:
        """The model a device was served, once it checks out; IntegrityError otherwise."""
        if asked_for and header.model_cid != asked_for:
            raise IntegrityError(f"asked for model {asked_for}, was served {header.model_cid}", reason="wrong_model")
        known = self._models.get(header.model_cid)
        if known is not None:
            if header.manifest != known.manifest_bytes:
                raise IntegrityError(f"manifest bytes do not hash to {header.model_cid}", reason="hash_mismatch")
            if weights != known.weights:
                raise IntegrityError(
                    f"weights of {header.model_cid} do not hash to {known.manifest.weights}", reason="hash_mismatch"
                )
            self._models.move_to_end(header.model_cid)
            self.hits += 1
            return known
        manifest = verify_model(header, weights, asked_for=asked_for)
        tensors = decode_tensors(weights)
        for array in tensors.values():
            array.setflags(write=False)  # shared by every device: a trainer must copy, never write
        model = SharedModel(manifest=manifest, manifest_bytes=bytes(header.manifest), weights=weights, tensors=tensors)
        self._models[header.model_cid] = model
        while len(self._models) > self._keep:
            self._models.popitem(last=False)
        self.decodes += 1
        return model

    def __contains__(self, model_cid: object) -> bool:
        return model_cid in self._models
