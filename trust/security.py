"""A process's security as one object: its bundle, the access interceptor, and how it dials others.

Every daemon config has a `tls` section with one key, `bundle`. Set, the process
serves mutual TLS with the bundle's certificate (reloaded on renewal with no
restart), authorizes every call through `trust.interceptor.TrustInterceptor` and
`trust.roles`, dials every peer with its client certificate, and signs manifests
with the manifest key its certificate certifies, embedding that certificate in
every manifest it signs (`manifest_key` is a certified `KeyPair` that follows
renewals). `signers` judges the manifests others signed against the same fleet
CA and the revocation list the interceptor holds. Empty, it speaks plaintext: for
demos and tests on loopback; listening anywhere else without TLS logs a warning.

The revocation list a process enforces arrives while it runs (`trust.distribution`);
`set_revocations` installs a newer one, and with `keep_revocations(path)` the
installed list is also kept on disk, so a restarted daemon enforces it before it
hears from upstream again.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from proto.errors import StrataError
from proto.wire import create_channel
from storage.keys import KeyPair
from trust.bundle import ReloadingBundle
from trust.identity import Identity
from trust.interceptor import TrustInterceptor
from trust.limits import FairShare
from trust.revocation import RevocationList
from trust.signers import Signers

log = logging.getLogger("strata.trust")

ChannelFactory = Callable[[str], grpc.Channel]


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    bundle: str = _help(
        "bundle directory from `strata certs issue` (ca.pem, cert.pem, key.pem, manifest.key): mutual TLS on "
        "every connection, calls authorized by role; empty: plaintext, for loopback demos and tests",
        default="",
    )


class Security:
    def __init__(self, directory: str, *, fair_share: FairShare | None = None) -> None:
        self.bundle = ReloadingBundle(directory)
        self.interceptor = TrustInterceptor.for_bundle(self.bundle.current())
        self.fair_share = fair_share or FairShare()
        self._revocations_path: Path | None = None
        key = self.bundle.current().manifest_key
        self._manifest_key = key.with_certificate(functools.partial(_certificate_of, self.bundle, key.public_key))

    @classmethod
    def configure(
        cls, settings: TlsSettings, *, listen: str = "", who: str, fair_share: FairShare | None = None
    ) -> Security | None:
        """The security `settings` ask for; None for plaintext (with a warning when `listen` is not loopback)."""
        if settings.bundle:
            security = cls(settings.bundle, fair_share=fair_share)
            log.info("tls_on", extra={"fields": {"who": who, "identity": str(security.identity)}})
            return security
        if listen and not is_loopback(listen):
            log.warning(
                "plaintext_on_the_network",
                extra={"fields": {"who": who, "listen": listen, "hint": "set tls.bundle (strata certs issue)"}},
            )
        return None

    @property
    def identity(self) -> Identity:
        return self.bundle.identity

    @property
    def manifest_key(self) -> KeyPair:
        """The key this identity's manifests are signed with: the one its certificate certifies, carrying
        the current certificate (renewals keep the key), which it embeds in every manifest it signs."""
        return self._manifest_key

    @property
    def signers(self) -> Signers:
        """How this process judges others' manifest signers: its fleet CA and current revocation list."""
        return self.interceptor.signers

    def server_credentials(self) -> grpc.ServerCredentials:
        return self.bundle.server_credentials()

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Who may call what, then how much of it: the trust check first, so the limits know the caller."""
        return [self.interceptor, self.fair_share]

    def channel(self, address: str, **options: Any) -> grpc.Channel:
        """A mutual-TLS channel with the current certificate (a renewed one applies to new channels).

        The credentials come from the bundle as last read whole, never from files halfway
        through a renewal."""
        return create_channel(address, credentials=self.bundle.channel_credentials(), **options)

    # ------------------------------------------------------------ revocation

    @property
    def revocations(self) -> RevocationList | None:
        """The revocation list this process enforces (None: none yet)."""
        return self.interceptor.revocations

    @property
    def revocations_version(self) -> int:
        revocations = self.interceptor.revocations
        return 0 if revocations is None else revocations.version

    def set_revocations(self, revocations: RevocationList) -> bool:
        """Enforce `revocations` from the next call on, if the CA signed it and it is newer than the list
        held (False otherwise; IntegrityError if the signature does not verify)."""
        if not self.interceptor.set_revocations(revocations):
            return False
        log.info(
            "revocations_installed",
            extra={
                "fields": {
                    "version": revocations.version,
                    "identities": len(revocations.identities),
                    "serials": len(revocations.serials),
                }
            },
        )
        if self._revocations_path is not None:
            _write_atomic(self._revocations_path, revocations.to_bytes())
        return True

    def keep_revocations(self, path: str | Path) -> None:
        """Keep the enforced list in `path`: enforce the one saved there now (if it verifies), and save
        every newer one installed from here on."""
        self._revocations_path = Path(path)
        if not self._revocations_path.is_file():
            return
        try:
            self.interceptor.set_revocations(RevocationList.from_bytes(self._revocations_path.read_bytes()))
        except (StrataError, OSError) as e:
            log.warning("saved_revocations_unusable", extra={"fields": {"path": str(path), "error": str(e)[:200]}})
            return
        log.info("revocations_restored", extra={"fields": {"version": self.revocations_version, "path": str(path)}})


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)


def _certificate_of(bundle: ReloadingBundle, public_key: str) -> str | None:
    """The bundle's current certificate as PEM text, while it certifies `public_key` (renewals keep the key)."""
    current = bundle.current()
    return current.cert_pem.decode("ascii") if current.certified.manifest_key == public_key else None


def channel_factory(security: Security | None) -> ChannelFactory:
    """How a process dials: with its certificate, or in plaintext."""
    return create_channel if security is None else security.channel


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
