"""A process's credentials as one directory, which its config names with one key (`tls.bundle`).

A bundle directory (mode 0700) holds:

- ``ca.pem``        the fleet CA certificate: whom to trust;
- ``cert.pem``      this process's certificate (its identity and certified manifest key);
- ``key.pem``       its ECDSA P-256 TLS key, PKCS#8, mode 0600;
- ``manifest.key``  its ed25519 manifest-signing key in `storage.keys`' format, mode 0600.

`Bundle.load` checks that the pieces belong together: the certificate was issued by
the CA, the TLS key is the certificate's, and the manifest key is the one the
certificate certifies. `tls_files()` is the `proto.wire.TlsFiles` view that
`create_server(tls=...)` and `create_channel(tls=...)` take (a server given `ca`
demands client certificates).

Renewal replaces ``key.pem`` then ``cert.pem``, each by renaming a new file over the
old one (`write` does; so must any other tool, since a reader notices changes by
inode, size and mtime); the manifest key stays. `ReloadingBundle` picks up the renewed pair without a restart: its
`server_credentials()` are gRPC's dynamic SSL credentials, whose fetcher gRPC calls
before each new connection's handshake (it works with grpc.aio servers; see
tests/test_trust_bundle.py), and which serve the new certificate as soon as the pair
on disk is consistent again. Connections already open keep the certificate they
started with. Clients build channels from `current()`; `generation` tells them when
to rebuild.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from proto.errors import FailedPrecondition, IntegrityError, InvalidInput, NotFound, StrataError
from proto.wire import TlsFiles
from storage.keys import KeyPair
from trust.identity import Certified, Identity, ca_fleet, load_certificate, read_certificate

__all__ = ["CA_FILE", "CERT_FILE", "KEY_FILE", "MANIFEST_KEY_FILE", "Bundle", "ReloadingBundle"]

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
MANIFEST_KEY_FILE = "manifest.key"
_FILES = (CA_FILE, CERT_FILE, KEY_FILE, MANIFEST_KEY_FILE)
_PRIVATE_FILES = (KEY_FILE, MANIFEST_KEY_FILE)

log = logging.getLogger("strata.trust")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)


@dataclass(frozen=True, eq=False)
class Bundle:
    """A CA certificate, a certificate, its TLS key and the certified manifest key, checked to belong together."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    manifest_key: KeyPair
    directory: Path | None = None
    certified: Certified = field(init=False)
    ca_cert: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ca = load_certificate(self.ca_pem)
        cert = load_certificate(self.cert_pem)
        certified = read_certificate(cert, fleet=ca_fleet(ca))
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise IntegrityError(f"{self._where(CERT_FILE)} was not issued by {self._where(CA_FILE)}", reason="wrong_ca") from None
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError):
            raise InvalidInput(f"{self._where(KEY_FILE)} is not an unencrypted PEM private key", reason="bad_key") from None
        if key.public_key() != cert.public_key():
            raise IntegrityError(f"{self._where(KEY_FILE)} is not the key of {self._where(CERT_FILE)}", reason="key_mismatch")
        if certified.manifest_key != self.manifest_key.public_key:
            raise IntegrityError(
                f"{self._where(MANIFEST_KEY_FILE)} is not the manifest key {self._where(CERT_FILE)} certifies",
                reason="manifest_key_mismatch",
            )
        object.__setattr__(self, "certified", certified)
        object.__setattr__(self, "ca_cert", ca)

    def _where(self, name: str) -> str:
        return str(self.directory / name) if self.directory is not None else name

    @property
    def identity(self) -> Identity:
        return self.certified.identity

    @property
    def fleet(self) -> str:
        return self.certified.fleet

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until the certificate expires (negative once it has)."""
        return self.certified.not_after - (time.time() if now is None else now)

    def __repr__(self) -> str:
        return f"Bundle(identity={str(self.identity)!r}, fleet={self.fleet!r}, serial={self.certified.serial!r}, directory={self.directory})"

    # ------------------------------------------------------------ files

    @classmethod
    def load(cls, directory: str | Path) -> Bundle:
        """Read and check the bundle in `directory`: NotFound if a file is missing, FailedPrecondition if a
        private file is readable by others, IntegrityError if the pieces do not belong together."""
        directory = Path(directory).expanduser()
        for name in _FILES:
            if not (directory / name).is_file():
                raise NotFound(f"{directory / name} is missing: not a bundle directory", reason="no_bundle")
        for name in _PRIVATE_FILES:
            if (directory / name).stat().st_mode & 0o077:
                raise FailedPrecondition(
                    f"{directory / name} is readable by others; `chmod 600` it", reason="insecure_permissions"
                )
        return cls(
            ca_pem=(directory / CA_FILE).read_bytes(),
            cert_pem=(directory / CERT_FILE).read_bytes(),
            key_pem=(directory / KEY_FILE).read_bytes(),
            manifest_key=KeyPair.load(directory / MANIFEST_KEY_FILE),
            directory=directory,
        )

    def write(self, directory: str | Path) -> Bundle:
        """Write the bundle to `directory` (created 0700), each file atomically; the key before the certificate,
        so a reader never pairs a new certificate with an old key. Returns the bundle as stored there."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        _write_atomic(directory / CA_FILE, self.ca_pem, 0o644)
        self.manifest_key.save(directory / MANIFEST_KEY_FILE)
        _write_atomic(directory / KEY_FILE, self.key_pem, 0o600)
        _write_atomic(directory / CERT_FILE, self.cert_pem, 0o644)
        return Bundle(
            ca_pem=self.ca_pem, cert_pem=self.cert_pem, key_pem=self.key_pem, manifest_key=self.manifest_key, directory=directory
        )

    # ------------------------------------------------------------ gRPC

    def tls_files(self) -> TlsFiles:
        """The paths `proto.wire.create_channel` / `proto.serving.create_server` take: ca given, so mTLS."""
        if self.directory is None:
            raise FailedPrecondition("an unsaved bundle has no files; write() it first", reason="no_bundle")
        return TlsFiles(cert=self.directory / CERT_FILE, key=self.directory / KEY_FILE, ca=self.directory / CA_FILE)

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Static server credentials. `require_client_auth=False` serves TLS to callers without certificates
        (enrollment, probes); gRPC Python then does not even ask for a client certificate."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=require_client_auth
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials: trust the fleet CA, present this certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem)


