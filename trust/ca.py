"""The fleet CA: one ECDSA P-256 key that certifies every identity of one fleet.

A CA directory (mode 0700) holds:

- ``ca.pem``  the CA certificate (every process of the fleet trusts it);
- ``ca.key``  its PKCS#8 private key, mode 0600 (`load` refuses a key others can read);
- ``issued.db``  the inventory of every certificate issued (SQLite), for `strata certs list`
  and for enrollment's "one identity, one key" check;
- ``revocations.json``  the signed revocation list (`trust.revocation`).

Certificates are ECDSA P-256 / SHA-256, which gRPC's BoringSSL handles natively. Each
names its holder in one SAN URI ``strata://<fleet>/<role>/<id>`` and certifies its
manifest key (`trust.identity`). Daemon roles that serve (relay, aggregator,
coordinator) get serverAuth and clientAuth, and their host names as DNS/IP SANs; the
others get clientAuth only, so an agent's certificate cannot serve (BoringSSL checks
the extended key usage). Validity is short by default (`DEFAULT_VALIDITY`): a day
for agents and auditors, a week for operators, 30 days for daemons; renewal is
re-issuing, not extending. `not_before` is backdated 5 minutes for clock skew.

This module never imports gRPC directly; `issue` returns a `trust.bundle.Bundle`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proto.errors import FailedPrecondition, IntegrityError, InvalidInput, NotFound
from storage.durable import DurableSqlite
from storage.keys import KeyPair, verify_signature
from trust.bundle import Bundle
from trust.errors import IdentityError
from trust.identity import (
    Certified,
    Identity,
    Role,
    ca_fleet,
    check_fleet,
    manifest_key_extension,
    read_certificate,
)
from trust.revocation import RevocationList

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_VALIDITY",
    "MAX_VALIDITY",
    "SERVER_ROLES",
    "FleetCA",
    "IssuedCertificate",
    "enrollment_proof_message",
    "new_tls_key",
    "parse_duration",
    "private_key_pem",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
INVENTORY_FILE = "issued.db"
REVOCATIONS_FILE = "revocations.json"

SERVER_ROLES = frozenset({Role.RELAY, Role.AGGREGATOR, Role.COORDINATOR})
DEFAULT_VALIDITY: dict[Role, timedelta] = {
    Role.AGENT: timedelta(hours=24),
    Role.RELAY: timedelta(days=30),
    Role.AGGREGATOR: timedelta(days=30),
    Role.COORDINATOR: timedelta(days=30),
    Role.OPERATOR: timedelta(days=7),
    Role.AUDIT: timedelta(hours=24),
}
# No leaf outlives this, whatever is asked (the CA/Browser Forum's ceiling for TLS leaves).
MAX_VALIDITY = timedelta(days=397)
CA_VALIDITY = timedelta(days=3650)
_SKEW = timedelta(minutes=5)
_CURVE = ec.SECP256R1
_DNS = re.compile(r"^(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | float | int | timedelta) -> timedelta:
    """"30d", "24h", "90m", "3600s", "2w" or plain seconds, as a positive timedelta."""
    if isinstance(text, timedelta):
        value = text
    elif isinstance(text, int | float) and not isinstance(text, bool):
        value = timedelta(seconds=text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise InvalidInput(f"duration {text!r}: expected e.g. 30d, 24h, 90m, 3600s or 2w", reason="bad_duration")
        value = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    if value <= timedelta(0):
        raise InvalidInput(f"duration {text!r} must be positive", reason="bad_duration")
    return value


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, the only key type Strata certifies for TLS."""
    return ec.generate_private_key(_CURVE())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def enrollment_proof_message(csr_der: bytes) -> bytes:
    """What the enrolling holder signs with its manifest key: binds that key to the CSR (and so to the TLS key)."""
    return b"strata-enroll/1\x00" + hashlib.sha256(csr_der).digest()


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` atomically with `mode`, never readable by others even for an instant."""
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


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not isinstance(host, str) or not _DNS.match(host):
            raise InvalidInput(f"host {host!r} is neither an IP address nor a DNS name", reason="bad_host")
        names.append(x509.DNSName(host.lower()))
    return names


@dataclass(frozen=True, kw_only=True)
class IssuedCertificate:
    """One inventory row: what was certified, when, and how (issued by an operator, or enrolled)."""

    certified: Certified
    issued_at: float
    how: str
    pem: str

    def to_json(self) -> dict[str, object]:
        return {**self.certified.to_json(), "issued_at": self.issued_at, "how": self.how}


class _Inventory(DurableSqlite):
    SCHEMA = """
    CREATE TABLE IF NOT EXISTS issued (
        serial TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        id TEXT NOT NULL,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        manifest_key TEXT NOT NULL,
        issued_at REAL NOT NULL,
        how TEXT NOT NULL,
        pem TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS issued_by_identity ON issued (role, id);
    """
    SCHEMA_VERSION = 1

    def record(self, certified: Certified, pem: bytes, *, issued_at: float, how: str) -> None:
        self._write(
            [
                (
                    "INSERT INTO issued (serial, role, id, not_before, not_after, manifest_key, issued_at, how, pem)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        certified.serial,
                        certified.identity.role.value,
                        certified.identity.id,
                        certified.not_before,
                        certified.not_after,
                        certified.manifest_key,
                        issued_at,
                        how,
                        pem.decode("ascii"),
                    ),
                )
            ]
        )

    def rows(self, where: str = "", args: tuple[object, ...] = ()) -> list[IssuedCertificate]:
        rows = self._read(f"SELECT pem, issued_at, how FROM issued {where} ORDER BY issued_at, rowid", args)
        return [
            IssuedCertificate(certified=read_certificate(row["pem"]), issued_at=row["issued_at"], how=row["how"], pem=row["pem"])
            for row in rows
        ]


class FleetCA:
    """A fleet's certificate authority, on disk. Create with `FleetCA.init`, open with `FleetCA.load`.

    Thread-safe. `clock` (POSIX seconds) is injectable for tests.
    """

    def __init__(
        self,
        *,
        directory: Path,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.cert = cert
        self._key = key
        self.clock = clock
        self._lock = threading.Lock()
        self.fleet = ca_fleet(cert)
        self._inventory = _Inventory(self.directory / INVENTORY_FILE)

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def init(
        cls,
        directory: str | Path,
        fleet: str,
        *,
        validity: timedelta = CA_VALIDITY,
        clock: Callable[[], float] = time.time,
    ) -> FleetCA:
        """Create a new CA for `fleet` in `directory` (created 0700); refuses to overwrite an existing CA."""
        check_fleet(fleet)
        directory = Path(directory).expanduser()
        if (directory / CA_KEY_FILE).exists() or (directory / CA_CERT_FILE).exists():
            raise FailedPrecondition(f"{directory} already holds a CA; refusing to overwrite it", reason="ca_exists")
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = new_tls_key()
        now = _utc(clock())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, fleet),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Strata fleet CA {fleet}"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(directory / CA_KEY_FILE, private_key_pem(key))
        _write_private(directory / CA_CERT_FILE, _cert_pem(cert), mode=0o644)
        ca = cls(directory=directory, cert=cert, key=key, clock=clock)
        ca._save_revocations(RevocationList.empty(fleet, now=clock()).signed(ca.sign_bytes))
        return ca

    @classmethod
    def load(cls, directory: str | Path, *, clock: Callable[[], float] = time.time) -> FleetCA:
        """Open the CA in `directory`: NotFound if there is none, FailedPrecondition if its key is exposed."""
        directory = Path(directory).expanduser()
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        if not key_path.exists() or not cert_path.exists():
            raise NotFound(f"no CA in {directory} (create one with `strata certs init`)", reason="no_ca")
        if key_path.stat().st_mode & 0o077:
            raise FailedPrecondition(
                f"{key_path} is readable by others; `chmod 600` it (the CA key must be private)",
                reason="insecure_permissions",
            )
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise IntegrityError(f"{key_path} is not the key of {cert_path}", reason="ca_key_mismatch")
        return cls(directory=directory, cert=cert, key=key, clock=clock)

    def close(self) -> None:
        self._inventory.close()

    def __enter__(self) -> FleetCA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ what it is

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate's DER, hex: what an operator compares out of band."""
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def sign_bytes(self, data: bytes) -> bytes:
        """An ECDSA P-256 / SHA-256 signature (DER) of `data` by the CA key: revocation lists use it."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    # ------------------------------------------------------------ issuing

    def issue(
        self,
        identity: Identity,
        manifest_key: KeyPair,
        validity: timedelta | None = None,
        *,
        hosts: Iterable[str] = (),
    ) -> Bundle:
        """A new TLS key and a certificate for `identity` certifying `manifest_key`'s public half, as a Bundle.

        For daemons and operators, whose bundle an operator hands over. Agents enroll with
        `sign_csr` instead, so their TLS key never leaves the device.
        """
        key = new_tls_key()
        cert_pem = self._certify(identity, key.public_key(), manifest_key.public_key, validity, hosts, how="issued")
        return Bundle(ca_pem=self.cert_pem, cert_pem=cert_pem, key_pem=private_key_pem(key), manifest_key=manifest_key)

    def sign_csr(
        self,
        csr_pem: bytes | str,
        identity: Identity,
        manifest_key_public: str,
        validity: timedelta | None = None,
        *,
        manifest_key_proof: str,
        hosts: Iterable[str] = (),
    ) -> bytes:
        """The certificate (PEM) for an enrollment: the CSR's key, `identity`, `manifest_key_public`.

        The CSR proves possession of the TLS key; `manifest_key_proof` (the manifest key's
        ed25519 signature of `enrollment_proof_message(csr DER)`) proves possession of the
        manifest key. The identity is the caller's decision (from a bootstrap token), never
        the CSR's: its subject and requested extensions are ignored.
        """
        public = self.check_csr(csr_pem, manifest_key_public, manifest_key_proof)
        return self._certify(identity, public, manifest_key_public, validity, hosts, how="enrolled")

    def check_csr(self, csr_pem: bytes | str, manifest_key_public: str, manifest_key_proof: str) -> ec.EllipticCurvePublicKey:
        """The CSR's TLS key, once the CSR proves it and the proof proves `manifest_key_public`.

        InvalidInput: bad_csr, bad_csr_key (not P-256), bad_proof. Cheap, stateless: run it
        before spending anything (a token use) on an enrollment.
        """
        data = csr_pem.encode("ascii") if isinstance(csr_pem, str) else bytes(csr_pem)
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError:
            raise InvalidInput("not a PEM certificate signing request", reason="bad_csr") from None
        if not csr.is_signature_valid:
            raise InvalidInput("the CSR's signature does not verify: it proves no key", reason="bad_csr")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, _CURVE):
            raise InvalidInput("the CSR's key must be ECDSA P-256", reason="bad_csr_key")
        try:
            verify_signature(
                manifest_key_public,
                enrollment_proof_message(csr.public_bytes(serialization.Encoding.DER)),
                manifest_key_proof,
            )
        except IntegrityError:
            raise InvalidInput(
                "the manifest key's proof does not verify over this CSR", reason="bad_proof"
            ) from None
        return public

    def _certify(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        manifest_key_public: str,
        validity: timedelta | None,
        hosts: Iterable[str],
        *,
        how: str,
    ) -> bytes:
        if not isinstance(identity, Identity):
            raise IdentityError("expected an Identity", reason="bad_identity")
        validity = parse_duration(validity if validity is not None else DEFAULT_VALIDITY[identity.role])
        if validity > MAX_VALIDITY:
            raise InvalidInput(f"validity {validity} exceeds the maximum of {MAX_VALIDITY}", reason="bad_duration")
        host_names = _host_names(hosts)
        server = identity.role in SERVER_ROLES
        if host_names and not server:
            raise InvalidInput(
                f"only serving roles ({', '.join(sorted(r.value for r in SERVER_ROLES))}) carry host names",
                reason="bad_host",
            )
        with self._lock:
            now = _utc(self.clock())
            not_after = min(now + validity, self.cert.not_valid_after_utc)
            if not_after <= now:
                raise FailedPrecondition("the CA certificate has expired", reason="ca_expired")
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.fleet),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, identity.id),
                ]
            )
            cert = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(self.cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _SKEW)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(
                    x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri(self.fleet)), *host_names]),
                    critical=False,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
                .add_extension(manifest_key_extension(manifest_key_public), critical=False)
                .sign(self._key, hashes.SHA256())
            )
            pem = _cert_pem(cert)
            self._inventory.record(read_certificate(cert), pem, issued_at=now.timestamp(), how=how)
        return pem

    # ------------------------------------------------------------ inventory

    def issued(self, identity: Identity | None = None) -> list[IssuedCertificate]:
        """Every certificate issued (for `identity` only, if given), oldest first."""
        if identity is None:
            return self._inventory.rows()
        return self._inventory.rows("WHERE role = ? AND id = ?", (identity.role.value, identity.id))

    def find(self, serial: str) -> IssuedCertificate:
        rows = self._inventory.rows("WHERE serial = ?", (serial.lower().lstrip("0") or "0",))
        if not rows:
            raise NotFound(f"no certificate with serial {serial} was issued by this CA", reason="not_found")
        return rows[0]

    def verify(self, cert: x509.Certificate | bytes | str) -> Certified:
        """What `cert` certifies, after checking that this CA signed it; IntegrityError otherwise."""
        certified = read_certificate(cert, fleet=self.fleet)
        parsed = cert if isinstance(cert, x509.Certificate) else x509.load_pem_x509_certificate(
            cert.encode("ascii") if isinstance(cert, str) else bytes(cert)
        )
        try:
            parsed.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise IntegrityError("the certificate was not issued by this CA", reason="wrong_ca") from None
        return certified

    # ------------------------------------------------------------ revocation

    def revocations(self) -> RevocationList:
        """The current signed revocation list, verified."""
        path = self.directory / REVOCATIONS_FILE
        if not path.exists():
            return RevocationList.empty(self.fleet, now=self.clock()).signed(self.sign_bytes)
        return RevocationList.from_bytes(path.read_bytes()).verify_with(self.cert)

    def revoke(self, *, identities: Iterable[Identity] = (), serials: Iterable[str] = ()) -> RevocationList:
        """Add identities and/or serials to the revocation list: a new version, signed and saved."""
        with self._lock:
            current = self.revocations()
            updated = current.with_revoked(identities=identities, serials=serials, now=self.clock())
            if updated == current:
                return current
            signed = updated.signed(self.sign_bytes)
            self._save_revocations(signed)
            return signed

    def _save_revocations(self, revocations: RevocationList) -> None:
        _write_private(self.directory / REVOCATIONS_FILE, revocations.to_bytes(), mode=0o644)

