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
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto.wire import create_channel
from storage.keys import KeyPair
from trust.bundle import ReloadingBundle
from trust.identity import Identity
from trust.interceptor import TrustInterceptor
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
    def __init__(self, directory: str) -> None:
        self.bundle = ReloadingBundle(directory)
        self.interceptor = TrustInterceptor.for_bundle(self.bundle.current())
        key = self.bundle.current().manifest_key
        self._manifest_key = key.with_certificate(functools.partial(_certificate_of, self.bundle, key.public_key))

    @classmethod
    def configure(cls, settings: TlsSettings, *, listen: str = "", who: str) -> Security | None:
        """The security `settings` ask for; None for plaintext (with a warning when `listen` is not loopback)."""
        if settings.bundle:
            security = cls(settings.bundle)
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

    def channel(self, address: str, **options: Any) -> grpc.Channel:
        """A mutual-TLS channel with the current certificate (a renewed one applies to new channels)."""
        return create_channel(address, tls=self.bundle.tls_files(), **options)

    def set_revocations(self, revocations: RevocationList) -> bool:
        return self.interceptor.set_revocations(revocations)


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
