"""AES-256-GCM with associated data that binds round, sender, recipient and purpose.

Wire format of a ciphertext: nonce (12 bytes) || ciphertext || tag (16 bytes). Nonces are
random: with 96-bit random nonces the collision probability stays below 2^-32 up to 2^32
messages per key, far beyond one SecAgg round (keys are per pair and per round anyway).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._util import require_bytes
from .errors import AuthenticationError, CryptoError

__all__ = [
    "AD_DOMAIN",
    "KEY_BYTES",
    "NONCE_BYTES",
    "OVERHEAD",
    "TAG_BYTES",
    "associated_data",
    "decrypt",
    "encrypt",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = NONCE_BYTES + TAG_BYTES
AD_DOMAIN = b"fedbus/aead/v1"

_U32_MAX = 2**32 - 1


def _field(text: str, name: str) -> bytes:
    if not isinstance(text, str):
        raise CryptoError(f"{name}: expected str, got {type(text).__name__}")
    raw = text.encode("utf-8")
    if len(raw) > _U32_MAX:
        raise CryptoError(f"{name}: longer than 2^32-1 bytes")
    return struct.pack(">I", len(raw)) + raw


def associated_data(round: int, sender: str, recipient: str, purpose: str) -> bytes:
    """Canonical, injective encoding of (round, sender, recipient, purpose).

    Layout: len-prefixed domain tag, round as unsigned 64-bit big-endian, then each string
    as a 32-bit big-endian byte length followed by its UTF-8 bytes. Length prefixes make the
    encoding unambiguous (("ab", "c") and ("a", "bc") differ), which a separator-joined
    string would not guarantee for identifiers that may contain the separator.
    """
    if isinstance(round, bool) or not isinstance(round, int):
        raise CryptoError(f"round: expected int, got {type(round).__name__}")
    if not 0 <= round < 2**64:
        raise CryptoError(f"round: {round} outside 0..2^64-1")
    return b"".join(
        (
            struct.pack(">I", len(AD_DOMAIN)),
            AD_DOMAIN,
            struct.pack(">Q", round),
            _field(sender, "sender"),
            _field(recipient, "recipient"),
            _field(purpose, "purpose"),
        )
    )


def encrypt(
    key: bytes,
    plaintext: bytes,
    associated_data: bytes,
    *,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """nonce || AES-256-GCM(key, nonce, plaintext, associated_data) || tag."""
    key = require_bytes(key, KEY_BYTES, "key")
    nonce = require_bytes(randbytes(NONCE_BYTES), NONCE_BYTES, "randbytes(12)")
    plaintext = require_bytes(plaintext, None, "plaintext")
    ad = require_bytes(associated_data, None, "associated_data")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """The plaintext, or AuthenticationError if anything (key, AD, bytes) is not as sealed."""
    key = require_bytes(key, KEY_BYTES, "key")
    ciphertext = require_bytes(ciphertext, None, "ciphertext")
    ad = require_bytes(associated_data, None, "associated_data")
    if len(ciphertext) < OVERHEAD:
        raise AuthenticationError(
            f"ciphertext: {len(ciphertext)} bytes, shorter than nonce + tag ({OVERHEAD})"
        )
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], ad)
    except InvalidTag as exc:
        raise AuthenticationError("ciphertext failed authentication") from exc
