"""Model manifests (schema "strata/model/1"): what a model is, where it came from, who made it.

A model is two stored objects: its safetensors weights blob and this manifest,
a small canonical JSON object (sorted keys, no spaces, UTF-8) naming the
weights CID, its parents' CIDs and the rest. The model's ID is the manifest's
CID, so changing any byte of a model or of anything in its lineage changes the
IDs above it.

The producer's ed25519 signature covers the canonical bytes of every field
except ``signature`` itself (`signing_bytes`), the embedded certificate included.

``certificate`` (optional): the PEM certificate from the fleet CA that certifies
the signing key for the producer (its SAN names the producer's role and id, its
manifest-key extension the key in ``signature.public_key``). A producer with a
fleet certificate embeds it whenever it signs (`signed` takes it from a
certified `KeyPair`), so anyone holding the fleet CA can check offline who
signed what (`trust.signers`). A manifest without one has no ``certificate``
key at all, so manifests written before it, and manifests of fleets without a
CA, keep their bytes and their CIDs. The CID covers the bytes as
stored (`to_bytes`), signature included. A manifest built in code serializes
canonically; one parsed by `from_bytes` keeps the exact bytes it was parsed
from, so its `cid` is always the CID those bytes are stored under, even if a
foreign writer did not serialize canonically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from proto.errors import IntegrityError, InvalidInput
from storage.cid import cid_of, is_cid
from storage.codec import CodecError, TensorInfo, strict_json
from storage.keys import KEY_TYPE, KeyPair, verify_signature

__all__ = [
    "KINDS",
    "SCHEMA",
    "Manifest",
    "ManifestError",
    "Producer",
    "DEVICE_UPDATE_KINDS",
    "MAX_METRICS",
    "MAX_METRIC_NAME_CHARS",
    "canonical_json",
    "now_rfc3339",
    "timestamp",
]

SCHEMA = "strata/model/1"
# proposal: a fork's model offered back to its source federation (parents: the target's base, the model);
# merge: an accepted proposal's weighted average of the shared tensors, the target's new base (coordinator/hub.py);
# "control": a cluster's SCAFFOLD server variate c (storage.control), served to its agents like a model
KINDS = ("base", "local", "relay", "cluster", "semi-global", "fork", "proposal", "merge", "control")
# a device's own update and a relay's combined one: private to the receiver, never served to other devices
DEVICE_UPDATE_KINDS = ("local", "relay")
# a PEM certificate is about 1 KiB; this leaves room for long SANs and nothing more
MAX_CERTIFICATE_CHARS = 16384
# a metrics map is a summary, not a place to store a stranger's megabytes (100,000 keys were once accepted)
MAX_METRICS = 128
MAX_METRIC_NAME_CHARS = 128
_PEM_CERTIFICATE = re.compile(r"^-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?$")

_FEDERATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
_FIELDS = (
    "schema", "kind", "federation", "round", "producer", "weights", "tensors", "parents",
    "base", "num_samples", "metrics", "algorithm", "extra", "created_at", "certificate", "signature",
)  # fmt: skip
_REQUIRED = ("schema", "kind", "federation", "round", "producer", "weights", "tensors")


class ManifestError(InvalidInput):
    """A manifest that does not follow the schema; the message names the field."""

    reason = "invalid_manifest"


def _bad(name: str, expected: str) -> ManifestError:
    return ManifestError(f"manifest field {name!r}: {expected}")


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity: the bytes manifests are hashed as."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def rfc3339(timestamp: float) -> str:
    """A POSIX timestamp as UTC RFC 3339 with milliseconds, e.g. "2026-11-24T01:02:03.456Z"."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with milliseconds."""
    return rfc3339(time.time())


