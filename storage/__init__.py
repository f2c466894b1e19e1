"""Content-addressed model storage: safetensors codec, Kubo-compatible CIDs, content stores, signed manifests and lineage."""

from storage.cid import CidBuilder, cid_of, is_cid, validate_cid
from storage.codec import (
    MAX_HEADER_BYTES,
    CodecError,
    TensorInfo,
    TensorSummary,
    decode_tensors,
    decode_torch,
    encode_tensors,
    num_bytes,
    num_elements,
    summarize,
)
from storage.keys import KeyPair, verify_signature
from storage.lineage import LineageGraph, Problem, verify, walk
from storage.manifest import KINDS, SCHEMA, Manifest, ManifestError, Producer, now_rfc3339
from storage.models import load_manifest, load_model, save_model
from storage.open import open_store
from storage.store import ContentStore, LocalStore, default_store_path

__all__ = [
    "KINDS",
    "MAX_HEADER_BYTES",
    "SCHEMA",
    "CidBuilder",
    "CodecError",
    "ContentStore",
    "KeyPair",
    "LineageGraph",
    "LocalStore",
    "Manifest",
    "ManifestError",
    "Problem",
    "Producer",
    "TensorInfo",
    "TensorSummary",
    "cid_of",
    "decode_tensors",
    "decode_torch",
    "default_store_path",
    "encode_tensors",
    "is_cid",
    "load_manifest",
    "load_model",
    "now_rfc3339",
    "num_bytes",
    "num_elements",
    "open_store",
    "save_model",
    "summarize",
    "validate_cid",
    "verify",
    "verify_signature",
    "walk",
]
