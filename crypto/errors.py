"""Errors raised by fedbus.crypto.

Everything that goes wrong on untrusted input (a peer's key, a ciphertext, a share) raises a
`CryptoError`, so protocol code can treat "this peer sent garbage" with one `except`.
"""

from __future__ import annotations

__all__ = ["AuthenticationError", "CryptoError", "InvalidSignature"]


class CryptoError(Exception):
    """Base class: malformed key, share or ciphertext, or a failed cryptographic check."""


class AuthenticationError(CryptoError):
    """An AEAD ciphertext failed authentication (tampered, wrong key or wrong associated data)."""


class InvalidSignature(CryptoError):
    """An Ed25519 signature does not verify under the given public key and message."""
