"""The model hub: the federation registry, release tags and proposals, kept by the coordinator.

A *federation* is a named model family: a description, the task it trains (if a
built-in one), the tensor spec of its base model (names, dtypes, shapes), its
owners, round-policy and strategy defaults, and its current base. Its heads (each
aggregator's newest semi-global, else cluster, model of it) are read from the model
index whenever a federation is read, so they are never stale here.

A *release* names one indexed model ``NAME@1.2.0`` (semantic versioning 2.0.0). It is
a signed tag (`ReleaseTag`, canonical JSON signed like a manifest, by the caller's
certified manifest key with TLS), immutable once made: the same tag again is
refused with ALREADY_EXISTS ``release_exists``. `resolve` answers ``NAME@1.2.0``,
``NAME@latest`` (the highest release, pre-releases only if there is nothing else) and
``NAME@^1.0`` (the highest release compatible with 1.0: same major, or same minor
below 1.0; never a pre-release).

A *fork* is a federation whose base is a ``fork`` manifest naming the source model as
its parent; a *proposal* is a ``proposal`` manifest whose parents are the target's
base and the proposed model; accepting it records the ``merge`` manifest the
owner built (the CLI averages the weights in the store) as the target's new base.
The hub holds manifests only through the index: weights never reach the coordinator.

Every field from the wire is bounded and refused with a specific reason before it
reaches SQLite (see the MAX_* constants). One SQLite file through `storage.durable`;
imports no gRPC.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.index import ModelIndex, ModelRecord, base_of
from proto.errors import Conflict, FailedPrecondition, IntegrityError, InvalidInput, NotFound
from storage.cid import is_cid
from storage.codec import strict_json
from storage.durable import DurableSqlite
from storage.keys import KEY_TYPE, KeyPair, verify_signature
from storage.manifest import Manifest, canonical_json, now_rfc3339, timestamp
from trust.errors import PermissionDenied
from trust.identity import Certified
from trust.signers import SignerError, Signers

__all__ = [
    "MAX_DESCRIPTION_CHARS",
    "RELEASE_SCHEMA",
    "Federation",
    "Hub",
    "Proposal",
    "Release",
    "ReleaseTag",
    "TensorSpec",
    "Version",
    "check_tag",
    "parse_ref",
]

RELEASE_SCHEMA = "strata/release/1"
MAX_DESCRIPTION_CHARS = 4096
MAX_NOTES_CHARS = 4096
MAX_OWNERS = 32
MAX_OWNER_CHARS = 256
MAX_POLICY_KEYS = 32
MAX_POLICY_KEY_CHARS = 64
MAX_POLICY_VALUE_CHARS = 1024
MAX_NAME_CHARS = 128
MAX_VERSION_CHARS = 64
MAX_EVALUATION_CHARS = 128
MAX_REF_CHARS = MAX_NAME_CHARS + 1 + MAX_VERSION_CHARS + 1
MAX_TAG_BYTES = 64 << 10
# a manifest handed to the hub is one small JSON object; its tensor list is the bulk of it
MAX_MANIFEST_BYTES = 4 << 20
# the longest parent chain walked for a release's lineage root (one step per round)
MAX_ROOT_STEPS = 100_000
PROPOSAL_STATES = ("open", "accepted", "declined")
# a federation's base model is one of these kinds; a merge only arrives by accepting a proposal
BASE_KINDS = ("base", "fork")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_IDENT = r"(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    rf"(?:-({_IDENT}(?:\.{_IDENT})*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
_CARET = re.compile(r"^\^(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS federations (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    task TEXT NOT NULL,
    base TEXT NOT NULL,
    spec TEXT NOT NULL,
    owners TEXT NOT NULL,
    round_policy TEXT NOT NULL,
    strategy TEXT NOT NULL,
    forked_from TEXT NOT NULL,
    source_federation TEXT NOT NULL,
    fork_layers TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    federation TEXT NOT NULL,
    version TEXT NOT NULL,
    model TEXT NOT NULL,
    lineage_root TEXT NOT NULL,
    released_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    tag BLOB NOT NULL,
    PRIMARY KEY (federation, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS proposals (
    cid TEXT PRIMARY KEY,
    from_federation TEXT NOT NULL,
    to_federation TEXT NOT NULL,
    model TEXT NOT NULL,
    target_head TEXT NOT NULL,
    state TEXT NOT NULL,
    proposed_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    decided_by TEXT NOT NULL,
    decided_at REAL NOT NULL,
    merge TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS proposals_by_target ON proposals (to_federation, created_at);
"""