def _stamp(directory: Path) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for name in _FILES:
        try:
            st = (directory / name).stat()
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            stamps.append((0, 0, 0))
    return tuple(stamps)


class ReloadingBundle:
    """A bundle directory watched for renewal: `current()` is the newest consistent bundle on disk.

    Checking costs four stat() calls; the files are read again only when one changed. A
    half-written renewal (new key, old certificate) or a broken file keeps the previous
    bundle in service, with one log line per change seen, until the files agree again.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self._lock = threading.Lock()
        self._stamp = _stamp(self.directory)
        self._bundle = Bundle.load(self.directory)
        self._failed_stamp: tuple[tuple[int, int, int], ...] | None = None
        self.generation = 0

    def current(self) -> Bundle:
        stamp = _stamp(self.directory)
        with self._lock:
            if stamp == self._stamp or stamp == self._failed_stamp:
                return self._bundle
            try:
                bundle = Bundle.load(self.directory)
            except (StrataError, OSError, ValueError) as e:
                self._failed_stamp = stamp
                log.warning(
                    "bundle_reload_failed",
                    extra={"fields": {"directory": str(self.directory), "error": str(e)[:200], "keeping": self._bundle.certified.serial}},
                )
                return self._bundle
            if _stamp(self.directory) != stamp:  # changed again while we read: read it next time
                return self._bundle
            previous, self._bundle, self._stamp, self._failed_stamp = self._bundle, bundle, stamp, None
            if bundle.cert_pem != previous.cert_pem or bundle.ca_pem != previous.ca_pem:
                self.generation += 1
                log.info(
                    "bundle_reloaded",
                    extra={"fields": {"identity": str(bundle.identity), "serial": bundle.certified.serial, "not_after": bundle.certified.not_after}},
                )
            return self._bundle

    @property
    def identity(self) -> Identity:
        return self.current().identity

    def tls_files(self) -> TlsFiles:
        return self.current().tls_files()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials from the current files; a client rebuilds its channel when `generation` moves."""
        return self.current().channel_credentials()

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """gRPC dynamic SSL credentials: before each new connection's handshake gRPC asks for the
        certificate configuration, and gets the renewed one once it is on disk."""
        served = [self.current()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # called by gRPC core on its own thread for every new connection: never raise
            try:
                bundle = self.current()
                if bundle is served[0]:
                    return None
                served[0] = bundle
                return bundle.certificate_configuration()
            except Exception:  # noqa: BLE001 - an exception here would fail the handshake
                log.exception("bundle_fetch_failed", extra={"fields": {"directory": str(self.directory)}})
                return None

        return grpc.dynamic_ssl_server_credentials(
            served[0].certificate_configuration(), fetch, require_client_authentication=require_client_auth
        )
