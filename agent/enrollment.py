"""An agent's certificate: enrolled with a bootstrap token on first start, renewed before it expires.

First start (config `enroll: {coordinator, token, ca}`, and `tls.bundle` naming a
directory with no bundle in it yet): the agent makes a fresh TLS key and manifest
key, sends a CSR, its manifest key and the proof that binds them
(`trust.enroll.enrollment_request`) with the token to the coordinator's TLS-only
enrollment port, verifying the coordinator with `enroll.ca` before the token
leaves the device, and writes the bundle the answer completes (`trust.bundle`).
From then on it runs under mutual TLS as the identity the certificate names. A
refused token (expired, used up, wrong) is a `StrataError` carrying the
coordinator's reason, which `strata agent run` prints as one line.

Afterwards a `Renewer` thread renews the certificate in the background once 2/3 of
its remaining lifetime (as seen when it was installed, or at start) has passed: a
new TLS key, the same manifest key, over mutual TLS to the coordinator's main port
(the renew address, which the enrollment answer names and `enrollment.json` in the
bundle directory remembers; `enroll.renew_address` overrides it). The new key and
certificate replace the old ones in the bundle directory; `on_renewed` then drops
the client's cached channels, so new connections present the new certificate.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from agent.config import EnrollSettings
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import FailedPrecondition, IntegrityError, NotFound, StrataError
from proto.retry import RetryPolicy, retry_call
from proto.wire import create_channel, error_from_rpc, is_retryable
from storage.keys import KeyPair
from trust.bundle import CERT_FILE, Bundle, ReloadingBundle
from trust.ca import new_tls_key
from trust.enroll import bundle_from_enrollment, enrollment_request
from trust.messages import certificate_from_pb, enroll_request_to_pb, renew_request_to_pb

__all__ = ["ENROLLMENT_FILE", "RENEW_AT", "Renewer", "enroll", "ensure_bundle", "renew_address"]

log = logging.getLogger("strata.agent.enrollment")

# renew once this fraction of the certificate's remaining lifetime has passed
RENEW_AT = 2 / 3
# in the bundle directory: where the certificate is renewed
ENROLLMENT_FILE = "enrollment.json"
_UNSPECIFIED = frozenset({"", "0.0.0.0", "::", "[::]"})


def _translated(call: Callable[[], object], where: str) -> object:
    try:
        return call()
    except grpc.RpcError as exc:
        error = error_from_rpc(exc)
        error.message = f"{where}: {error.message}"
        error.args = (error.message,)
        raise error from exc


def _resolve(address: str, enrolled_through: str) -> str:
    """`address`, its unspecified host (a coordinator listening on 0.0.0.0) replaced by the enrollment host."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return ""
    bare = host.strip("[]")
    try:
        unspecified = host in _UNSPECIFIED or ipaddress.ip_address(bare).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        host = enrolled_through.rpartition(":")[0]
    return f"{host}:{port}"


