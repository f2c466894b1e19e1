"""Getting models from the home: GetModel, the checks on what arrives, and the one model held.

An aggregator (or relay) is not trusted to serve what it announced: a model
counts only if its manifest bytes hash to the model CID asked for, its weights
hash to the CID the manifest names, and the manifest's signature verifies
(`verify_model`). Anything else is an IntegrityError, and nothing of it is kept
or handed to a trainer.

`ModelTransfer` keeps the last verified model, so asking again for the model it
holds costs nothing, and asking for the current base sends `if_none_match`.
"""

from __future__ import annotations

import grpc
import numpy as np

from agent.session import Session
from proto import strata_pb2 as pb
from proto.errors import IntegrityError
from proto.wire import STREAM_TIMEOUT_S, error_from_rpc, read_header_stream
from storage.cid import cid_of
from storage.codec import decode_tensors
from storage.manifest import Manifest

MAX_MODEL_BYTES = 4 << 30

HeldModel = tuple[Manifest, dict[str, np.ndarray]]


def verify_model(header: pb.ModelHeader, weights: bytes, *, asked_for: str = "") -> Manifest:
    """The manifest of a served model, once every check passed; IntegrityError otherwise.

    `asked_for` is the model CID requested ("" when asking for the current base).
    """
    if asked_for and header.model_cid != asked_for:
        raise IntegrityError(f"asked for model {asked_for}, was served {header.model_cid}", reason="wrong_model")
    if cid_of(header.manifest) != header.model_cid:
        raise IntegrityError(f"manifest bytes do not hash to {header.model_cid}", reason="hash_mismatch")
    manifest = Manifest.from_bytes(header.manifest)
    if cid_of(weights) != manifest.weights:
        raise IntegrityError(f"weights of {header.model_cid} do not hash to {manifest.weights}", reason="hash_mismatch")
    manifest.verify_signature()
    return manifest


class ModelTransfer:
    """Downloads through a `Session`, verified, counting the bytes."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.held: HeldModel | None = None
        self.bytes_downloaded = 0

    def fetch(self, model_cid: str, *, if_none_match: str = "") -> tuple[Manifest, bytes] | None:
        """GetModel from the home (default: its current base), verified; None when not modified."""
        identity = self._session.identity
        request = pb.GetModelRequest(
            model_cid=model_cid, if_none_match=if_none_match, federation=identity.federation, agent_id=identity.agent_id
        )
        try:
            with self._session.unless_closed():
                stream = self._session.stub().GetModel(request, timeout=STREAM_TIMEOUT_S)
                header, weights = read_header_stream(stream, size_of=lambda h: h.weights_size, max_size=MAX_MODEL_BYTES)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        if header.not_modified:
            if not if_none_match:
                raise IntegrityError("the home answered 'not modified' to a request without if_none_match", reason="bad_reply")
            return None
        manifest = verify_model(header, weights, asked_for=model_cid)
        self.bytes_downloaded += len(weights)
        return manifest, weights

    def download(self, model_cid: str = "") -> HeldModel:
        """A model's manifest and tensors (default: the current base), fetched unless it is the one held."""
        held = self.held
        if held is not None and model_cid and held[0].cid == model_cid:
            return held
        # if_none_match only for the current base: a model asked for by CID is known not to be the held one
        fetched = self.fetch(model_cid, if_none_match=held[0].cid if held is not None and not model_cid else "")
        if fetched is None:
            assert held is not None
            return held
        manifest, weights = fetched
        self.held = (manifest, decode_tensors(weights))
        return self.held

    def fetch_model_bytes(self, model_cid: str = "") -> tuple[Manifest, bytes]:
        """A model's verified manifest and raw weight bytes, without holding it."""
        fetched = self.fetch(model_cid)
        assert fetched is not None  # without if_none_match, fetch never answers "not modified"
        return fetched
