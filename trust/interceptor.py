"""The one place access is decided: a grpc.aio server interceptor enforcing `trust.roles` on every call.

For each call it reads the caller's certificate from the call's AuthContext (the
``x509_pem_cert`` property gRPC fills from the verified TLS handshake: the only
trustworthy source of identity, never metadata the caller wrote), maps it to an
`Identity`, refuses revoked identities and certificates, checks the role table and
the "an id in a message must be the caller's own" fields, and runs the handler with
the caller available through `caller()` / `caller_certificate()`.

Refusals, as typed errors that `proto.serving.ErrorInterceptor` maps (status, the
reason in the "strata-reason" trailer, one rate-limited log line per method and
reason, never INTERNAL):

- UNAUTHENTICATED: ``no_certificate``; ``certificate_expired`` (a long-lived stream
  can outlive its certificate); the certificate carries no usable Strata identity
  (``no_identity``, ``ambiguous_identity``, ``bad_identity``, ``unknown_role``,
  ``wrong_fleet``, ``no_manifest_key``, ``bad_manifest_key``);
- PERMISSION_DENIED: ``revoked``, ``role_not_allowed``, ``not_in_role_table``,
  ``not_own_id``.

Revocation also reaches streams already open: a stream whose caller is revoked
after it was admitted ends with PERMISSION_DENIED ``revoked`` at its next message,
either way, so a revoked agent's watch stream or upload does not outlive the list.

Composition: pass it to `proto.serving.create_server(interceptors=[...])`, which
keeps `ErrorInterceptor` outermost. Public methods (probes, Enroll) run for anyone;
with a valid certificate `caller()` still names the caller.

Order: for unary RPCs `ErrorInterceptor` parses the request before this interceptor
runs, so undecodable bytes from an unauthenticated caller are INVALID_ARGUMENT
``bad_request`` rather than UNAUTHENTICATED; nothing reaches a handler either way.

Notes for handlers: `caller()` is a ContextVar, so it follows the call's task and
tasks it creates, but not `offload` (thread pools do not copy contexts): read it on
the loop and pass it along. The same holds for `current_signers()`, how the server
handling the call judges manifest signers (its fleet CA and current revocation list).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

import grpc
from cryptography import x509

from proto.serving import responses_of
from trust.bundle import Bundle
from trust.errors import IdentityError, PermissionDenied, Unauthenticated
from trust.identity import Certified, Identity, ca_fleet, load_certificate, read_certificate
from trust.revocation import RevocationList
from trust.roles import ANYONE, OWN_ID_FIELDS, ROLE_TABLE
from trust.signers import Signers

__all__ = ["TrustInterceptor", "caller", "caller_certificate", "current_signers", "require_own_id"]

_PEM_CERT_KEY = "x509_pem_cert"

_caller: ContextVar[Certified | None] = ContextVar("strata_caller", default=None)
_signers: ContextVar[Signers | None] = ContextVar("strata_signers", default=None)


def caller() -> Identity | None:
    """The identity of the caller of the RPC being handled (None: no certificate, on a public method)."""
    certified = _caller.get()
    return None if certified is None else certified.identity


def caller_certificate() -> Certified | None:
    """Everything the caller's certificate certifies: identity, manifest key (check a manifest's signer
    against it), serial, validity."""
    return _caller.get()


def current_signers() -> Signers | None:
    """How the server handling this call judges manifest signers (its fleet CA, its current revocation list);
    None outside a call authorized by a `TrustInterceptor`, i.e. without TLS."""
    return _signers.get()


def require_own_id(value: str, what: str = "id") -> None:
    """For handlers reading ids the role table cannot see (e.g. inside a manifest): `value` must be the
    caller's own id. PermissionDenied("not_own_id") otherwise, Unauthenticated if there is no caller."""
    identity = caller()
    if identity is None:
        raise Unauthenticated("this call has no authenticated caller", reason="no_certificate")
    if value != identity.id:
        raise PermissionDenied(f"{what} {value!r} is not the caller's own id ({identity})", reason="not_own_id")


@functools.lru_cache(maxsize=4096)
def _read_cached(pem: bytes, fleet: str) -> Certified | IdentityError:
    # a connection presents the same certificate on every call: parse it once
    try:
        return read_certificate(pem, fleet=fleet)
    except IdentityError as e:
        return e


def _field(message: Any, path: str) -> str:
    value = message
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return ""
    return value if isinstance(value, str) else ""


class TrustInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call; see the module docstring.

    `ca_cert` is the fleet CA's certificate (it names the fleet, and verifies revocation
    lists). `set_revocations` can be called at any time, from any thread.
    """

    def __init__(
        self,
        ca_cert: x509.Certificate | bytes | str,
        *,
        table: Mapping[str, Any] = ROLE_TABLE,
        own_id_fields: Mapping[str, tuple[str, ...]] = OWN_ID_FIELDS,
        revocations: RevocationList | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ca = load_certificate(ca_cert)
        self.fleet = ca_fleet(self._ca)
        self._table = dict(table)
        self._own_id_fields = dict(own_id_fields)
        self._clock = clock
        self._lock = threading.Lock()
        self._revocations: RevocationList | None = None
        if revocations is not None:
            self.set_revocations(revocations)
        # manifest signers are judged by the same CA and the same current revocation list as callers
        self.signers = Signers(self._ca, revocations=lambda: self._revocations, clock=clock)

    @classmethod
    def for_bundle(cls, bundle: Bundle, **kwargs: Any) -> TrustInterceptor:
        return cls(bundle.ca_cert, **kwargs)

    # ------------------------------------------------------------ revocations

    @property
    def revocations(self) -> RevocationList | None:
        return self._revocations

    def set_revocations(self, revocations: RevocationList) -> bool:
        """Use `revocations` from now on, once its CA signature verifies. An older or equal version than
        the one held is ignored (False): an old list cannot un-revoke anyone. IntegrityError if unsigned
        or signed by another CA."""
        revocations.verify_with(self._ca)
        with self._lock:
            if not revocations.newer_than(self._revocations):
                return False
            self._revocations = revocations
            return True

    # ------------------------------------------------------------ the decision

    def authorize(self, method: str, auth_context: Mapping[str, Any]) -> Certified | None:
        """Who is calling `method`, if they may; raises Unauthenticated or PermissionDenied otherwise."""
        entry = self._table.get(method)
        if entry is None:
            raise PermissionDenied(f"{method} is not in the role table: nobody may call it", reason="not_in_role_table")
        pems = auth_context.get(_PEM_CERT_KEY) or ()
        found: Certified | IdentityError | None = _read_cached(bytes(pems[0]), self.fleet) if pems else None
        if entry is ANYONE:
            # open to all; the caller is named only when its certificate would pass anywhere else
            if isinstance(found, Certified) and found.valid_at(self._clock()) and not self._is_revoked(found):
                return found
            return None
        if found is None:
            raise Unauthenticated(f"{method} needs a client certificate", reason="no_certificate")
        if isinstance(found, IdentityError):
            raise Unauthenticated(f"the client certificate is not a Strata identity: {found.message}", reason=found.reason)
        if not found.valid_at(self._clock()):
            raise Unauthenticated(f"the certificate of {found.identity} (serial {found.serial}) has expired", reason="certificate_expired")
        if self._is_revoked(found):
            raise PermissionDenied(f"{found.identity} (serial {found.serial}) is revoked", reason="revoked")
        if found.identity.role not in entry:
            raise PermissionDenied(f"role {found.identity.role.value} may not call {method} ({found.identity})", reason="role_not_allowed")
        return found

    def _is_revoked(self, certified: Certified) -> bool:
        revocations = self._revocations
        return revocations is not None and revocations.is_revoked(certified)

    def check_own_ids(self, method: str, message: Any, certified: Certified | None) -> None:
        paths = self._own_id_fields.get(method)
        if not paths or certified is None:
            return
        for path in paths:
            value = _field(message, path)
            if value and value != certified.identity.id:
                raise PermissionDenied(
                    f"{path} {value!r} is not the caller's own id ({certified.identity})", reason="not_own_id"
                )

    # ------------------------------------------------------------ the interceptor

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method, streaming_request=False), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method, streaming_request=True), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streaming(handler.unary_stream, method, streaming_request=False), **kwargs)
        return grpc.stream_stream_rpc_method_handler(self._streaming(handler.stream_stream, method, streaming_request=True), **kwargs)

    def _admit(self, method: str, request: Any, context: grpc.aio.ServicerContext, *, streaming_request: bool) -> tuple[Certified | None, Any]:
        certified = self.authorize(method, context.auth_context())
        if streaming_request:
            request = self._checked_stream(method, request, certified)
        else:
            self.check_own_ids(method, request, certified)
        return certified, request

    def _still_trusted(self, certified: Certified | None) -> None:
        """For streams admitted before a revocation arrived: refuse their next message."""
        if certified is not None and self._is_revoked(certified):
            raise PermissionDenied(f"{certified.identity} (serial {certified.serial}) was revoked", reason="revoked")

    def _checked_stream(self, method: str, requests: AsyncIterator[Any], certified: Certified | None) -> AsyncIterator[Any]:
        if certified is None:
            return requests
        own_ids = bool(self._own_id_fields.get(method))

        async def checked() -> AsyncIterator[Any]:
            first = own_ids
            async for message in requests:
                if first:
                    # the header of a header-then-chunks stream; checked as it arrives, so the
                    # handler's idle limits still govern a caller that sends nothing
                    self.check_own_ids(method, message, certified)
                    first = False
                self._still_trusted(certified)
                yield message

        return checked()

    def _unary(self, behavior: Callable, method: str, *, streaming_request: bool) -> Callable:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            certified, request = self._admit(method, request, context, streaming_request=streaming_request)
            token, signers_token = _caller.set(certified), _signers.set(self.signers)
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                _signers.reset(signers_token)
                _caller.reset(token)

        return call

    def _streaming(self, behavior: Callable, method: str, *, streaming_request: bool) -> Callable:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            certified, request = self._admit(method, request, context, streaming_request=streaming_request)
            token, signers_token = _caller.set(certified), _signers.set(self.signers)
            try:
                async for response in responses_of(behavior(request, context)):
                    self._still_trusted(certified)
                    yield response
            finally:
                try:
                    _signers.reset(signers_token)
                    _caller.reset(token)
                except ValueError:  # closed from another context (a finalizer): nothing of ours to restore
                    pass

        return call
