"""Keys that sign ledger rows, held by the operator; built on `cryptography`, nothing hand-rolled.

Two kinds, told apart by the key file's content:

    Ed25519        a PEM private key (`expunge keygen`, or `openssl genpkey -algorithm ed25519`). Anyone
                   holding the public key (KEY.pub, published by the operator) can check a signature.
    HMAC-SHA256    a file of at least 64 hex digits (`expunge keygen --hmac`, or `openssl rand -hex 32`).
                   Only holders of the same secret can check: for the operator's own audits.

Where a key comes from: ``--signing-key FILE`` on the command line (``signing_key=`` in Python), else the
file named by the environment variable EXPUNGE_SIGNING_KEY, else no key (rows are chained, not signed).
A key is known by its id, the first 16 hex digits of a hash of its public half (Ed25519) or an HMAC of a
fixed label (HMAC), so that a run can record which key signs it without revealing a secret.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ExpungeError

ENV = "EXPUNGE_SIGNING_KEY"
ED25519, HMAC = "ed25519", "hmac-sha256"
MIN_HMAC_BYTES = 32
_KEY_ID_LABEL = b"expunge signing key id"


def _hmac(secret: bytes, message: bytes) -> bytes:
    h = hmac.HMAC(secret, hashes.SHA256())
    h.update(message)
    return h.finalize()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class Verifier:
    """Checks signatures made by one key: an Ed25519 public key, or an HMAC secret."""

    alg: str
    key_id: str
    key: object  # Ed25519PublicKey, or the HMAC secret (bytes)

    def check(self, message: bytes, signature: str) -> bool:
        try:
            raw = bytes.fromhex(signature)
        except (TypeError, ValueError):
            return False
        if self.alg == ED25519:
            try:
                self.key.verify(raw, message)
                return True
            except InvalidSignature:
                return False
        h = hmac.HMAC(self.key, hashes.SHA256())
        h.update(message)
        try:
            h.verify(raw)  # constant-time comparison
            return True
        except InvalidSignature:
            return False

    @property
    def public_pem(self) -> str | None:
        return _public_pem(self.key) if self.alg == ED25519 else None


@dataclass(frozen=True)
class Signer:
    """Signs with one key; ``describe()`` is what a run records about it (never the secret)."""

    alg: str
    key_id: str
    key: object  # Ed25519PrivateKey, or the HMAC secret (bytes)

    def sign(self, message: bytes) -> str:
        return (self.key.sign(message) if self.alg == ED25519 else _hmac(self.key, message)).hex()

    def verifier(self) -> Verifier:
        return Verifier(self.alg, self.key_id, self.key.public_key() if self.alg == ED25519 else self.key)

    def describe(self) -> dict:
        return {"alg": self.alg, "key_id": self.key_id, "public_key": self.verifier().public_pem}


def _ed25519_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def _hmac_id(secret: bytes) -> str:
    return _hmac(secret, _KEY_ID_LABEL).hex()[:16]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ExpungeError(f"cannot read the key file {path} ({e.strerror or e}); check the path "
                           f"(--signing-key, --public-key or ${ENV})") from None


def _hmac_secret(path: Path, raw: bytes) -> bytes:
    try:
        secret = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ExpungeError(f"{path} is neither a PEM Ed25519 key nor an HMAC key (hex digits); make one with "
                           "`expunge keygen`") from None
    if len(secret) < MIN_HMAC_BYTES:
        raise ExpungeError(f"the HMAC key in {path} has {len(secret)} bytes; use at least {MIN_HMAC_BYTES} "
                           "(64 hex digits, e.g. `expunge keygen --hmac`)")
    return secret


def load_signer(source: "str | Path | Signer | None" = None) -> Signer | None:
    """The signer from a key file (or a Signer given), else from $EXPUNGE_SIGNING_KEY, else None."""
    if isinstance(source, Signer):
        return source
    if source is None:
        source = os.environ.get(ENV) or None
        if source is None:
            return None
    path = Path(source)
    raw = _read(path)
    if raw.lstrip().startswith(b"-----BEGIN"):
        if b"PUBLIC KEY" in raw.split(b"\n", 1)[0]:
            raise ExpungeError(f"{path} is a public key: signing needs the private key (the public key is for "
                               "`expunge verify --public-key`)")
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (TypeError, ValueError) as e:
            raise ExpungeError(f"{path} is not a readable unencrypted PEM private key ({e}); make one with "
                               "`expunge keygen`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ExpungeError(f"{path} holds a {type(key).__name__.replace('_', '')}; expunge signs with Ed25519 "
                               "keys (`expunge keygen`) or HMAC secrets")
        return Signer(ED25519, _ed25519_id(key.public_key()), key)
    secret = _hmac_secret(path, raw)
    return Signer(HMAC, _hmac_id(secret), secret)


def load_verifier(path) -> Verifier:
    """A verifier from a key file: an Ed25519 public key (PEM), or the signing key itself (Ed25519 or HMAC)."""
    path = Path(path)
    raw = _read(path)
    if raw.lstrip().startswith(b"-----BEGIN") and b"PUBLIC KEY" in raw.split(b"\n", 1)[0]:
        return verifier_from_pem(raw.decode(), str(path))
    return load_signer(path).verifier()


def verifier_from_pem(pem: str, where: str = "the recorded public key") -> Verifier:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (TypeError, ValueError) as e:
        raise ExpungeError(f"{where} is not a readable PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ExpungeError(f"{where} is not an Ed25519 public key")
    return Verifier(ED25519, _ed25519_id(key), key)


def generate(path, kind: str = ED25519) -> Signer:
    """Write a new key to ``path`` (readable by its owner only) and, for Ed25519, its public key to PATH.pub."""
    path = Path(path)
    public = path.with_name(path.name + ".pub")
    for target in (path, public) if kind == ED25519 else (path,):
        if target.exists():
            raise ExpungeError(f"{target} exists; choose another path (a key is never overwritten)")
    if kind == ED25519:
        key = Ed25519PrivateKey.generate()
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    elif kind == HMAC:
        data = (secrets.token_hex(MIN_HMAC_BYTES) + "\n").encode()
    else:
        raise ExpungeError(f"unknown key kind {kind!r}; use {ED25519} or {HMAC}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    signer = load_signer(path)
    if kind == ED25519:
        public.write_text(signer.verifier().public_pem)
    return signer
