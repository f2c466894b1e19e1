"""Ed25519 identities: a producer signs the manifests it writes, anyone can check them.

A key file is a small JSON object, readable only by its owner (mode 0600):
``{"type": "ed25519", "private": "<base64 raw 32 bytes>", "public": "<base64 raw 32 bytes>"}``.
Public keys and signatures travel as standard base64 text.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proto.errors import IntegrityError, InvalidInput

__all__ = ["KEY_TYPE", "KeyPair", "verify_signature"]

KEY_TYPE = "ed25519"
_RAW = serialization.Encoding.Raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: object, length: int | None = None) -> bytes | None:
    """Strict base64 decode; None if `text` is not valid base64 of the expected length."""
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    if length is not None and len(raw) != length:
        return None
    # Refuse spellings with stray padding bits, so one signature has exactly one text form.
    if _b64(raw) != text:
        return None
    return raw


class KeyPair:
    """An ed25519 private key and its public half, and optionally the certificate that certifies it.

    A certified pair (`with_certificate`) embeds its certificate in every manifest it
    signs (`storage.manifest.Manifest.signed`), so anyone holding the fleet CA can
    tell offline whose key signed it. The certificate is read when a manifest is
    signed, so a pair whose certificate source follows renewals always embeds the
    current one.
    """

    def __init__(
        self, private_key: Ed25519PrivateKey, *, certificate: str | Callable[[], str | None] | None = None
    ) -> None:
        self._private = private_key
        self._public_raw = private_key.public_key().public_bytes(
            _RAW, serialization.PublicFormat.Raw
        )
        self._certificate = certificate

    def with_certificate(self, certificate: str | Callable[[], str | None] | None) -> KeyPair:
        """This key with a certificate (PEM text, or a function returning the current one); None: bare."""
        return KeyPair(self._private, certificate=certificate)

    @property
    def certificate(self) -> str | None:
        """The PEM certificate certifying this key (embedded in what it signs); None for a bare key."""
        source = self._certificate
        return source() if callable(source) else source

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> str:
        """Base64 of the raw 32-byte public key."""
        return _b64(self._public_raw)

    def sign(self, data: bytes) -> str:
        """Base64 ed25519 signature of `data`."""
        return _b64(self._private.sign(data))

    def __repr__(self) -> str:
        certified = ", certified" if self._certificate is not None else ""
        return f"KeyPair(public_key={self.public_key!r}{certified})"

    # ------------------------------------------------------------ files

    def _file_bytes(self) -> bytes:
        private_raw = self._private.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        record = {"type": KEY_TYPE, "private": _b64(private_raw), "public": self.public_key}
        return (json.dumps(record, sort_keys=True, indent=1) + "\n").encode("ascii")

    def _write_temp(self, directory: Path) -> str:
        """Write the key to a 0600 temp file in `directory`, synced; return its path."""
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".key-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self._file_bytes())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def save(self, path: str | Path) -> None:
        """Write the key file atomically with mode 0600, replacing any file at `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = self._write_temp(path.parent)
        os.replace(temp, path)

    @classmethod
    def load(cls, path: str | Path) -> KeyPair:
        """Read a key file: FileNotFoundError if missing, InvalidInput(reason="bad_key") if malformed."""
        path = Path(path)
        text = path.read_bytes()
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("type") != KEY_TYPE:
            raise InvalidInput(f"{path}: not an {KEY_TYPE} key file", reason="bad_key")
        private_raw = _unb64(record.get("private"), 32)
        if private_raw is None:
            raise InvalidInput(f"{path}: 'private' must be base64 of 32 bytes", reason="bad_key")
        pair = cls(Ed25519PrivateKey.from_private_bytes(private_raw))
        if record.get("public") != pair.public_key:
            raise InvalidInput(f"{path}: 'public' does not match the private key", reason="bad_key")
        return pair

    @classmethod
    def load_or_create(cls, path: str | Path) -> KeyPair:
        """Load the key at `path`, or create it there. Safe when several processes race."""
        path = Path(path)
        try:
            return cls.load(path)
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        pair = cls.generate()
        temp = pair._write_temp(path.parent)
        try:
            os.link(temp, path)  # fails if another process created the key first
        except FileExistsError:
            return cls.load(path)
        finally:
            os.unlink(temp)
        return pair


def verify_signature(public_key: str, data: bytes, signature: str) -> None:
    """Check an ed25519 signature; raise IntegrityError(reason="bad_signature") if it does not hold."""
    key_raw = _unb64(public_key, 32)
    if key_raw is None:
        raise IntegrityError(
            "bad signature: public key is not base64 of 32 bytes", reason="bad_signature"
        )
    sig_raw = _unb64(signature, 64)
    if sig_raw is None:
        raise IntegrityError(
            "bad signature: signature is not base64 of 64 bytes", reason="bad_signature"
        )
    try:
        Ed25519PublicKey.from_public_bytes(key_raw).verify(sig_raw, data)
    except (InvalidSignature, ValueError):
        raise IntegrityError(
            "bad signature: does not verify under the given public key", reason="bad_signature"
        ) from None
