"""Trust for a Strata fleet: a fleet CA, identities in certificates, bootstrap tokens, revocation, one role table,
and the interceptor that enforces it.

- `trust.identity`: `Identity(role, id)`, `strata://<fleet>/<role>/<id>` SAN URIs, the manifest-key extension;
- `trust.ca`: `FleetCA` (init, load, issue, sign_csr, inventory, revoke);
- `trust.bundle`: a process's credentials as one directory; `ReloadingBundle` for renewal without restart;
- `trust.tokens`: Kubernetes-style bootstrap tokens in a `TokenStore`;
- `trust.enroll`: token + CSR in, certificate out (the Enroll RPC's core);
- `trust.revocation`: the CA-signed `RevocationList`;
- `trust.roles`: THE role table;
- `trust.interceptor`: `TrustInterceptor`, `caller()` and `current_signers()`;
- `trust.limits`: `FairShare`, per-identity call and stream limits;
- `trust.security`: a process's bundle, interceptors, channels and enforced revocation list, as one object;
- `trust.messages`: the enrollment and revocation RPCs' protobuf conversions;
- `trust.distribution`: how the revocation list travels (CA directory -> coordinator -> aggregators -> relays);
- `trust.signers`: `Signers`, whether a manifest's signer is the key certified for its producer;
- `trust.reads`: what a caller may read (device updates: audit only, logged).
"""

from __future__ import annotations

import importlib
from typing import Any

# Exports load lazily, so `import trust.identity` does not drag in gRPC or SQLite.
_EXPORTS = {
    "Certified": "trust.identity",
    "Identity": "trust.identity",
    "Role": "trust.identity",
    "identity_of": "trust.identity",
    "read_certificate": "trust.identity",
    "IdentityError": "trust.errors",
    "PermissionDenied": "trust.errors",
    "Unauthenticated": "trust.errors",
    "FleetCA": "trust.ca",
    "parse_duration": "trust.ca",
    "Bundle": "trust.bundle",
    "ReloadingBundle": "trust.bundle",
    "Grant": "trust.tokens",
    "TokenRefused": "trust.tokens",
    "TokenStore": "trust.tokens",
    "Enrollment": "trust.enroll",
    "enrollment_request": "trust.enroll",
    "RevocationList": "trust.revocation",
    "RevocationFile": "trust.distribution",
    "RevocationFollower": "trust.distribution",
    "ROLE_TABLE": "trust.roles",
    "TrustInterceptor": "trust.interceptor",
    "caller": "trust.interceptor",
    "caller_certificate": "trust.interceptor",
    "current_signers": "trust.interceptor",
    "Signer": "trust.signers",
    "SignerError": "trust.signers",
    "Signers": "trust.signers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trust' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