# ---------------------------------------------------------------- values


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Federation:
    name: str
    description: str = ""
    task: str = ""
    base: str = ""
    spec: tuple[TensorSpec, ...] = ()
    owners: tuple[str, ...] = ()
    round_policy: dict[str, str] = field(default_factory=dict)
    strategy: str = ""
    forked_from: str = ""
    source_federation: str = ""
    fork_layers: str = ""
    heads: dict[str, str] = field(default_factory=dict)
    created_by: str = ""
    created_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Release:
    federation: str
    version: str
    model: str
    notes: str = ""
    evaluation: str = ""
    accuracy: float | None = None
    lineage_root: str = ""
    released_by: str = ""
    created_at: float = 0.0
    tag: bytes = field(default=b"", repr=False)

    @property
    def ref(self) -> str:
        return f"{self.federation}@{self.version}"


@dataclass(frozen=True, kw_only=True)
class Proposal:
    cid: str
    from_federation: str
    to_federation: str
    model: str
    target_head: str
    state: str = "open"
    proposed_by: str = ""
    created_at: float = 0.0
    decided_by: str = ""
    decided_at: float = 0.0
    merge: str = ""


@dataclass(frozen=True, order=True)
class Version:
    """A semantic version; ordering is SemVer precedence (a pre-release sorts below its release)."""

    major: int
    minor: int
    patch: int
    # (0, ids) for a pre-release, (1,) for a release: pre-releases sort first
    _pre_key: tuple[Any, ...] = field(repr=False)
    text: str = field(compare=False)

    @property
    def prerelease(self) -> bool:
        return self._pre_key[0] == 0

    @classmethod
    def parse(cls, text: str) -> Version:
        if not isinstance(text, str) or len(text) > MAX_VERSION_CHARS:
            raise InvalidInput(f"a version is at most {MAX_VERSION_CHARS} characters", reason="bad_version")
        match = _SEMVER.match(text)
        if match is None:
            raise InvalidInput(
                f"version {text[:80]!r} is not a semantic version like 1.2.0 (or 1.2.0-rc.1)", reason="bad_version"
            )
        major, minor, patch, pre = int(match[1]), int(match[2]), int(match[3]), match[4]
        if pre is None:
            key: tuple[Any, ...] = (1,)
        else:
            # numeric identifiers sort numerically and below alphanumeric ones (SemVer 11.4)
            key = (0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")))
        return cls(major, minor, patch, key, text)


def _caret_allows(spec: str, version: Version) -> bool:
    """Whether `version` satisfies ``^X[.Y[.Z]]`` (npm's caret: the leftmost non-zero part is fixed)."""
    match = _CARET.match(spec)
    assert match is not None  # parse_ref checked it
    floor = (int(match[1]), int(match[2] or 0), int(match[3] or 0))
    if version.prerelease or (version.major, version.minor, version.patch) < floor:
        return False
    if floor[0] > 0 or match[2] is None:
        return version.major == floor[0]
    if floor[1] > 0 or match[3] is None:
        return version.major == 0 and version.minor == floor[1]
    return (version.major, version.minor, version.patch) == floor


def parse_ref(ref: str) -> tuple[str, str] | None:
    """``NAME@VERSION`` (a version, ``latest`` or ``^X[.Y[.Z]]``) as (name, selector); None for a bare CID.

    InvalidInput ``bad_ref`` for anything else."""
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF_CHARS:
        raise InvalidInput(f"a model reference is 1-{MAX_REF_CHARS} characters", reason="bad_ref")
    if "@" not in ref:
        if is_cid(ref):
            return None
        raise InvalidInput(
            f"{ref[:80]!r} is neither a model CID nor NAME@VERSION (NAME@1.2.0, NAME@latest, NAME@^1.0)",
            reason="bad_ref",
        )
    name, _, selector = ref.partition("@")
    check_name(name)
    if selector != "latest" and not _CARET.match(selector):
        try:
            Version.parse(selector)
        except InvalidInput as exc:
            raise InvalidInput(
                f"{ref[:80]!r}: after @ comes a version (1.2.0), latest or ^1.0: {exc}", reason="bad_ref"
            ) from None
    return name, selector


# ---------------------------------------------------------------- field checks


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(
            f"federation name {str(name)[:80]!r}: expected 1-{MAX_NAME_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            reason="bad_name",
        )
    return name


def _check_text(value: str, limit: int, what: str, reason: str) -> str:
    if len(value) > limit:
        raise InvalidInput(f"{what} is {len(value)} characters; the limit is {limit}", reason=reason)
    return value


def _check_token(value: str, what: str, reason: str) -> str:
    if value and not _TOKEN.match(value):
        raise InvalidInput(
            f"{what} {value[:80]!r}: expected up to 64 letters, digits, '.', '_' or '-'", reason=reason
        )
    return value


def _check_owners(owners: Sequence[str]) -> tuple[str, ...]:
    if len(owners) > MAX_OWNERS:
        raise InvalidInput(f"{len(owners)} owners; the limit is {MAX_OWNERS}", reason="bad_owners")
    for owner in owners:
        if not owner or len(owner) > MAX_OWNER_CHARS or any(c.isspace() for c in owner):
            raise InvalidInput(
                f"owner {owner[:80]!r}: expected a role/id of 1-{MAX_OWNER_CHARS} characters without spaces",
                reason="bad_owners",
            )
    return tuple(dict.fromkeys(owners))


def _check_policy(policy: Mapping[str, str]) -> dict[str, str]:
    if len(policy) > MAX_POLICY_KEYS:
        raise InvalidInput(f"{len(policy)} round-policy keys; the limit is {MAX_POLICY_KEYS}", reason="bad_round_policy")
    for key, value in policy.items():
        if not key or len(key) > MAX_POLICY_KEY_CHARS or len(value) > MAX_POLICY_VALUE_CHARS:
            raise InvalidInput(
                f"round-policy entry {key[:40]!r}: keys are 1-{MAX_POLICY_KEY_CHARS} characters, values at most "
                f"{MAX_POLICY_VALUE_CHARS}",
                reason="bad_round_policy",
            )
    return dict(sorted(policy.items()))


def _manifest(data: bytes, what: str) -> Manifest:
    if not data:
        raise InvalidInput(f"{what}: no manifest given", reason="bad_manifest")
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidInput(f"{what}: {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES}", reason="bad_manifest")
    return Manifest.from_bytes(data)


def caller_name(caller: Certified | None) -> str:
    """role/id of a TLS caller; "" for a plaintext one (demos and tests: it proves nothing)."""
    return str(caller.identity) if caller is not None else ""


# ---------------------------------------------------------------- release tags


@dataclass(frozen=True, kw_only=True)
class ReleaseTag:
    """The signed statement "NAME@VERSION is model CID", as the releaser made it.

    Canonical JSON like a manifest; the signature covers every field but itself, and
    a certified key embeds its certificate, so the tag can be checked offline too.
    """

    federation: str
    version: str
    model: str
    released_by: str
    notes: str = ""
    evaluation: str = ""
    accuracy: float | None = None
    created_at: str = field(default_factory=now_rfc3339)
    certificate: str | None = None
    signature: dict[str, str] | None = None

    def to_json(self, *, include_signature: bool = True) -> dict[str, Any]:
        record: dict[str, Any] = {
            "schema": RELEASE_SCHEMA,
            "federation": self.federation,
            "version": self.version,
            "model": self.model,
            "released_by": self.released_by,
            "notes": self.notes,
            "evaluation": self.evaluation,
            "accuracy": self.accuracy,
            "created_at": self.created_at,
        }
        if self.certificate is not None:
            record["certificate"] = self.certificate
        if include_signature:
            record["signature"] = self.signature
        return record

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def signed(self, key: KeyPair) -> ReleaseTag:
        certificate = key.certificate if key.certificate is not None else self.certificate
        unsigned = ReleaseTag(**{**self._fields(), "certificate": certificate, "signature": None})
        signature = {"alg": KEY_TYPE, "public_key": key.public_key, "sig": key.sign(canonical_json(unsigned.to_json(include_signature=False)))}
        return ReleaseTag(**{**unsigned._fields(), "signature": signature})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def verify_signature(self) -> None:
        if self.signature is None:
            raise IntegrityError(f"release tag {self.federation}@{self.version} is not signed", reason="unsigned")
        try:
            verify_signature(self.signature["public_key"], canonical_json(self.to_json(include_signature=False)), self.signature["sig"])
        except IntegrityError:
            raise IntegrityError(
                f"release tag {self.federation}@{self.version}: the signature does not verify", reason="bad_signature"
            ) from None

    @classmethod
    def from_bytes(cls, data: bytes) -> ReleaseTag:
        """Parse and check every field (InvalidInput with a specific reason); the signature is not verified here."""
        if not data or len(data) > MAX_TAG_BYTES:
            raise InvalidInput(f"a release tag is 1-{MAX_TAG_BYTES} bytes, got {len(data)}", reason="bad_tag")
        try:
            record = strict_json(bytes(data))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidInput(f"the release tag is not valid UTF-8 JSON: {exc}", reason="bad_tag") from None
        expected = {"schema", "federation", "version", "model", "released_by", "notes", "evaluation", "accuracy", "created_at", "signature"}
        if not isinstance(record, dict) or not expected <= set(record) <= expected | {"certificate"}:
            raise InvalidInput(f"a release tag has exactly the fields {sorted(expected)} (and certificate)", reason="bad_tag")
        if record["schema"] != RELEASE_SCHEMA:
            raise InvalidInput(f"release tag schema must be {RELEASE_SCHEMA!r}", reason="bad_tag")
        for name in ("federation", "version", "model", "released_by", "notes", "evaluation", "created_at"):
            if not isinstance(record[name], str):
                raise InvalidInput(f"release tag field {name!r} must be a string", reason="bad_tag")
        check_name(record["federation"])
        Version.parse(record["version"])
        if not is_cid(record["model"]):
            raise InvalidInput(f"release tag model {record['model'][:80]!r} is not a CID", reason="bad_tag")
        _check_text(record["notes"], MAX_NOTES_CHARS, "release notes", "bad_notes")
        _check_text(record["released_by"], MAX_OWNER_CHARS, "released_by", "bad_tag")
        _check_evaluation(record["evaluation"])
        accuracy = record["accuracy"]
        if accuracy is not None:
            _check_accuracy(accuracy)
        try:
            timestamp(record["created_at"])
        except ValueError:
            raise InvalidInput("release tag created_at is not an RFC 3339 UTC time", reason="bad_tag") from None
        certificate = record.get("certificate")
        if certificate is not None and (not isinstance(certificate, str) or len(certificate) > 16384):
            raise InvalidInput("release tag certificate must be one PEM certificate", reason="bad_tag")
        signature = record["signature"]
        if (
            not isinstance(signature, dict)
            or set(signature) != {"alg", "public_key", "sig"}
            or signature["alg"] != KEY_TYPE
            or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in signature.values())
        ):
            raise InvalidInput("release tag signature must be {alg: ed25519, public_key, sig}", reason="bad_tag")
        return cls(
            federation=record["federation"],
            version=record["version"],
            model=record["model"],
            released_by=record["released_by"],
            notes=record["notes"],
            evaluation=record["evaluation"],
            accuracy=float(accuracy) if accuracy is not None else None,
            created_at=record["created_at"],
            certificate=certificate,
            signature=dict(signature),
        )


