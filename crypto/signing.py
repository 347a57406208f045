"""Ed25519 signatures (RFC 8032), raw 32-byte keys and 64-byte signatures."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as _BackendInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._util import require_bytes
from .errors import CryptoError, InvalidSignature

__all__ = [
    "SIGNATURE_BYTES",
    "SigningKeyPair",
    "generate_signing_keypair",
    "sign",
    "signing_public_key",
    "verify",
]

SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True)
class SigningKeyPair:
    """An Ed25519 key pair: 32-byte private seed and 32-byte public key."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"SigningKeyPair(public={self.public.hex()}, private=<redacted>)"


def generate_signing_keypair(randbytes: Callable[[int], bytes] = os.urandom) -> SigningKeyPair:
    """A fresh Ed25519 key pair (the private key is the RFC 8032 32-byte seed)."""
    private = require_bytes(randbytes(32), 32, "randbytes(32)")
    return SigningKeyPair(private=private, public=signing_public_key(private))


def signing_public_key(private: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte private seed."""
    private = require_bytes(private, 32, "private")
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def sign(private: bytes, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `message` (deterministic, per RFC 8032)."""
    private = require_bytes(private, 32, "private")
    return Ed25519PrivateKey.from_private_bytes(private).sign(
        require_bytes(message, None, "message")
    )


def verify(public: bytes, message: bytes, signature: bytes) -> None:
    """Return None if `signature` is valid, else raise InvalidSignature.

    A malformed public key or a signature of the wrong length is also an InvalidSignature:
    the caller only needs to know that the message is not authentic.
    """
    try:
        public = require_bytes(public, 32, "public")
        signature = require_bytes(signature, SIGNATURE_BYTES, "signature")
        message = require_bytes(message, None, "message")
    except CryptoError as exc:
        raise InvalidSignature(str(exc)) from exc
    try:
        key = Ed25519PublicKey.from_public_bytes(public)
        key.verify(signature, message)
    except (_BackendInvalidSignature, ValueError) as exc:
        raise InvalidSignature("signature does not verify under the given public key") from exc
