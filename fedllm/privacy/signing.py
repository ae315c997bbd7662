"""A site's Ed25519 key for signing its privacy ledger: generate, load, sign, verify.

A site that signs its ledger lets the coordinator (or an auditor) check that a ledger came from
that site and was not edited by anyone without the site's private key (see
:func:`fedllm.privacy.ledger.verify_ledger`). The key pair is the site's own: the private key
never leaves the site; the public key is handed to the coordinator once, out of band.

* Keys are Ed25519 (``cryptography``), stored as PEM: the private key as unencrypted PKCS#8
  (``<site>.key``, written with permissions 0600), the public key as SubjectPublicKeyInfo
  (``<site>.pub``). Protect the private key file like any other credential.
* In a ledger the public key is stored as the base64 of its 32 raw bytes; :func:`key_id` is a
  short, human-comparable name for it (``ed25519:`` + the first 16 hex digits of its SHA-256).
* Signatures are base64 strings over a domain-separated message (the caller's bytes), so a
  ledger signature can never be replayed as a signature over anything else.

Written on ``cryptography`` rather than by hand: key handling and Ed25519 are exactly what it is
for (docs/architecture.md: prefer a well-kept library).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedllm.errors import ConfigError

log = logging.getLogger(__name__)

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_from_text",
    "public_key_text",
    "sign",
    "verify_signature",
]


def generate_signing_key(out_dir: Path | str, *, site: str) -> tuple[Path, Path]:
    """Write a new key pair ``OUT/<site>.key`` (0600) and ``OUT/<site>.pub``; never overwrites.

    Returns (private key path, public key path).
    """
    if not isinstance(site, str) or not site or "/" in site or site.startswith("."):
        raise ConfigError(f"site name {site!r} cannot name a key file; use the site's name, e.g. 'cardiology'")
    out = Path(out_dir)
    private_path, public_path = out / f"{site}{PRIVATE_SUFFIX}", out / f"{site}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; a site keeps one key (its ledger is signed with it). "
                              "Choose another --out folder, or remove the old pair only if no ledger was signed "
                              "with it")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL: never follow or overwrite; mode 0600 from the start (no window with wider permissions)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file at ``path``; ``ConfigError`` saying what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"site signing key {path} cannot be read ({exc.strerror or exc}); "
                          "create one with: fedllm ledger keygen --out DIR --site NAME") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"site signing key {path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"site signing key {path} is a {type(key).__name__}, not an Ed25519 key; "
                          "create one with: fedllm ledger keygen --out DIR --site NAME")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:  # pragma: no cover - it was just read
        mode = 0
    if os.name == "posix" and mode & 0o077:
        log.warning("site signing key %s is readable by other users (mode %o); chmod 600 it", path, mode)
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """The Ed25519 public key in the PEM file at ``path`` (as written by :func:`generate_signing_key`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"public key {path} cannot be read ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"public key {path} is not a PEM public key ({exc}); give the site's .pub file") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Base64 of the 32 raw bytes of the public key (the form stored in a ledger header)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_text`; ``ValueError`` if ``text`` is not 32 base64 bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey | str) -> str:
    """Short name of a public key to compare by eye: ``ed25519:`` + 16 hex digits of its SHA-256."""
    text = key if isinstance(key, str) else public_key_text(key)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = text.encode("utf-8")
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """Base64 Ed25519 signature of ``message``."""
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify_signature(key: Ed25519PublicKey, message: bytes, signature: object) -> bool:
    """True if ``signature`` (base64) is ``key``'s signature of ``message``; never raises on bad input."""
    if not isinstance(signature, str):
        return False
    try:
        key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