def check_tag(tag_bytes: bytes, signers: Signers | None = None) -> str:
    """Check a stored release tag offline: its signature, and with `signers` (the fleet CA) that its embedded
    certificate was issued to `released_by`, certifies the signing key, was valid when the tag was made and is
    not revoked. Returns the certified signer's role/id ("" without `signers`); IntegrityError (a SignerError
    for the certificate checks, reasons as `trust.signers`) otherwise."""
    tag = ReleaseTag.from_bytes(tag_bytes)
    tag.verify_signature()
    if signers is None:
        return ""
    ref = f"{tag.federation}@{tag.version}"
    if tag.certificate is None:
        raise SignerError(f"release {ref} carries no certificate for its signing key", reason="uncertified")
    certified = signers.certificate(tag.certificate)
    assert tag.signature is not None
    if certified.manifest_key != tag.signature["public_key"]:
        raise SignerError(f"release {ref} is signed by a key {certified.identity}'s certificate does not certify", reason="key_mismatch")
    if str(certified.identity) != tag.released_by:
        raise SignerError(f"release {ref} says {tag.released_by} but is signed by {certified.identity}", reason="not_producer")
    if not certified.valid_at(timestamp(tag.created_at)):
        raise SignerError(f"the certificate of {certified.identity} was not valid when {ref} was made", reason="not_valid_then")
    revocations = signers.revocations
    if revocations is not None and revocations.is_revoked(certified):
        raise SignerError(f"{certified.identity} (serial {certified.serial}) is revoked", reason="revoked")
    return str(certified.identity)