def timestamp(text: str) -> float:
    """POSIX seconds of an RFC 3339 UTC time as manifests write it ("...Z", up to 9 fraction digits)."""
    body = text[:-1] if text.endswith("Z") else text
    head, dot, fraction = body.partition(".")
    return datetime.fromisoformat(f"{head}.{fraction[:6]}" if dot else head).replace(tzinfo=UTC).timestamp()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_json_value(value: Any, where: str) -> None:
    """Refuse anything canonical JSON cannot carry faithfully."""
    if value is None or isinstance(value, str | bool) or _is_int(value):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(where, "NaN and infinities are not allowed in JSON")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(where, f"object keys must be strings, got {key!r}")
            _check_json_value(item, f"{where}.{key}")
        return
    raise _bad(where, f"{type(value).__name__} is not a JSON value")


def _json_copy(value: Any) -> Any:
    """A deep copy through JSON, so the manifest does not share mutable state with its caller."""
    return json.loads(canonical_json(value))


@dataclass(frozen=True, kw_only=True)
class Producer:
    """Who wrote a model: a role ("agent", "aggregator", "relay", "operator", ...) and an id."""

    role: str
    id: str

    def __post_init__(self) -> None:
        for name in ("role", "id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 256:
                raise _bad(f"producer.{name}", "expected a non-empty string of at most 256 chars")

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """One model's metadata. Treat instances as read-only: `cid` is computed once."""

    kind: str
    federation: str
    round: int
    producer: Producer
    weights: str
    tensors: dict[str, TensorInfo]
    parents: tuple[str, ...] = ()
    base: str | None = None
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    algorithm: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=now_rfc3339)
    certificate: str | None = None
    signature: dict[str, str] | None = None
    schema: str = SCHEMA
    # The exact bytes this manifest was parsed from, if any (see the module docstring).
    _stored: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise _bad("schema", f"expected {SCHEMA!r}, got {self.schema!r}")
        if self.kind not in KINDS:
            raise _bad("kind", f"expected one of {', '.join(KINDS)}; got {self.kind!r}")
        if not isinstance(self.federation, str) or not _FEDERATION.match(self.federation):
            raise _bad(
                "federation",
                "expected 1-128 characters of letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit; got {self.federation!r}",
            )
        if not _is_int(self.round) or self.round < 0:
            raise _bad("round", f"expected a non-negative integer, got {self.round!r}")
        if not isinstance(self.producer, Producer):
            raise _bad("producer", "expected a Producer")
        if not is_cid(self.weights):
            raise _bad("weights", f"expected a CID, got {self.weights!r}")
        self._set("tensors", self._checked_tensors(self.tensors))
        if isinstance(self.parents, str) or not isinstance(self.parents, list | tuple):
            raise _bad("parents", "expected a list of CIDs")
        parents = tuple(self.parents)
        for index, parent in enumerate(parents):
            if not is_cid(parent):
                raise _bad(f"parents[{index}]", f"expected a CID, got {parent!r}")
        if len(set(parents)) != len(parents):
            raise _bad("parents", "lists the same CID more than once")
        self._set("parents", parents)
        if self.base is not None and not is_cid(self.base):
            raise _bad("base", f"expected a CID or null, got {self.base!r}")
        if not _is_int(self.num_samples) or self.num_samples < 0:
            raise _bad("num_samples", f"expected a non-negative integer, got {self.num_samples!r}")
        self._set("metrics", self._checked_metrics(self.metrics))
        for name in ("algorithm", "extra"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise _bad(name, "expected a JSON object")
            _check_json_value(dict(value), name)
            self._set(name, _json_copy(dict(value)))
        if self.algorithm and not isinstance(self.algorithm.get("name"), str):
            raise _bad("algorithm.name", "expected a string naming the algorithm")
        self._check_created_at()
        if self.certificate is not None:
            self._check_certificate(self.certificate)
        if self.signature is not None:
            self._set("signature", self._checked_signature(self.signature))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @staticmethod
    def _checked_tensors(tensors: Any) -> dict[str, TensorInfo]:
        if not isinstance(tensors, Mapping):
            raise _bad("tensors", "expected an object mapping tensor names to {dtype, shape}")
        checked: dict[str, TensorInfo] = {}
        for name in sorted(tensors):
            info = tensors[name]
            if not isinstance(name, str) or not name:
                raise _bad("tensors", f"tensor names must be non-empty strings, got {name!r}")
            if isinstance(info, TensorInfo):
                try:
                    info = TensorInfo.from_json(info.to_json())  # re-checks dtype and shape
                except CodecError as exc:
                    raise _bad(f"tensors.{name}", str(exc)) from None
            else:
                raise _bad(f"tensors.{name}", "expected a TensorInfo")
            checked[name] = info
        return checked

    @staticmethod
    def _checked_metrics(metrics: Any) -> dict[str, float]:
        if not isinstance(metrics, Mapping):
            raise _bad("metrics", "expected an object mapping names to numbers")
        if len(metrics) > MAX_METRICS:
            raise _bad("metrics", f"at most {MAX_METRICS} metrics, got {len(metrics)}")
        checked: dict[str, float] = {}
        for name in sorted(metrics, key=str):
            value = metrics[name]
            if not isinstance(name, str) or not name:
                raise _bad("metrics", f"metric names must be non-empty strings, got {name!r}")
            if len(name) > MAX_METRIC_NAME_CHARS:
                raise _bad("metrics", f"metric names are at most {MAX_METRIC_NAME_CHARS} characters, got {len(name)}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _bad(f"metrics.{name}", f"expected a finite number, got {value!r}")
            if not math.isfinite(value):
                raise _bad(f"metrics.{name}", f"expected a finite number, got {value!r}")
            checked[name] = float(value)
        return checked

    def _check_created_at(self) -> None:
        value = self.created_at
        if isinstance(value, str) and _RFC3339_UTC.match(value):
            try:
                # fromisoformat handles at most 6 fractional digits; the regex allows 9.
                datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value[:-1]))
                return
            except ValueError:
                pass
        raise _bad(
            "created_at",
            f"expected an RFC 3339 UTC time like '2026-11-24T01:02:03.456Z', got {value!r}",
        )

    @staticmethod
    def _check_certificate(value: Any) -> None:
        if (
            not isinstance(value, str)
            or len(value) > MAX_CERTIFICATE_CHARS
            or not _PEM_CERTIFICATE.match(value)
        ):
            raise _bad("certificate", "expected one PEM certificate (-----BEGIN CERTIFICATE-----...)")

    @staticmethod
    def _checked_signature(signature: Any) -> dict[str, str]:
        if not isinstance(signature, Mapping) or set(signature) != {"alg", "public_key", "sig"}:
            raise _bad("signature", "expected an object with keys 'alg', 'public_key', 'sig'")
        if signature["alg"] != KEY_TYPE:
            raise _bad("signature.alg", f"expected {KEY_TYPE!r}, got {signature['alg']!r}")
        for key in ("public_key", "sig"):
            if not isinstance(signature[key], str) or not signature[key]:
                raise _bad(f"signature.{key}", "expected a base64 string")
        return dict(signature)

    # ------------------------------------------------------------ serialization

    def to_json(self, *, include_signature: bool = True) -> dict[str, Any]:
        """The manifest as a JSON object (what `to_bytes` serializes canonically)."""
        record: dict[str, Any] = {
            "algorithm": self.algorithm,
            "base": self.base,
            "created_at": self.created_at,
            "extra": self.extra,
            "federation": self.federation,
            "kind": self.kind,
            "metrics": self.metrics,
            "num_samples": self.num_samples,
            "parents": list(self.parents),
            "producer": self.producer.to_json(),
            "round": self.round,
            "schema": self.schema,
            "tensors": {name: info.to_json() for name, info in self.tensors.items()},
            "weights": self.weights,
        }
        if self.certificate is not None:
            record["certificate"] = self.certificate
        if include_signature:
            record["signature"] = self.signature
        return record

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def signing_bytes(self) -> bytes:
        """Canonical bytes of every field but `signature`: what the producer signs."""
        return canonical_json(self.to_json(include_signature=False))

    def to_bytes(self) -> bytes:
        """The bytes to store: canonical JSON, or the exact bytes this was parsed from."""
        return self._stored if self._stored is not None else self.canonical_bytes()

    @cached_property
    def cid(self) -> str:
        """The model ID: the CID of `to_bytes()`."""
        return cid_of(self.to_bytes())

    def __hash__(self) -> int:
        return hash(self.cid)

    @classmethod
    def from_json(cls, record: Any) -> Manifest:
        """Build from a parsed JSON object; ManifestError names the first bad field."""
        if not isinstance(record, dict):
            raise ManifestError("manifest: expected a JSON object")
        for name in record:
            if name not in _FIELDS:
                raise _bad(name, f"unknown field (schema {SCHEMA!r})")
        for name in _REQUIRED:
            if name not in record:
                raise _bad(name, "missing")
        producer = record["producer"]
        if not isinstance(producer, dict) or set(producer) != {"role", "id"}:
            raise _bad("producer", "expected an object with keys 'role' and 'id'")
        tensors = record["tensors"]
        if not isinstance(tensors, dict):
            raise _bad("tensors", "expected an object mapping tensor names to {dtype, shape}")
        infos: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            try:
                infos[name] = TensorInfo.from_json(info)
            except CodecError as exc:
                raise _bad(f"tensors.{name}", str(exc)) from None
        parents = record.get("parents", [])
        if not isinstance(parents, list):
            raise _bad("parents", "expected a list of CIDs")
        optional = {
            name: record[name]
            for name in ("base", "num_samples", "metrics", "algorithm", "extra", "created_at")
            if name in record
        }
        if "created_at" not in optional:
            raise _bad("created_at", "missing")
        if "certificate" in record:
            # present means a certificate: an explicit null would sign differently than it serializes
            Manifest._check_certificate(record["certificate"])
            optional["certificate"] = record["certificate"]
        return cls(
            schema=record["schema"],
            kind=record["kind"],
            federation=record["federation"],
            round=record["round"],
            producer=Producer(**producer),
            weights=record["weights"],
            tensors=infos,
            parents=tuple(parents),
            signature=record.get("signature"),
            **optional,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Parse and validate stored manifest bytes (any valid JSON layout is accepted;
        the manifest's `cid` is the CID of exactly these bytes)."""
        raw = bytes(data)
        try:
            record = strict_json(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"manifest is not valid UTF-8 JSON: {exc}") from None
        manifest = cls.from_json(record)
        object.__setattr__(manifest, "_stored", raw)
        return manifest

    # ------------------------------------------------------------ signatures

    def signed(self, key: KeyPair) -> Manifest:
        """A copy of this manifest signed by `key` (any previous signature is replaced).

        A certified `key` embeds its certificate first, so the signature covers it; a bare
        key leaves `certificate` as it is."""
        certificate = key.certificate
        unsigned = dataclasses.replace(
            self, signature=None, certificate=certificate if certificate is not None else self.certificate
        )
        signature = {
            "alg": KEY_TYPE,
            "public_key": key.public_key,
            "sig": key.sign(unsigned.signing_bytes()),
        }
        return dataclasses.replace(unsigned, signature=signature)

    def verify_signature(self) -> None:
        """Raise IntegrityError: reason "unsigned" without a signature, "bad_signature" if it
        does not verify over `signing_bytes()` under the key it names."""
        if self.signature is None:
            raise IntegrityError(f"manifest {self.cid} is not signed", reason="unsigned")
        try:
            verify_signature(
                self.signature["public_key"], self.signing_bytes(), self.signature["sig"]
            )
        except IntegrityError as exc:
            raise IntegrityError(f"manifest {self.cid}: {exc}", reason="bad_signature") from None
