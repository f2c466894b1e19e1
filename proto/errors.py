"""Strata's typed errors. Core code raises these; `proto.wire` maps them to gRPC status in one place.

Each error carries a stable, machine-readable `reason` (e.g. "invalid_safetensors",
"stale") and the name of the gRPC status it maps to. This module imports no gRPC,
so core modules can raise these without touching the wire.
"""

from __future__ import annotations


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