def _check_evaluation(name: str) -> None:
    if len(name) > MAX_EVALUATION_CHARS or any(c.isspace() for c in name):
        raise InvalidInput(
            f"an evaluation name is at most {MAX_EVALUATION_CHARS} characters without spaces", reason="bad_evaluation"
        )


def _check_accuracy(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
        raise InvalidInput(f"accuracy must be a number in [0, 1], got {value!r}", reason="bad_accuracy")


# ---------------------------------------------------------------- the registry


class Hub(DurableSqlite):
    """Thread-safe; `path=None` keeps the hub in memory. Manifests are indexed through `index`."""

    SCHEMA = _SCHEMA
    SCHEMA_VERSION = 1

    def __init__(
        self,
        path: str | Path | None,
        index: ModelIndex,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path)
        self._index = index
        self._clock = clock

    # ------------------------------------------------------------ federations

    def create_federation(
        self,
        *,
        name: str,
        base_manifest: bytes,
        description: str = "",
        task: str = "",
        owners: Sequence[str] = (),
        round_policy: Mapping[str, str] | None = None,
        strategy: str = "",
        caller: Certified | None = None,
        signers: Signers | None = None,
    ) -> Federation:
        """Register `name` with the signed base manifest (indexed here). Conflict ``federation_exists``
        if the name is taken; a fork's source model must be indexed (NotFound ``unknown_source``)."""
        check_name(name)
        _check_text(description, MAX_DESCRIPTION_CHARS, "the description", "bad_description")
        _check_token(task, "task", "bad_task")
        _check_token(strategy, "strategy", "bad_strategy")
        owners = _check_owners(list(owners))
        policy = _check_policy(dict(round_policy or {}))
        manifest = _manifest(base_manifest, "base_manifest")
        if manifest.kind not in BASE_KINDS or manifest.federation != name:
            raise InvalidInput(
                f"a federation's base manifest has kind base or fork and federation {name!r}; got a "
                f"{manifest.kind} model of {manifest.federation!r}",
                reason="bad_base",
            )
        if self._read("SELECT 1 FROM federations WHERE name = ?", (name,)):
            raise Conflict(f"federation {name!r} already exists", reason="federation_exists")
        forked_from = source_federation = fork_layers = ""
        if manifest.kind == "fork":
            if len(manifest.parents) != 1:
                raise InvalidInput("a fork manifest names exactly one parent: its source model", reason="bad_base")
            forked_from = manifest.parents[0]
            try:
                source_federation = self._index.get(forked_from).federation
            except NotFound:
                raise NotFound(f"the fork's source model {forked_from} is not in the index", reason="unknown_source") from None
            fork = manifest.extra.get("fork")
            fork_layers = str(fork.get("layers", "")) if isinstance(fork, dict) else ""
        self._index.record(manifest.to_bytes(), announcer=caller, signers=signers)
        creator = caller_name(caller)
        federation = Federation(
            name=name,
            description=description,
            task=task,
            base=manifest.cid,
            spec=tuple(TensorSpec(name=n, dtype=t.dtype, shape=tuple(t.shape)) for n, t in manifest.tensors.items()),
            owners=owners or ((creator,) if creator else ()),
            round_policy=policy,
            strategy=strategy,
            forked_from=forked_from,
            source_federation=source_federation,
            fork_layers=fork_layers,
            created_by=creator,
            created_at=self._clock(),
        )
        try:
            self._write([(
                "INSERT INTO federations (name, description, task, base, spec, owners, round_policy, strategy,"
                " forked_from, source_federation, fork_layers, created_by, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name, description, task, federation.base,
                    json.dumps([[s.name, s.dtype, list(s.shape)] for s in federation.spec]),
                    json.dumps(list(federation.owners)), json.dumps(policy), strategy,
                    forked_from, source_federation, fork_layers, creator, federation.created_at,
                ),
            )])  # fmt: skip
        except Exception as exc:  # two creators racing: the second insert hits the primary key
            if "UNIQUE" in str(exc):
                raise Conflict(f"federation {name!r} already exists", reason="federation_exists") from None
            raise
        return federation

    def _row_to_federation(self, row: Any, *, with_heads: bool) -> Federation:
        heads: dict[str, str] = {}
        if with_heads:
            for kind in ("cluster", "semi-global"):  # a semi-global model replaces its aggregator's cluster model
                for record in self._index.list(kind=kind, federation=row["name"], latest_per_aggregator=True):
                    heads[record.producer] = record.cid
        return Federation(
            name=row["name"],
            description=row["description"],
            task=row["task"],
            base=row["base"],
            spec=tuple(TensorSpec(name=n, dtype=d, shape=tuple(s)) for n, d, s in json.loads(row["spec"])),
            owners=tuple(json.loads(row["owners"])),
            round_policy=json.loads(row["round_policy"]),
            strategy=row["strategy"],
            forked_from=row["forked_from"],
            source_federation=row["source_federation"],
            fork_layers=row["fork_layers"],
            heads=heads,
            created_by=row["created_by"],
            created_at=row["created_at"],
        )

    def federation(self, name: str) -> Federation:
        """The federation and its current heads; NotFound ``unknown_federation``."""
        check_name(name)
        rows = self._read("SELECT * FROM federations WHERE name = ?", (name,))
        if not rows:
            raise NotFound(f"no federation {name!r}", reason="unknown_federation")
        return self._row_to_federation(rows[0], with_heads=True)

    def federations(self) -> list[Federation]:
        """Every federation by name, without heads (read one for those); the service pages them."""
        rows = self._read("SELECT * FROM federations ORDER BY name")
        return [self._row_to_federation(row, with_heads=False) for row in rows]

    def _check_owner(self, federation: Federation, caller: Certified | None, action: str) -> None:
        """With TLS, only an owner may release, or decide a proposal; plaintext callers prove nothing to check."""
        if caller is None or not federation.owners:
            return
        if caller_name(caller) not in federation.owners:
            raise PermissionDenied(
                f"{caller.identity} is not an owner of federation {federation.name!r} and may not {action}",
                reason="not_owner",
            )

    # ------------------------------------------------------------ releases

    def release(self, tag_bytes: bytes, *, caller: Certified | None = None) -> Release:
        """Record a signed release tag. Refusals: ``bad_tag`` and friends (InvalidInput), ``unsigned`` /
        ``bad_signature`` (IntegrityError), ``not_releaser`` / ``uncertified_signer`` / ``not_owner``
        (PermissionDenied), ``unknown_federation`` / ``model_not_indexed`` (NotFound), ``release_exists``
        (Conflict)."""
        tag = ReleaseTag.from_bytes(tag_bytes)
        tag.verify_signature()
        if caller is not None:
            if tag.released_by != caller_name(caller):
                raise PermissionDenied(
                    f"the tag says it was released by {tag.released_by!r}, but {caller.identity} sent it",
                    reason="not_releaser",
                )
            assert tag.signature is not None
            if tag.signature["public_key"] != caller.manifest_key:
                raise PermissionDenied(
                    f"the tag is not signed by {caller.identity}'s certified manifest key", reason="uncertified_signer"
                )
        federation = self.federation(tag.federation)
        self._check_owner(federation, caller, "release it")
        try:
            record = self._index.get(tag.model)
        except NotFound:
            raise NotFound(
                f"model {tag.model} is not in the coordinator's index (only indexed models can be released)",
                reason="model_not_indexed",
            ) from None
        if record.federation != tag.federation and record.cid != federation.base:
            raise FailedPrecondition(
                f"model {tag.model} belongs to federation {record.federation!r}, not {tag.federation!r}",
                reason="wrong_federation",
            )
        existing = self._read("SELECT model FROM releases WHERE federation = ? AND version = ?", (tag.federation, tag.version))
        if existing:
            raise Conflict(
                f"{tag.federation}@{tag.version} already exists (model {existing[0][0]}); releases are immutable: "
                "choose a new version",
                reason="release_exists",
            )
        release = Release(
            federation=tag.federation,
            version=tag.version,
            model=tag.model,
            notes=tag.notes,
            evaluation=tag.evaluation,
            accuracy=tag.accuracy,
            lineage_root=self.lineage_root(record),
            released_by=caller_name(caller) or tag.released_by,
            created_at=self._clock(),
            tag=tag.to_bytes(),
        )
        try:
            self._write([(
                "INSERT INTO releases (federation, version, model, lineage_root, released_by, created_at, tag)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (release.federation, release.version, release.model, release.lineage_root, release.released_by,
                 release.created_at, release.tag),
            )])  # fmt: skip
        except Exception as exc:
            if "UNIQUE" in str(exc):
                raise Conflict(f"{release.ref} already exists", reason="release_exists") from None
            raise
        return release

    def lineage_root(self, record: ModelRecord) -> str:
        """The oldest ancestor reachable in the index, crossing federations through forks.

        Each step follows the first indexed parent, else the manifest's `base`: a cluster model's parents are
        device updates, which the index rarely holds, while its base (the previous semi-global model, a fork,
        a merge) is indexed. The root is the first model with neither; an ancestor named but not indexed ends
        the walk there (the root as far as the index knows)."""
        current = record
        for _ in range(MAX_ROOT_STEPS):
            base = base_of(current)
            named = [*current.parents, *([base] if base and base not in current.parents else [])]
            if not named:
                return current.cid
            indexed = self._indexed(named)
            if not indexed:
                return named[0]
            current = indexed[0]
        return current.cid

    def _indexed(self, cids: Sequence[str]) -> list[ModelRecord]:
        """The records of `cids` the index holds, in the order given."""
        records = []
        for cid in cids:
            try:
                records.append(self._index.get(cid))
            except NotFound:
                continue
        return records

    @staticmethod
    def _row_to_release(row: Any) -> Release:
        tag = ReleaseTag.from_bytes(bytes(row["tag"]))
        return Release(
            federation=row["federation"],
            version=row["version"],
            model=row["model"],
            notes=tag.notes,
            evaluation=tag.evaluation,
            accuracy=tag.accuracy,
            lineage_root=row["lineage_root"],
            released_by=row["released_by"],
            created_at=row["created_at"],
            tag=bytes(row["tag"]),
        )

    def releases(self, federation: str) -> list[Release]:
        """Every release of `federation`, highest version first; NotFound ``unknown_federation``."""
        self.federation(federation)
        rows = self._read("SELECT * FROM releases WHERE federation = ?", (federation,))
        releases = [self._row_to_release(row) for row in rows]
        return sorted(releases, key=lambda r: Version.parse(r.version), reverse=True)

    def resolve(self, ref: str) -> tuple[str, Release | None]:
        """(model CID, the release it names or None for a bare CID). NotFound ``unknown_release``
        when no release matches; ``unknown_federation`` for an unknown name."""
        parsed = parse_ref(ref)
        if parsed is None:
            return ref, None
        name, selector = parsed
        releases = self.releases(name)
        if selector == "latest":
            finals = [r for r in releases if not Version.parse(r.version).prerelease]
            chosen = (finals or releases)[:1]
        elif selector.startswith("^"):
            chosen = [r for r in releases if _caret_allows(selector, Version.parse(r.version))][:1]
        else:
            wanted = Version.parse(selector)
            # build metadata does not count in precedence, so 1.2.0+b names the release 1.2.0 if no exact match
            chosen = [r for r in releases if r.version == selector] or [
                r for r in releases if Version.parse(r.version) == wanted
            ]
        if not chosen:
            known = ", ".join(r.version for r in releases[:10]) or "none yet"
            raise NotFound(f"no release of {name!r} matches {selector!r} (releases: {known})", reason="unknown_release")
        return chosen[0].model, chosen[0]

    # ------------------------------------------------------------ proposals

    def propose(self, manifest_bytes: bytes, *, caller: Certified | None = None, signers: Signers | None = None) -> Proposal:
        """Record a ``proposal`` manifest: federation the target, parents [target base, proposed model].
        Shapes must match the target's spec wherever names are shared (FailedPrecondition ``incompatible_shapes``)."""
        manifest = _manifest(manifest_bytes, "proposal manifest")
        if manifest.kind != "proposal" or len(manifest.parents) != 2:
            raise InvalidInput(
                "a proposal manifest has kind proposal and two parents: the target's base and the proposed model",
                reason="bad_proposal",
            )
        target = self.federation(manifest.federation)
        head, proposed = manifest.parents
        if head != target.base:
            raise FailedPrecondition(
                f"the proposal's first parent {head} is not {target.name!r}'s current base {target.base}",
                reason="stale_proposal",
            )
        try:
            source = self._index.get(proposed)
        except NotFound:
            raise NotFound(f"proposed model {proposed} is not in the index", reason="unknown_model") from None
        if source.federation == target.name:
            raise InvalidInput("a proposal brings a model from another federation", reason="bad_proposal")
        check_compatible(target.spec, _spec_of(source))
        self._index.record(manifest.to_bytes(), announcer=caller, signers=signers)
        if self._read("SELECT 1 FROM proposals WHERE cid = ?", (manifest.cid,)):
            return self.proposal(manifest.cid)
        proposal = Proposal(
            cid=manifest.cid,
            from_federation=source.federation,
            to_federation=target.name,
            model=proposed,
            target_head=head,
            proposed_by=caller_name(caller) or f"{manifest.producer.role}/{manifest.producer.id}",
            created_at=self._clock(),
        )
        self._write([(
            "INSERT OR IGNORE INTO proposals (cid, from_federation, to_federation, model, target_head, state, proposed_by,"
            " created_at, decided_by, decided_at, merge) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, '', 0, '')",
            (proposal.cid, proposal.from_federation, proposal.to_federation, proposal.model, proposal.target_head,
             proposal.proposed_by, proposal.created_at),
        )])  # fmt: skip
        return proposal

    def proposal(self, cid: str) -> Proposal:
        if not is_cid(cid):
            raise InvalidInput(f"{cid[:80]!r} is not a proposal CID", reason="bad_cid")
        rows = self._read("SELECT * FROM proposals WHERE cid = ?", (cid,))
        if not rows:
            raise NotFound(f"no proposal {cid}", reason="unknown_proposal")
        return Proposal(**{key: rows[0][key] for key in rows[0].keys()})

    def proposals(self, federation: str = "", state: str = "") -> list[Proposal]:
        """Proposals to `federation` (empty: any) in `state` (empty: any), oldest first."""
        if federation:
            check_name(federation)
        if state and state not in PROPOSAL_STATES:
            raise InvalidInput(f"state must be one of {', '.join(PROPOSAL_STATES)}, got {state[:40]!r}", reason="bad_state")
        where, args = [], []
        for column, value in (("to_federation", federation), ("state", state)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(f"SELECT * FROM proposals{clause} ORDER BY created_at, cid", tuple(args))
        return [Proposal(**{key: row[key] for key in row.keys()}) for row in rows]

    def decide(
        self,
        cid: str,
        *,
        accept: bool,
        merge_manifest: bytes = b"",
        caller: Certified | None = None,
        signers: Signers | None = None,
    ) -> Proposal:
        """Decline, or accept with the merge model's signed manifest (kind merge, federation the target, parents
        the proposal's), which becomes the target's base. FailedPrecondition ``already_decided`` once decided."""
        proposal = self.proposal(cid)
        target = self.federation(proposal.to_federation)
        self._check_owner(target, caller, "decide its proposals")
        if proposal.state != "open":
            raise FailedPrecondition(f"proposal {cid} is already {proposal.state}", reason="already_decided")
        merge = ""
        statements = []
        if accept:
            manifest = _manifest(merge_manifest, "merge manifest")
            if (
                manifest.kind != "merge"
                or manifest.federation != target.name
                or manifest.parents != (proposal.target_head, proposal.model)
            ):
                raise InvalidInput(
                    f"the merge manifest must have kind merge, federation {target.name!r} and parents "
                    f"[{proposal.target_head}, {proposal.model}]",
                    reason="bad_merge",
                )
            if target.base != proposal.target_head:
                raise FailedPrecondition(
                    f"{target.name!r}'s base moved since the proposal (now {target.base}); propose again",
                    reason="stale_proposal",
                )
            check_compatible(target.spec, tuple(TensorSpec(name=n, dtype=t.dtype, shape=tuple(t.shape)) for n, t in manifest.tensors.items()))
            self._index.record(manifest.to_bytes(), announcer=caller, signers=signers)
            merge = manifest.cid
            # conditional on the base the proposal was made against: of two accepts racing, only one moves it
            statements.append(
                ("UPDATE federations SET base = ? WHERE name = ? AND base = ?", (merge, target.name, proposal.target_head))
            )
        state = "accepted" if accept else "declined"
        statements.append((
            "UPDATE proposals SET state = ?, decided_by = ?, decided_at = ?, merge = ? WHERE cid = ? AND state = 'open'",
            (state, caller_name(caller), self._clock(), merge, cid),
        ))  # fmt: skip
        self._write(statements)
        return self.proposal(cid)


def _spec_of(record: ModelRecord) -> tuple[TensorSpec, ...]:
    manifest = Manifest.from_bytes(record.manifest)
    return tuple(TensorSpec(name=n, dtype=t.dtype, shape=tuple(t.shape)) for n, t in manifest.tensors.items())


def check_compatible(target: Sequence[TensorSpec], other: Sequence[TensorSpec]) -> None:
    """Refuse (FailedPrecondition ``incompatible_shapes``) when a shared tensor differs in shape or dtype, or
    nothing is shared: a merge averages only what both models have, and never across a mismatch."""
    mine = {s.name: s for s in target}
    shared = [s for s in other if s.name in mine]
    if not shared:
        raise FailedPrecondition("the two models share no tensor name: nothing to merge", reason="incompatible_shapes")
    bad = [
        f"{s.name}: {list(mine[s.name].shape)} {mine[s.name].dtype} vs {list(s.shape)} {s.dtype}"
        for s in shared
        if (s.shape, s.dtype) != (mine[s.name].shape, mine[s.name].dtype)
    ]
    if bad:
        raise FailedPrecondition(
            f"incompatible shapes in {len(bad)} shared tensor(s): {'; '.join(bad[:5])}", reason="incompatible_shapes"
        )
