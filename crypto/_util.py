"""Small input checks shared by the crypto modules."""

from __future__ import annotations

from .errors import CryptoError


def require_bytes(value: object, length: int | None, name: str) -> bytes:
    """Return `value` as bytes, or raise CryptoError naming the field.

    Accepts bytes-like objects (bytes, bytearray, memoryview) because keys often arrive as
    views into decoded frames; anything else is a programming error worth a clear message.
    """
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, bytearray | memoryview):
        data = bytes(value)
    else:
        raise CryptoError(f"{name}: expected bytes, got {type(value).__name__}")
    if length is not None and len(data) != length:
        raise CryptoError(f"{name}: expected {length} bytes, got {len(data)}")
    return data
