"""Keys on disk: the one reader and writer of every key file fedbus keeps.

A key file holds one 32-byte key as a line of text, in the encoding its API speaks:

* ``"z85"``: CurveZMQ keys of the bus (40 characters, as ``zmq.curve_keypair()`` makes them).
  `read_key_file` returns the Z85 text, which is what pyzmq's socket options and
  `broker.client.Credentials` take.
* ``"hex"``: Ed25519 signing keys (64 characters; ``crypto.signing`` seeds and public keys).
  `read_key_file` returns the raw bytes, which is what ``crypto.signing`` takes.

Secrets are written readable by their owner only (0600) and public keys 0644, both atomically
(`broker.files`), so no key file is ever seen half-written or, for a secret, by anyone else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import zmq
import zmq.utils.z85

from broker.errors import BrokerError
from broker.files import PUBLIC_MODE, SECRET_MODE, atomic_write_text

__all__ = [
    "CurveKeyPair",
    "KeyEncoding",
    "KeyFileError",
    "check_z85_key",
    "curve_public_key",
    "generate_curve_keypair",
    "read_key_file",
    "write_key_file",
]

KeyEncoding = Literal["z85", "hex"]
KEY_BYTES = 32
_Z85_KEY_LEN = 40  # 32 bytes in Z85


class KeyFileError(BrokerError, ValueError):
    """A key (or key file) that cannot be used; the message names the field and the file."""


def check_z85_key(value: object, field: str) -> str:
    """`value` if it is a 40-character Z85 text of 32 bytes, else KeyFileError naming `field`."""
    if not isinstance(value, str) or len(value) != _Z85_KEY_LEN:
        raise KeyFileError(f"{field} must be a 40-character Z85 CurveZMQ key")
    try:
        raw = zmq.utils.z85.decode(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError) as exc:
        raise KeyFileError(f"{field} is not valid Z85: {exc}") from None
    if len(raw) != KEY_BYTES:
        raise KeyFileError(f"{field} does not decode to {KEY_BYTES} bytes")
    return value


@dataclass(frozen=True)
class CurveKeyPair:
    """A CurveZMQ key pair as Z85 text."""

    public: str
    secret: str


def generate_curve_keypair() -> CurveKeyPair:
    public, secret = zmq.curve_keypair()
    return CurveKeyPair(public=public.decode("ascii"), secret=secret.decode("ascii"))


def curve_public_key(secret: str) -> str:
    """The Z85 public key that belongs to the Z85 CurveZMQ secret key `secret`."""
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


@overload
def read_key_file(
    path: str | os.PathLike[str],
    *,
    encoding: Literal["hex"] = "hex",
    size: int = KEY_BYTES,
    field: str = "key file",
) -> bytes: ...


@overload
def read_key_file(
    path: str | os.PathLike[str],
    *,
    encoding: Literal["z85"],
    size: int = KEY_BYTES,
    field: str = "key file",
) -> str: ...


def read_key_file(
    path: str | os.PathLike[str],
    *,
    encoding: KeyEncoding = "hex",
    size: int = KEY_BYTES,
    field: str = "key file",
) -> bytes | str:
    """The key stored at `path`: raw bytes for ``"hex"``, the Z85 text for ``"z85"``.

    KeyFileError (a ValueError) names `field` and the file when it cannot be read or does not
    hold a `size`-byte key in `encoding`.
    """
    path = Path(path)
    where = f"{field} {path}"
    try:
        text = path.read_text("ascii").strip()
    except OSError as exc:
        raise KeyFileError(f"{where}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{where}: not a {encoding} text key") from None
    if encoding == "z85":
        if size != KEY_BYTES:
            raise ValueError("CurveZMQ keys are always 32 bytes")
        return check_z85_key(text, where)
    if encoding != "hex":
        raise ValueError(f"unknown key encoding {encoding!r} (hex or z85)")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{where}: not a hex key") from None
    if len(key) != size:
        raise KeyFileError(f"{where}: key is {len(key)} bytes, expected {size}")
    return key


def write_key_file(
    path: str | os.PathLike[str],
    key: bytes | str,
    *,
    encoding: KeyEncoding,
    secret: bool,
) -> Path:
    """Store `key` (Z85 text for ``"z85"``, raw bytes for ``"hex"``) the way `read_key_file`
    reads it: one line, atomically, 0600 for a secret and 0644 for a public key."""
    if encoding == "z85":
        text = check_z85_key(key, f"key for {path}")
    elif encoding == "hex":
        if not isinstance(key, bytes):
            raise KeyFileError(f"key for {path}: a hex key file stores bytes")
        text = key.hex()
    else:
        raise ValueError(f"unknown key encoding {encoding!r} (hex or z85)")
    return atomic_write_text(path, text + "\n", mode=SECRET_MODE if secret else PUBLIC_MODE)
