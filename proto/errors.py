"""Strata's typed errors. Core code raises these; `proto.wire` maps them to gRPC status in one place.

Each error carries a stable, machine-readable `reason` (e.g. "invalid_safetensors",
"stale") and the name of the gRPC status it maps to. This module imports no gRPC,
so core modules can raise these without touching the wire.
"""

from __future__ import annotations

from enum import StrEnum


class StrataError(Exception):
    """Base of every error Strata raises on purpose."""

    reason: str = "internal"
    status: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class InvalidInput(StrataError):
    """Input that is malformed or violates a rule; retrying it will not help."""

    reason = "invalid_input"
    status = "INVALID_ARGUMENT"


class NotFound(StrataError):
    reason = "not_found"
    status = "NOT_FOUND"


class Conflict(StrataError):
    """The request contradicts state already recorded (e.g. a different update for the same round)."""

    reason = "conflict"
    status = "ALREADY_EXISTS"


class FailedPrecondition(StrataError):
    reason = "failed_precondition"
    status = "FAILED_PRECONDITION"


class Unavailable(StrataError):
    """A dependency (peer, store, daemon) cannot be reached now; retrying later may help."""

    reason = "unavailable"
    status = "UNAVAILABLE"


class IntegrityError(StrataError):
    """Bytes whose hash does not match their claimed CID, or a bad signature."""

    reason = "integrity"
    status = "DATA_LOSS"


class WireError(InvalidInput):
    """A stream that is out of order, oversize, truncated or does not hash to what it claimed."""

    reason = "bad_stream"


class ConfigError(InvalidInput):
    """A configuration value that is missing, unknown or out of range; the message names the key."""

    reason = "bad_config"


class Refusal(StrEnum):
    """Why SubmitUpdate refused an update: the machine-readable `reason` of its reply.

    The aggregator, the relay, the agent and the CLI all use these codes; they are
    part of the wire contract, so a code is never renamed, only added.
    """

    TOO_LARGE = "too_large"
    INVALID_SAFETENSORS = "invalid_safetensors"
    SHAPE_MISMATCH = "shape_mismatch"
    NOT_FINITE = "not_finite"
    NORM_BOUND = "norm_bound"
    UNKNOWN_BASE = "unknown_base"
    STALE = "stale"
    CONFLICT = "conflict"
    BAD_HEADER = "bad_header"
    BAD_STREAM = "bad_stream"
    HASH_MISMATCH = "hash_mismatch"
    UNKNOWN_FEDERATION = "unknown_federation"
    BAD_MANIFEST = "bad_manifest"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    NOT_INVITED = "not_invited"
    # with TLS: the manifest is not signed by the caller's certified manifest key (or its embedded
    # certificate does not certify that key for the caller, or is revoked)
    UNCERTIFIED_SIGNER = "uncertified_signer"
    # with TLS: the manifest's producer (role and id) is not the caller
    NOT_PRODUCER = "not_producer"
    # the federation spent its privacy budget (privacy.target_epsilon): training has stopped
    PRIVACY_BUDGET_SPENT = "privacy_budget_spent"
    # the federation requires local DP and the update's manifest does not declare it (or declares less)
    LOCAL_DP_REQUIRED = "local_dp_required"
    # num_samples above the federation's maximum, with the aggregator set to refuse such claims
    TOO_MANY_SAMPLES = "too_many_samples"
    # more metrics than a header may carry, or a metric name too long
    BAD_METRICS = "bad_metrics"
    # the encoded weights do not decode against the base (storage/encodings.py): wrong names, dtypes or
    # shapes for the encoding, top-k indices out of range or order, a bad int8 scale; or an unknown encoding
    BAD_ENCODING = "bad_encoding"
    # the update is encoded otherwise than the federation asked (round_config["encoding"])
    UNEXPECTED_ENCODING = "unexpected_encoding"
    # the open round (or relay window) already counts an update of this agent on another base (a late
    # one, counted in the round after its own): an agent counts once per round, so it trains again on
    # the next base instead
    ALREADY_COUNTED = "already_counted"
    # SCAFFOLD (round_config["scaffold"]): a device update without its control-variate update delta_c
    MISSING_CONTROL_VARIATE = "missing_control_variate"
    # a delta_c where the federation does not run SCAFFOLD, or on a relay's combined update
    UNEXPECTED_CONTROL_VARIATE = "unexpected_control_variate"
    # a delta_c that does not hash to the CID its manifest names, is not float32 safetensors, or whose
    # tensor names or shapes are not exactly the update's trained tensors
    BAD_CONTROL_VARIATE = "bad_control_variate"
    # a delta_c with non-finite values or an L2 norm above storage.control.MAX_DELTA_NORM
    CONTROL_VARIATE_OUT_OF_BOUNDS = "control_variate_out_of_bounds"


# Refusals that resending the same update can never overcome: an agent drops such an update.
FINAL_REFUSALS = frozenset(
    {
        Refusal.STALE,
        Refusal.CONFLICT,
        Refusal.UNKNOWN_BASE,
        Refusal.NOT_INVITED,
        Refusal.UNCERTIFIED_SIGNER,
        Refusal.NOT_PRODUCER,
        Refusal.PRIVACY_BUDGET_SPENT,
        Refusal.LOCAL_DP_REQUIRED,
        Refusal.TOO_MANY_SAMPLES,
        Refusal.BAD_METRICS,
        Refusal.UNEXPECTED_ENCODING,
        Refusal.ALREADY_COUNTED,
        Refusal.MISSING_CONTROL_VARIATE,
        Refusal.UNEXPECTED_CONTROL_VARIATE,
        Refusal.BAD_CONTROL_VARIATE,
        Refusal.CONTROL_VARIATE_OUT_OF_BOUNDS,
    }
)


class UpdateRefused(InvalidInput):
    """An update that SubmitUpdate refuses; `reason` is a `Refusal` code.

    A refusal is an answer (accepted=false with the code), not an RPC failure.
    """

    def __init__(self, message: str, *, reason: Refusal) -> None:
        super().__init__(message, reason=Refusal(reason))