def _write_json(path: Path, value: dict[str, object]) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(value, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def renew_address(settings: EnrollSettings, bundle_dir: str | Path) -> str:
    """Where to renew: `enroll.renew_address`, else what the coordinator named at enrollment; "" if neither."""
    if settings.renew_address:
        return settings.renew_address
    path = Path(bundle_dir).expanduser() / ENROLLMENT_FILE
    try:
        return str(json.loads(path.read_text()).get("renew_address") or "")
    except (OSError, ValueError, AttributeError):
        return ""


# ---------------------------------------------------------------- enrolling


def enroll(
    settings: EnrollSettings,
    bundle_dir: str | Path,
    *,
    requested_id: str,
    manifest_key: KeyPair | None = None,
    timeout_s: float = 30.0,
    retry: RetryPolicy | None = None,
    stop: threading.Event | None = None,
) -> Bundle:
    """Enroll with `settings.token` as `requested_id` and write the bundle to `bundle_dir`.

    A coordinator that cannot be reached is retried under `retry` (default: a single
    attempt); a refusal is raised at once, its reason the coordinator's (token_expired,
    token_used_up, token_bad_secret, ..., identity_taken, revoked).
    """
    directory = Path(bundle_dir).expanduser()
    ca_path = Path(settings.ca).expanduser()
    if not ca_path.is_file():
        raise NotFound(f"enroll.ca: no CA certificate at {ca_path}", reason="file_not_found")
    ca_pem = ca_path.read_bytes()
    tls_key = new_tls_key()
    manifest_key = manifest_key or KeyPair.generate()
    request = enroll_request_to_pb(
        enrollment_request(token=settings.bootstrap_token(), requested_id=requested_id, tls_key=tls_key, manifest_key=manifest_key)
    )
    where = f"enrollment at {settings.coordinator}"
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with create_channel(settings.coordinator, credentials=credentials) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        reply = retry_call(
            lambda: _translated(lambda: stub.Enroll(request, timeout=timeout_s), where),
            policy=retry or RetryPolicy(attempts=1),
            retryable=is_retryable,
            stop=stop,
            before_retry=lambda error: log.info(
                "enroll_retry", extra={"fields": {"coordinator": settings.coordinator, "error": str(error)[:200]}}
            ),
        )
    certificate = certificate_from_pb(reply)  # type: ignore[arg-type]
    if certificate.enrolled.ca_pem != ca_pem:
        raise IntegrityError(f"{where}: the certificate is of another CA than enroll.ca", reason="wrong_ca")
    bundle = bundle_from_enrollment(certificate.enrolled, tls_key, manifest_key).write(directory)
    _write_json(
        directory / ENROLLMENT_FILE,
        {
            "coordinator": settings.coordinator,
            "renew_address": _resolve(certificate.renew_address, settings.coordinator),
            "identity": str(bundle.identity),
        },
    )
    log.info(
        "enrolled",
        extra={
            "fields": {
                "identity": str(bundle.identity),
                "serial": bundle.certified.serial,
                "not_after": bundle.certified.not_after,
                "bundle": str(directory),
            }
        },
    )
    return bundle


def _remembered_id(state_dir: str) -> str:
    if not state_dir:
        return ""
    try:
        return str(json.loads((Path(state_dir).expanduser() / "progress.json").read_text()).get("agent_id") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def ensure_bundle(
    settings: EnrollSettings,
    bundle_dir: str,
    *,
    agent_id: str = "",
    state_dir: str = "",
    timeout_s: float = 30.0,
    retry: RetryPolicy | None = None,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.time,
) -> bool:
    """Make sure `bundle_dir` holds a bundle whose certificate is still valid, enrolling if it does not
    and a token is configured. True if it enrolled.

    The id asked for is the expired bundle's (a device re-enrolling keeps its identity and
    manifest key), else `agent_id`, else the one remembered in `state_dir`, else a new one.
    """
    directory = Path(bundle_dir).expanduser()
    existing = Bundle.load(directory) if (directory / CERT_FILE).is_file() else None
    if existing is not None and existing.seconds_left(clock()) > 0:
        return False
    if not settings.has_token:
        if existing is None:
            raise NotFound(
                f"tls.bundle {directory} holds no bundle, and there is no enroll.token to enroll with", reason="no_bundle"
            )
        raise FailedPrecondition(
            f"the certificate in {directory} has expired; set enroll.token to enroll again",
            reason="certificate_expired",
        )
    requested = (
        existing.identity.id
        if existing is not None
        else agent_id or _remembered_id(state_dir) or f"agent-{secrets.token_hex(4)}"
    )
    enroll(
        settings,
        directory,
        requested_id=requested,
        manifest_key=existing.manifest_key if existing is not None else None,
        timeout_s=timeout_s,
        retry=retry,
        stop=stop,
    )
    return True


# ---------------------------------------------------------------- renewing


class Renewer:
    """Renews the certificate in a bundle directory before it expires, on a background thread.

    `channel_factory` dials with the current certificate (`trust.security.Security.channel`);
    `on_renewed()` runs after each renewal (the client drops its cached channels). A failed
    renewal is retried with backoff, up to `retry.max_s` apart, for as long as it takes.
    `start`/`stop` are idempotent; a stopped renewer is not restarted.
    """

    def __init__(
        self,
        bundle: ReloadingBundle,
        *,
        address: str,
        channel_factory: Callable[[str], grpc.Channel],
        on_renewed: Callable[[], None] = lambda: None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bundle = bundle
        self.address = address
        self._channel_factory = channel_factory
        self._on_renewed = on_renewed
        self._stop = threading.Event()
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy(base_s=1.0, max_s=60.0)
        self._clock = clock
        self._due: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.renewals = 0

    def due(self) -> float:
        """When the current certificate is to be renewed (POSIX seconds)."""
        certified = self._bundle.current().certified
        if certified.serial not in self._due:
            now = self._clock()
            self._due[certified.serial] = now + RENEW_AT * max(0.0, certified.not_after - now)
        return self._due[certified.serial]

    def start(self) -> Renewer:
        if self._thread is None and not self._stop.is_set():
            due = self.due()  # scheduled from now, before the thread reads it
            self._thread = threading.Thread(target=self._run, name="strata-agent-renew", daemon=True)
            self._thread.start()
            log.info(
                "renewal_scheduled",
                extra={"fields": {"identity": str(self._bundle.identity), "at": round(due, 1), "address": self.address}},
            )
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop renewing; waits up to `timeout` for a renewal in flight."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self._retry.backoff(stop=self._stop)
        while not self._stop.wait(max(0.0, self.due() - self._clock())):
            try:
                self.renew_now()
            except StrataError as e:
                expired = self._bundle.current().seconds_left(self._clock()) <= 0
                log.log(
                    logging.ERROR if expired else logging.WARNING,
                    "renewal_failed",
                    extra={"fields": {"address": self.address, "error": str(e)[:200], "reason": e.reason, "expired": expired}},
                )
                if not backoff.wait():
                    return
                continue
            except Exception:  # noqa: BLE001 - the renewer must outlive one bad attempt
                log.exception("renewal_crashed")
                if not backoff.wait():
                    return
                continue
            backoff.reset()

    def renew_now(self) -> Bundle:
        """Renew at once: a new TLS key, the same manifest key, written to the bundle directory."""
        with self._lock:
            current = self._bundle.current()
            tls_key = new_tls_key()
            request = renew_request_to_pb(
                enrollment_request(
                    token="", requested_id=current.identity.id, tls_key=tls_key, manifest_key=current.manifest_key
                )
            )
            where = f"renewal at {self.address}"
            with self._channel_factory(self.address) as channel:
                stub = pb_grpc.CoordinatorServiceStub(channel)
                reply = _translated(lambda: stub.Renew(request, timeout=self._timeout_s), where)
            certificate = certificate_from_pb(reply)  # type: ignore[arg-type]
            if certificate.enrolled.identity != current.identity or certificate.enrolled.ca_pem != current.ca_pem:
                raise IntegrityError(f"{where}: the certificate is not {current.identity}'s of this fleet", reason="wrong_identity")
            renewed = bundle_from_enrollment(certificate.enrolled, tls_key, current.manifest_key).write(self._bundle.directory)
            self._bundle.current()  # take it up now, not at the next connection
            self.renewals += 1
        log.info(
            "certificate_renewed",
            extra={
                "fields": {
                    "identity": str(renewed.identity),
                    "serial": renewed.certified.serial,
                    "previous": current.certified.serial,
                    "not_after": renewed.certified.not_after,
                }
            },
        )
        self._on_renewed()
        return renewed
