"""X25519 key agreement followed by HKDF-SHA256.

The raw X25519 output is a group element, not a uniformly random key, so it is always passed
through HKDF (RFC 5869) before use. `info` separates purposes: the same pair of keys yields
independent keys for, e.g., share encryption and pairwise masks.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._util import require_bytes
from .errors import CryptoError

__all__ = [
    "KEY_BYTES",
    "AgreementKeyPair",
    "agree",
    "agree_many",
    "agreement_public_key",
    "generate_agreement_keypair",
    "hkdf_sha256",
]

KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class AgreementKeyPair:
    """An X25519 key pair as raw 32-byte strings (RFC 7748 encoding)."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:  # never print private keys into logs
        return f"AgreementKeyPair(public={self.public.hex()}, private=<redacted>)"


def generate_agreement_keypair(randbytes: Callable[[int], bytes] = os.urandom) -> AgreementKeyPair:
    """A fresh X25519 key pair.

    `randbytes` is injectable so sans-IO protocol code stays deterministic in tests; any 32
    bytes are a valid X25519 private key (clamping happens inside the scalar multiplication).
    """
    private = require_bytes(randbytes(KEY_BYTES), KEY_BYTES, "randbytes(32)")
    return AgreementKeyPair(private=private, public=agreement_public_key(private))


@functools.lru_cache(maxsize=64)
def _private_key(private: bytes) -> X25519PrivateKey:
    """Loaded key objects, cached: OpenSSL derives the public key (a full scalar
    multiplication, as costly as the exchange itself) every time a raw key is loaded, and
    SecAgg uses one private key against k peers in a row. The cache holds at most 64 keys
    of this process, which already holds them as bytes; it adds no new exposure.
    """
    return X25519PrivateKey.from_private_bytes(private)


def agreement_public_key(private: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    private = require_bytes(private, KEY_BYTES, "private")
    return _private_key(private).public_key().public_bytes_raw()


def hkdf_sha256(ikm: bytes, *, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869) extract-and-expand."""
    ikm = require_bytes(ikm, None, "ikm")
    info = require_bytes(info, None, "info")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def agree(private: bytes, peer_public: bytes, *, info: bytes, salt: bytes | None = None) -> bytes:
    """32 bytes shared with the holder of `peer_public`: HKDF-SHA256(X25519(private, peer)).

    Raises CryptoError for malformed keys and for a peer key of small order (the shared
    secret would be all zeros, i.e. known to everybody).
    """
    return agree_many(private, [peer_public], info=info, salt=salt)[0]


def agree_many(
    private: bytes, peer_publics: Sequence[bytes], *, info: bytes, salt: bytes | None = None
) -> list[bytes]:
    """`agree(private, p, info=info)` for every p in `peer_publics`, in order."""
    private = require_bytes(private, KEY_BYTES, "private")
    info = require_bytes(info, None, "info")
    key = _private_key(private)
    out = []
    for i, peer in enumerate(peer_publics):
        name = "peer_public" if len(peer_publics) == 1 else f"peer_publics[{i}]"
        peer = require_bytes(peer, KEY_BYTES, name)
        try:
            shared = key.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError as exc:  # OpenSSL refuses an all-zero result (small-order point)
            raise CryptoError(f"{name}: key agreement failed ({exc})") from exc
        if shared == bytes(KEY_BYTES):  # defence in depth if the backend ever stops checking
            raise CryptoError(f"{name}: small-order point gives an all-zero shared secret")
        out.append(hkdf_sha256(shared, info=info, length=32, salt=salt))
    return out
