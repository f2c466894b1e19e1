"""The trust package's typed errors: the two refusals of access, and the refusals of bad credentials.

gRPC status UNAUTHENTICATED means "who are you?" (no certificate, no Strata identity in it,
an expired one, a bad bootstrap token); PERMISSION_DENIED means "I know who you are, and
no" (the role may not call this RPC, the identity or certificate is revoked, an id in the
message is not the caller's own). `proto.serving.ErrorInterceptor` maps both to their
status, with the reason in the "strata-reason" trailer, like every other `StrataError`.
"""

from __future__ import annotations

from proto.errors import InvalidInput, StrataError


class Unauthenticated(StrataError):
    """The caller did not prove who it is."""

    reason = "unauthenticated"
    status = "UNAUTHENTICATED"


class PermissionDenied(StrataError):
    """The caller is known, and may not do this."""

    reason = "permission_denied"
    status = "PERMISSION_DENIED"


class IdentityError(InvalidInput):
    """A certificate or string that does not carry a well-formed Strata identity; `reason` says what is wrong:
    no_identity, ambiguous_identity, bad_identity, unknown_role, wrong_fleet, no_manifest_key, bad_manifest_key."""

    reason = "bad_identity"
